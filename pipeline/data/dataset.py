"""Prepared MNIST arrays: the contract between ingestion and everything downstream.

``data/prepared/`` holds, per split (``train``, ``test``):

- ``{split}_images.npy``: ``(N, 28, 28) uint8`` in ``[0, 255]``
- ``{split}_labels.npy``: ``(N,) uint8`` in ``[0, 9]``

plus ``manifest.json`` with the counts and the sha256 of every raw and prepared file.
The arrays are plain ``.npy`` so they memory-map in microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from pipeline.core.atomic import sha256_file
from pipeline.core.errors import SourceError

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class SplitArrays:
    """``images``: (N, 28, 28) uint8 in [0, 255]; ``labels``: (N,) uint8 in [0, 9]."""

    images: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.uint8]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def images_path(prepared_dir: Path, split: Split) -> Path:
    return Path(prepared_dir) / f"{split}_images.npy"


def labels_path(prepared_dir: Path, split: Split) -> Path:
    return Path(prepared_dir) / f"{split}_labels.npy"


def load_split(prepared_dir: Path, split: Split, mmap: bool = True) -> SplitArrays:
    """Load one split; memory-mapped read-only by default."""
    mode: Literal["r"] | None = "r" if mmap else None
    paths = (images_path(prepared_dir, split), labels_path(prepared_dir, split))
    for p in paths:
        if not p.is_file():
            raise SourceError(f"{p}: prepared array missing; run the ingest stage first")
    images = np.load(paths[0], mmap_mode=mode, allow_pickle=False)
    labels = np.load(paths[1], mmap_mode=mode, allow_pickle=False)
    return SplitArrays(images=images, labels=labels)


def dataset_version(prepared_dir: Path) -> str:
    """sha256 of the manifest: one id for the exact bytes of all four files."""
    path = Path(prepared_dir) / MANIFEST
    if not path.is_file():
        raise SourceError(f"{path}: manifest missing; run the ingest stage first")
    return sha256_file(path)
