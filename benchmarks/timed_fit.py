"""The preamble the training benchmarks share: compose a config, train one seed, time it.

Scripts in this folder import it as ``from timed_fit import ...`` (a script's own folder
is first on ``sys.path``), in their per-run subprocess, so torch is imported there only.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from machine import load_average

if TYPE_CHECKING:
    from pipeline.core.config import Config, TrainConfig
    from pipeline.data.dataset import SplitArrays
    from pipeline.training.train import TrainResult


@dataclass(frozen=True)
class TimedFit:
    """One training run: what trained (``train``), on what, how long, how busy the CPU was."""

    train: TrainConfig  # cfg.train as it ran (checkpoints in a temporary directory)
    arrays: SplitArrays  # the whole training split: (N, 28, 28) uint8, (N,) uint8
    mean: float
    std: float
    result: TrainResult
    wall_s: float  # fit() from call to return, setup included
    load_before: list[float]


def composed_config(root: Path, profile: str | None, sets: dict[str, Any]) -> Config:
    """``root``'s config with dotted ``sets``: composed from ``conf/`` for ``profile``
    exactly as ``dvc exp run -S profile=...`` would, or over ``params.yaml`` if None."""
    from pipeline.core.config import load_config
    from pipeline.core.profiles import compose_config

    if profile is None:
        return load_config(root / "params.yaml", sets)
    return compose_config(root, profile, sets)


def fit_timed(root: Path, cfg: Config) -> TimedFit:
    """Train ``cfg.train`` as the train stage does (validation carved out, checkpoints
    written, to a temporary directory), on ``root``'s prepared data."""
    from pipeline.data.dataset import load_split
    from pipeline.data.stats import read_normalization
    from pipeline.training.train import fit

    mean, std = read_normalization(root / cfg.validate.stats_path)
    arrays = load_split(root / cfg.data.prepared_dir, "train")
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        tc = replace(cfg.train, checkpoint_dir=Path(tmp))
        t0 = time.perf_counter()
        result = fit(arrays, mean, std, tc, checkpoint_dir=Path(tmp), progress=False)
        wall = time.perf_counter() - t0
    return TimedFit(tc, arrays, mean, std, result, wall, load_before)
