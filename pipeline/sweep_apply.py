"""Apply a sweep's best configuration as a DVC experiment (``dvc exp run -S ...``).

``best.yaml`` (written by :mod:`pipeline.sweep_report`) is a nested params override,
``train: {lr: 0.05, augment: {max_shift_px: 1.5}}``. It is flattened to dotted keys,
checked against the schema with the current params.yaml, and turned into one
``dvc exp run -S train.lr=0.05 -S train.augment.max_shift_px=1.5`` command, so the
chosen model is trained, evaluated, exported and gated by the DVC pipeline with full
lineage (the experiment records the parameters).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Config, config_from_dict, to_dict
from pipeline.errors import ConfigError


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


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
    return flatten(raw)


def check_override(params_path: Path, overrides: Mapping[str, Any]) -> Config:
    """The config ``dvc exp run -S`` will give the stages, checked to hold ``overrides``.

    ``-S`` rewrites the BASE keys of params.yaml and the profile is merged over them, so
    a profile that sets a searched key would silently win: that is a :class:`ConfigError`,
    as is any key or value the schema rejects.
    """
    raw = yaml.safe_load(Path(params_path).read_text(encoding="utf-8")) or {}
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: '{part}' is not a section of {params_path}")
        node[leaf] = value
    cfg = config_from_dict(raw)
    tree = to_dict(cfg)
    for dotted, value in overrides.items():
        got: Any = tree
        for part in dotted.split("."):
            got = got[part]
        want = list(value) if isinstance(value, tuple) else value
        if got != want:
            raise ConfigError(
                f"{dotted}: the experiment would run with {got!r}, not {value!r} "
                f"(profile {cfg.profile!r} sets it); add profile: default to the override"
            )
    return cfg


def format_value(value: Any) -> str:
    """A value as DVC's ``-S`` (Hydra override grammar) reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return value
    return json.dumps(value)


def dvc_exp_command(overrides: Mapping[str, Any], name: str | None = None) -> list[str]:
    """``dvc exp run [-n NAME] -S key=value ...`` (keys sorted: stable commands)."""
    argv = ["dvc", "exp", "run"]
    if name:
        argv += ["-n", name]
    for key in sorted(overrides):
        argv += ["-S", f"{key}={format_value(overrides[key])}"]
    return argv


def run_command(argv: Sequence[str], cwd: Path | None = None) -> int:
    """Run ``argv`` (``dvc`` from PATH, else this Python's ``-m dvc``); its exit status."""
    if argv[0] == "dvc" and shutil.which("dvc") is None:
        argv = [sys.executable, "-m", "dvc", *argv[1:]]
    return subprocess.run(list(argv), cwd=cwd, check=False).returncode


def command_line(argv: Sequence[str]) -> str:
    return shlex.join(argv)
