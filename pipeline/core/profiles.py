"""Profiles, the DVC way: ``params.yaml`` is composed from ``conf/`` by Hydra.

``conf/config.yaml`` holds every parameter and a defaults list naming one profile of
``conf/profile/`` (``default``, ``quick``...), a small override file merged over the base.
``dvc exp run -S profile=quick -S train.epochs=3`` composes the real values into
``params.yaml`` before running (DVC's Hydra integration, enabled in ``.dvc/config``), so
``dvc.lock``, ``dvc params diff`` and ``dvc exp show`` report what ran, and an explicit
``-S`` always wins over the profile.

The flow and the CLI compose with the same function DVC calls
(:func:`dvc.utils.hydra.compose_and_dump`), so a run started from Prefect writes the same
``params.yaml``, byte for byte, as ``dvc exp run`` with the same overrides.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.atomic import write_bytes, write_text
from pipeline.core.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.core.config import Config

CONF_DIR = "conf"
CONFIG_NAME = "config"


def hydra_override(key: str, value: Any) -> str:
    """``key=value`` in Hydra's override grammar, the form ``dvc exp run -S`` takes.

    Values are written as JSON (strings quoted, ``null``, ``true``, lists), which Hydra
    parses back to the same value; ``profile`` selects the config group.
    """
    if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{key!r} is not a dotted parameter name like 'train.epochs'")
    if key == "profile":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"profile: expected a profile name, got {value!r}")
        return f"profile={value}"
    return f"{key}={json.dumps(value)}"


def overrides_for(profile: str | None, params: Mapping[str, Any] | None) -> list[str]:
    """The Hydra overrides of a run: its profile (if any) first, then each parameter."""
    params = dict(params or {})
    if profile is not None and params.get("profile", profile) != profile:
        raise ConfigError(
            f"profile: given both as {profile!r} and as params.profile={params['profile']!r}"
        )
    if profile is not None:
        params["profile"] = profile
    order = sorted(params, key=lambda k: k != "profile")
    return [hydra_override(k, params[k]) for k in order]


def known_profiles(repo: Path) -> list[str]:
    return sorted(p.stem for p in (Path(repo) / CONF_DIR / "profile").glob("*.yaml"))


def compose_text(repo: Path, overrides: Sequence[str]) -> str:
    """The ``params.yaml`` text that ``dvc exp run`` would write for ``overrides``.

    Raises :class:`ConfigError` for an unknown profile or key, or a malformed override.
    """
    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    repo = Path(repo).resolve()
    conf = repo / CONF_DIR
    if not (conf / f"{CONFIG_NAME}.yaml").is_file():
        raise ConfigError(f"{conf / CONFIG_NAME}.yaml: the parameter source is missing")
    with tempfile.TemporaryDirectory(prefix="params-compose-") as tmp:
        out = Path(tmp) / "params.yaml"
        try:
            compose_and_dump(out, str(conf), None, CONFIG_NAME, str(repo), list(overrides))
        except (HydraException, OmegaConfBaseException) as err:
            msg = " ".join(str(err).split())
            if any(o.startswith("profile=") for o in overrides) and "profile" in msg:
                msg += f" (known profiles: {', '.join(known_profiles(repo))})"
            raise ConfigError(f"cannot compose parameters {list(overrides)}: {msg}") from err
        return out.read_text(encoding="utf-8")


def compose_config(repo: Path, profile: str | None, params: Mapping[str, Any] | None) -> Config:
    """The validated :class:`Config` that ``dvc exp run -S profile=... -S key=value``
    would give the stages: ``params`` (dotted keys) composed over ``profile`` from
    ``repo/conf/``. Raises :class:`ConfigError` for anything composition or the schema
    rejects."""
    from pipeline.core.config import config_from_dict, parse_params

    text = compose_text(repo, overrides_for(profile, params))
    return config_from_dict(parse_params(text, f"conf/ composed with {profile or 'no profile'}"))


def compose_params(repo: Path, overrides: Sequence[str], dest: Path | None = None) -> str:
    """Compose and validate, then replace ``dest`` (default ``repo/params.yaml``) atomically.

    Nothing is written when composition or validation fails. Returns the new text.
    """
    from pipeline.core.config import config_from_dict, parse_params

    text = compose_text(repo, overrides)
    config_from_dict(parse_params(text, "composed params"))
    write_text(Path(dest) if dest is not None else Path(repo) / "params.yaml", text)
    return text


def guarded_run(params_path: Path, argv: Sequence[str]) -> int:
    """Run ``argv`` (``dvc exp run -S ...``); if it fails, put ``params_path`` back.

    DVC composes ``params.yaml`` before it knows whether the run can go ahead: refused by
    another process's lock, or failed at a stage, it would leave the file rewritten with
    parameters that never ran to the end. Returns the command's exit code.
    """
    import subprocess

    before = Path(params_path).read_bytes()
    rc = subprocess.run(list(argv), cwd=Path(params_path).parent, check=False).returncode
    if rc != 0 and Path(params_path).read_bytes() != before:
        write_bytes(Path(params_path), before)
        print(f"{params_path}: restored (the command failed with exit code {rc})", flush=True)
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    """Compose params.yaml from conf/, check it, or run a guarded ``dvc exp run``.

    python -m pipeline.core.profiles compose [OVERRIDE...]
        regenerate params.yaml
    python -m pipeline.core.profiles check
        exit 1 if params.yaml != the default composition
    python -m pipeline.core.profiles exp-run [OVERRIDE...] [-- DVC ARGS]
        dvc exp run -S each override; on failure params.yaml is put back byte for byte
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.core.profiles",
        description=main.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["compose", "check", "exp-run"])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. profile=quick")
    args, extra = parser.parse_known_args(argv)
    repo = Path.cwd()
    try:
        if args.command == "check":
            current = (repo / "params.yaml").read_text(encoding="utf-8")
            if current != compose_text(repo, args.overrides):
                print("params.yaml differs from conf/: run `make params`", file=sys.stderr)
                return 1
            return 0
        if args.command == "compose":
            compose_params(repo, args.overrides)
            return 0
        compose_text(repo, args.overrides)  # refuse a bad override before DVC runs
        sets = [arg for o in args.overrides for arg in ("-S", o)]
        dvc = [sys.executable, "-m", "dvc", "exp", "run", *sets, *[e for e in extra if e != "--"]]
        return guarded_run(repo / "params.yaml", dvc)
    except (ConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
