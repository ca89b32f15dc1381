"""The validation split: training images held out of training, deterministically.

The train stage carves it (:func:`carve`) for its per-epoch validation; the evaluate
and gate stages carve the very same images again (:func:`validation_split`) to fit the
temperature and the confidence threshold of :mod:`pipeline.quality.report` on images the model
never trained on, and never on the test split.
"""

from __future__ import annotations

import torch

from pipeline.core.config import TrainConfig
from pipeline.core.errors import ConfigError
from pipeline.data.dataset import SplitArrays


def split_train_val(
    arrays: SplitArrays, val_size: int, seed: int
) -> tuple[SplitArrays, SplitArrays]:
    """Carve ``val_size`` images out of the training split, deterministically from ``seed``.

    Returns ``(train, val)`` as in-memory copies. ``val_size`` 0 gives an empty val split.
    """
    n = len(arrays)
    if val_size >= n:
        raise ConfigError(f"train.val_size: {val_size} leaves no training images (have {n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    images, labels = arrays.images, arrays.labels
    return (
        SplitArrays(images=images[train_idx], labels=labels[train_idx]),
        SplitArrays(images=images[val_idx], labels=labels[val_idx]),
    )


def carve(arrays: SplitArrays, cfg: TrainConfig) -> tuple[SplitArrays, SplitArrays]:
    """``(train, val)`` of ``arrays`` (the training split) as ``cfg`` asks, in memory.

    The first ``cfg.max_train_samples`` images (None: all), then :func:`split_train_val`
    with ``cfg.val_size`` and ``cfg.seed``. The one definition of which images train and
    which validate: training, evaluate, the gate and the benchmarks all carve through it.
    """
    n_max = cfg.max_train_samples
    head = SplitArrays(images=arrays.images[:n_max], labels=arrays.labels[:n_max])
    return split_train_val(head, cfg.val_size, cfg.seed)


def validation_split(arrays: SplitArrays, cfg: TrainConfig) -> SplitArrays:
    """The images training held out of ``arrays`` (the training split): ``(val_size, 28, 28)
    uint8`` and ``(val_size,) uint8`` labels, in memory (:func:`carve`'s second half)."""
    return carve(arrays, cfg)[1]
