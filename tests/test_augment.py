"""Batch preprocessing: dtype/shape/range, identity transform, shifts, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.augment import affine_matrices, normalize, prepare_batch, random_affine, to_unit
from pipeline.config import AugmentConfig

IDENTITY = AugmentConfig(max_shift_px=0.0, max_rotation_deg=0.0, scale_range=(1.0, 1.0))


def batch(n: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(n, 28, 28, dtype=torch.uint8)
    x[:, 10:18, 12:16] = torch.randint(100, 256, (n, 8, 4), generator=g, dtype=torch.uint8)
    return x


def test_to_unit_and_normalize() -> None:
    x = to_unit(torch.tensor([[[0, 255]]], dtype=torch.uint8).expand(1, 28, 2).contiguous())
    assert x.shape == (1, 1, 28, 2) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    z = normalize(x, 0.5, 0.5)
    assert float(z.min()) == -1.0 and float(z.max()) == 1.0


def test_identity_affine_keeps_the_image() -> None:
    x = to_unit(batch())
    out = random_affine(x, IDENTITY, torch.Generator().manual_seed(1))
    assert torch.allclose(out, x, atol=1e-5)


def test_shift_moves_mass_by_at_most_max_shift() -> None:
    cfg = AugmentConfig(max_shift_px=3.0, max_rotation_deg=0.0, scale_range=(1.0, 1.0))
    x = to_unit(batch(64))
    out = random_affine(x, cfg, torch.Generator().manual_seed(2))
    cols = torch.arange(28, dtype=torch.float32)

    def centroid_x(t: torch.Tensor) -> torch.Tensor:
        return (t.sum(dim=(1, 2)) * cols).sum(dim=1) / t.sum(dim=(1, 2, 3))

    moved = (centroid_x(out) - centroid_x(x)).abs()
    assert float(moved.max()) <= 3.0 + 1e-3
    assert float(moved.max()) > 0.5  # something did move
    # Pixel mass is kept (the digit stays inside the frame for these small shifts).
    assert torch.allclose(out.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)), rtol=1e-3)


def test_affine_parameters_are_within_bounds() -> None:
    cfg = AugmentConfig(max_shift_px=2.0, max_rotation_deg=10.0, scale_range=(0.9, 1.1))
    theta = affine_matrices(10_000, cfg, torch.Generator().manual_seed(3))
    assert theta.shape == (10_000, 2, 3)
    inv_scale = torch.linalg.det(theta[:, :, :2]).sqrt()  # = 1 / scale
    assert float(inv_scale.min()) >= 1 / 1.1 - 1e-5 and float(inv_scale.max()) <= 1 / 0.9 + 1e-5
    angle = torch.atan2(theta[:, 1, 0], theta[:, 0, 0]).abs()
    assert float(angle.max()) <= math.radians(10.0) + 1e-5
    assert float(theta[:, :, 2].abs().max()) <= 2.0 * 2 / 28 + 1e-6


def test_same_generator_seed_same_batch() -> None:
    x = batch()
    a = prepare_batch(x, 0.13, 0.31, AugmentConfig(), torch.Generator().manual_seed(7))
    b = prepare_batch(x, 0.13, 0.31, AugmentConfig(), torch.Generator().manual_seed(7))
    c = prepare_batch(x, 0.13, 0.31, AugmentConfig(), torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (16, 1, 28, 28)


def test_disabled_augmentation_is_plain_normalisation() -> None:
    x = batch()
    off = AugmentConfig(enabled=False)
    assert torch.equal(prepare_batch(x, 0.1, 0.3, off), normalize(to_unit(x), 0.1, 0.3))


def test_augmentation_without_generator_is_an_error() -> None:
    with pytest.raises(ValueError, match="Generator"):
        prepare_batch(batch(), 0.1, 0.3, AugmentConfig(), None)
