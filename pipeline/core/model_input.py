"""The contract's input rule on arrays: raw pixels as the ``image`` tensor every runtime is fed.

Beside :mod:`pipeline.core.contract` rather than in it: the contract stays free of NumPy
so that a registry or service machine can read the names without the array stack.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.core.contract import IMAGE_SIDE


def as_input(images: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """``(N, 28, 28)`` pixels (uint8 or float, 0..255) -> ``(N, 1, 28, 28)`` float32."""
    arr = np.asarray(images)
    if arr.ndim != 3 or arr.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(f"images must be (N, {IMAGE_SIDE}, {IMAGE_SIDE}), got {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
