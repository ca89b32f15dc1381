"""Put a flow run's profile and overrides into ``params.yaml``, as ``dvc exp run -S`` does.

DVC decides what is stale by comparing ``params.yaml`` with ``dvc.lock``, and every stage
reads ``params.yaml`` itself (``python -m pipeline <stage>``), so a run's parameters must
be *in that file* before any stage runs. The file is composed from ``conf/`` by
:func:`pipeline.core.profiles.compose_params`, the function DVC's ``exp run`` calls: the same
profile and overrides give the same file, byte for byte, and an override always wins
over the profile. A run that names no profile and no parameters runs the file as it is,
like ``dvc repro``.

No Prefect import here: this is plain file handling, unit-tested on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_text
from pipeline.core.config import Config, load_config
from pipeline.core.errors import ConfigError
from pipeline.core.profiles import compose_params, overrides_for


@dataclass(frozen=True)
class PreparedParams:
    """The validated configuration of a run and what was done to ``params.yaml``.

    ``original_text`` is the file before the run, so a failed run can put it back.
    ``changed`` is False when the run asked for nothing the file did not already say.
    """

    cfg: Config
    overrides: list[str]
    original_text: str
    changed: bool


def prepare_params(
    repo: Path, profile: str | None, params: Mapping[str, Any] | None
) -> PreparedParams:
    """Compose and validate the run's parameters into ``repo/params.yaml`` (atomically).

    Raises :class:`ConfigError` (and leaves the file untouched) when the profile or a key
    is unknown or the composed parameters are invalid.
    """
    params_path = Path(repo) / "params.yaml"
    try:
        original = params_path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"{params_path}: parameters file not found") from err
    overrides = overrides_for(profile, params)
    if overrides:
        compose_params(Path(repo), overrides, params_path)
    # The one load of the run: everything below gets this frozen Config.
    cfg = load_config(params_path)
    changed = params_path.read_text(encoding="utf-8") != original
    return PreparedParams(cfg=cfg, overrides=overrides, original_text=original, changed=changed)


def restore_params(params_path: Path, prepared: PreparedParams) -> bool:
    """Put back the file as it was before :func:`prepare_params`; True if it was changed."""
    if not prepared.changed:
        return False
    write_text(Path(params_path), prepared.original_text)
    return True
