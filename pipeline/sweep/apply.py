"""Apply a sweep's best configuration as a DVC experiment (``dvc exp run -S ...``).

``best.yaml`` (written by :mod:`pipeline.sweep.report`) is a nested params override,
``train: {lr: 0.05, augment: {max_shift_px: 1.5}}``. It is flattened to dotted keys
(:func:`pipeline.core.dotted.flatten`), checked against the schema with the current
params.yaml, and turned into one
``dvc exp run -S train.lr=0.05 -S train.augment.max_shift_px=1.5`` command, so the
chosen model is trained, evaluated, exported and gated by the DVC pipeline with full
lineage (the experiment records the parameters).
"""

from __future__ import annotations

import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.core import dotted
from pipeline.core.config import Config, to_dict
from pipeline.core.errors import ConfigError
from pipeline.core.profiles import compose_config, guarded_run, overrides_for


def read_override(path: Path) -> dict[str, Any]:
    """The dotted overrides of an override file; :class:`ConfigError` if unusable."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: override file not found (run the sweep first)") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{path}: expected a non-empty mapping such as 'train: {{lr: 0.05}}'")
    return dotted.flatten(raw)


def check_override(repo: Path, overrides: Mapping[str, Any]) -> Config:
    """The config ``dvc exp run -S`` will give the stages, checked to hold ``overrides``.

    Composed from ``conf/`` exactly as DVC's Hydra integration will (the override's
    ``profile``, then each key, which wins over the profile); any key or value the
    schema rejects is a :class:`ConfigError` before DVC runs.
    """
    params = dict(overrides)
    profile = params.pop("profile", None)
    cfg = compose_config(Path(repo), profile, params)
    tree = to_dict(cfg)
    for key, value in params.items():
        got = dotted.get(tree, key)
        want = list(value) if isinstance(value, tuple) else value
        if got != want:  # pragma: no cover - composition guarantees it; kept as a guard
            raise ConfigError(f"{key}: the experiment would run with {got!r}, not {value!r}")
    return cfg


def dvc_exp_command(overrides: Mapping[str, Any], name: str | None = None) -> list[str]:
    """``dvc exp run [-n NAME] -S profile=... -S key=value ...`` (stable order)."""
    params = dict(overrides)
    profile = params.pop("profile", None)
    argv = ["dvc", "exp", "run"]
    if name:
        argv += ["-n", name]
    for item in overrides_for(profile, dict(sorted(params.items()))):
        argv += ["-S", item]
    return argv


def run_command(argv: Sequence[str], repo: Path) -> int:
    """Run ``argv`` (``dvc`` from PATH, else this Python's ``-m dvc``) in ``repo``.

    A failed or refused run puts ``params.yaml`` back (:func:`guarded_run`).
    """
    if argv[0] == "dvc" and shutil.which("dvc") is None:
        argv = [sys.executable, "-m", "dvc", *argv[1:]]
    return guarded_run(Path(repo) / "params.yaml", argv)


def command_line(argv: Sequence[str]) -> str:
    return shlex.join(argv)
