"""Synthetic MNIST-like images for unit tests (a plain module: ``conftest`` is ambiguous
when tests in several directories import it)."""

from __future__ import annotations

import numpy as np


def make_images(n: int, seed: int) -> np.ndarray:
    """``(n, 28, 28) uint8`` blobs: dark background, a bright stroke, MNIST-like enough."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    rows = rng.integers(6, 22, size=n)
    for i, r in enumerate(rows):
        images[i, r - 3 : r + 3, 8:20] = rng.integers(180, 256, size=(6, 12))
    return images
