"""pipeline/core/model_input.py: raw pixels as the contract's ``image`` tensor."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.model_input import as_input


def test_as_input_shapes() -> None:
    x = as_input(np.zeros((3, 28, 28), np.uint8))
    assert x.shape == (3, 1, 28, 28) and x.dtype == np.float32 and x.flags.c_contiguous
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        as_input(np.zeros((3, 1, 28, 28)))


def test_as_input_keeps_raw_pixel_values() -> None:
    images = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28) % 256
    x = as_input(images.astype(np.uint8))
    assert x.min() == 0.0 and x.max() == 255.0  # normalisation is inside the graph
    np.testing.assert_array_equal(x[:, 0], images.astype(np.float32))
