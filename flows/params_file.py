"""Put a flow run's profile and overrides into ``params.yaml``, as ``dvc exp run -S`` does.

DVC decides what is stale by comparing ``params.yaml`` with ``dvc.lock``, and every stage
reads ``params.yaml`` itself (``python -m pipeline <stage>``). A run's parameters must
therefore be *in that file* before any stage runs, or DVC and the flow would disagree on
what was trained. The file is edited with ruamel.yaml in round-trip mode (comments, key
order, flow-style lists and indentation survive) and replaced atomically.

The combined parameters are validated with :func:`pipeline.config.load_config` before
the file is touched. Two kinds of override are refused because the file would not mean
what the run asked for:

- ``profiles.*``: profile definitions are part of the code review, not of a run;
- a key the active profile also sets: the profile is merged over the base, so a base
  override would never reach the stages (``train.epochs=3`` under ``profile: quick``,
  which sets ``train.epochs: 2``).

No Prefect import here: this is plain file handling, unit-tested on its own.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from pipeline.atomic import write_text
from pipeline.config import Config, load_config
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class PreparedParams:
    """The validated configuration of a run and what was done to ``params.yaml``.

    ``original_text`` is the file before the run, so a failed run can put it back.
    ``changed`` is False when the run asked for nothing the file did not already say.
    """

    cfg: Config
    overrides: dict[str, Any]
    original_text: str
    changed: bool


def run_overrides(profile: str | None, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge the flow's ``profile`` and ``params`` into one dotted-key override mapping."""
    out: dict[str, Any] = {}
    for key, value in (params or {}).items():
        if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"params: {key!r} is not a dotted parameter name like 'train.epochs'")
        if key == "profiles" or key.startswith("profiles."):
            raise ConfigError(
                f"params: {key!r}: profile definitions are edited in params.yaml, not per run"
            )
        out[key] = value
    if profile is not None:
        if "profile" in out and out["profile"] != profile:
            raise ConfigError(
                f"profile: given both as {profile!r} and as params.profile={out['profile']!r}"
            )
        out["profile"] = profile
    return out


def check_not_shadowed(cfg: Config, overrides: Mapping[str, Any]) -> None:
    """Refuse overrides that the active profile would overwrite when a stage loads the file."""
    if cfg.profile == "default":
        return
    patch: Any = cfg.profiles.get(cfg.profile, {})
    for dotted in overrides:
        if dotted == "profile":
            continue
        node = patch
        for part in dotted.split("."):
            if not isinstance(node, Mapping):
                break  # the profile replaces a parent section wholesale
            if part not in node:
                node = None
                break
            node = node[part]
        if node is not None:
            raise ConfigError(
                f"{dotted}: profile {cfg.profile!r} sets this key "
                f"(profiles.{cfg.profile}.{dotted}) and is merged over the base, so the "
                "override would not reach the stages; change the profile in params.yaml "
                "or run another profile"
            )


def _represent_null(representer: Any, data: None) -> Any:
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")


def _yaml() -> YAML:
    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.width = 4096  # never re-wrap long lines or comments
    # The project's style: 2-space mappings, list items indented under their key.
    y.indent(mapping=2, sequence=4, offset=2)
    # ruamel writes None as an empty value; keep the file's explicit `null`.
    y.representer.add_representer(type(None), _represent_null)
    return y


def render_overrides(text: str, overrides: Mapping[str, Any]) -> str:
    """``text`` (a params.yaml) with each dotted key set to its value; comments kept."""
    y = _yaml()
    data = y.load(text)
    if data is None:
        data = CommentedMap()
    if not isinstance(data, CommentedMap):
        raise ConfigError("params.yaml: the top level must be a mapping")
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.get(part)
            if child is None:
                child = CommentedMap()
                node[part] = child
            if not isinstance(child, CommentedMap):
                raise ConfigError(f"{dotted}: '{part}' is not a section of params.yaml")
            node = child
        node[leaf] = value
    buf = io.StringIO()
    y.dump(data, buf)
    return buf.getvalue()


def prepare_params(
    params_path: Path, profile: str | None, params: Mapping[str, Any] | None
) -> PreparedParams:
    """Validate the run's parameters, then write them into ``params_path`` (atomically).

    Raises :class:`ConfigError` (and leaves the file untouched) when the combined
    parameters are invalid or an override could not take effect.
    """
    params_path = Path(params_path)
    overrides = run_overrides(profile, params)
    try:
        original = params_path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"{params_path}: parameters file not found") from err
    # The one load of the run: everything below gets this frozen Config.
    cfg = load_config(params_path, overrides)
    check_not_shadowed(cfg, overrides)
    changed = False
    if overrides:
        new_text = render_overrides(original, overrides)
        if new_text != original:
            write_text(params_path, new_text)
            changed = True
    return PreparedParams(cfg=cfg, overrides=overrides, original_text=original, changed=changed)


def restore_params(params_path: Path, prepared: PreparedParams) -> bool:
    """Put back the file as it was before :func:`prepare_params`; True if it was changed."""
    if not prepared.changed:
        return False
    write_text(Path(params_path), prepared.original_text)
    return True
