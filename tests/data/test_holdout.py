"""The validation carve: deterministic, disjoint, and one definition for every stage."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipeline.core.config import TrainConfig
from pipeline.core.errors import ConfigError
from pipeline.data.dataset import SplitArrays
from pipeline.data.holdout import carve, split_train_val, validation_split


def _indexed(n: int) -> SplitArrays:
    """``n`` images whose first pixel (as uint16 pair) encodes the row index."""
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(n) % 256
    images[:, 0, 1] = np.arange(n) // 256
    return SplitArrays(images=images, labels=(np.arange(n) % 10).astype(np.uint8))


def _rows(a: SplitArrays) -> set[int]:
    return set((a.images[:, 0, 0].astype(int) + 256 * a.images[:, 0, 1].astype(int)).tolist())


def test_split_is_deterministic_and_disjoint() -> None:
    arrays = _indexed(100)
    tr1, va1 = split_train_val(arrays, 20, seed=3)
    tr2, va2 = split_train_val(arrays, 20, seed=3)
    _, va3 = split_train_val(arrays, 20, seed=4)
    assert _rows(va1) == _rows(va2) and _rows(tr1) == _rows(tr2)
    assert _rows(va1) != _rows(va3)
    assert len(va1) == 20 and len(tr1) == 80
    assert _rows(tr1).isdisjoint(_rows(va1)) and _rows(tr1) | _rows(va1) == set(range(100))
    with pytest.raises(ConfigError, match="val_size"):
        split_train_val(arrays, 100, seed=0)


def test_carve_takes_the_head_then_splits_and_validation_is_its_second_half() -> None:
    arrays = _indexed(1000)
    cfg = replace(TrainConfig(), val_size=50, seed=7, max_train_samples=300)
    train, val = carve(arrays, cfg)
    assert len(train) == 250 and len(val) == 50
    assert _rows(train) | _rows(val) == set(range(300))  # only the first 300 rows
    assert _rows(validation_split(arrays, cfg)) == _rows(val)
    whole_train, whole_val = carve(arrays, replace(cfg, max_train_samples=None))
    assert len(whole_train) + len(whole_val) == 1000
