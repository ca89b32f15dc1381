"""Batched degradation ops: shapes, ranges, identities and the direction of each effect."""

from __future__ import annotations

import math

import torch

from pipeline.training import imageops


def digit(n: int = 4) -> torch.Tensor:
    """``(n, 1, 28, 28)`` floats in [0, 1]: a 3-px wide vertical bar, slightly different each."""
    x = torch.zeros(n, 1, 28, 28)
    for i in range(n):
        x[i, 0, 6:22, 12 + i % 2 : 15 + i % 2] = 1.0
    return x


def test_identity_parameters_keep_the_image() -> None:
    x = digit()
    n = x.shape[0]
    theta = imageops.affine_theta(
        torch.zeros(n), torch.ones(n), torch.zeros(n), torch.zeros(n, 2), 28
    )
    assert torch.allclose(imageops.warp(x, theta), x, atol=1e-5)
    assert torch.allclose(imageops.gaussian_blur(x, 0.0), x, atol=1e-5)
    assert torch.equal(imageops.morph(x, 0.0, dilate=True), x)
    assert torch.equal(imageops.add_gaussian_noise(x, 0.0, torch.randn_like(x)), x)
    assert torch.equal(imageops.reduce_brightness(x, 1.0), x)
    assert torch.allclose(imageops.reduce_contrast(x, 1.0), x)


def test_affine_shift_moves_the_centroid_by_the_shift() -> None:
    x = digit(2)
    shift = torch.tensor([[3.0, 0.0], [0.0, -2.0]])
    theta = imageops.affine_theta(torch.zeros(2), torch.ones(2), torch.zeros(2), shift, 28)
    out = imageops.warp(x, theta)
    idx = torch.arange(28, dtype=torch.float32)

    def centroid(t: torch.Tensor) -> torch.Tensor:
        m = t[:, 0]
        return torch.stack(
            [(m.sum(1) * idx).sum(1) / m.sum((1, 2)), (m.sum(2) * idx).sum(1) / m.sum((1, 2))], 1
        )

    assert torch.allclose(centroid(out) - centroid(x), shift, atol=1e-3)


def test_blur_keeps_mass_away_from_the_border_and_spreads_it() -> None:
    x = torch.zeros(2, 1, 28, 28)
    x[:, 0, 14, 14] = 1.0
    out = imageops.gaussian_blur(x, torch.tensor([1.0, 2.0]))
    assert torch.allclose(out.sum((1, 2, 3)), torch.ones(2), atol=1e-4)
    assert float(out[1].max()) < float(out[0].max()) < 1.0
    # Peak of a 2-D Gaussian of sigma 1 (sampled): about 1 / (2 pi) normalised by sums.
    assert math.isclose(float(out[0].max()), 0.159, abs_tol=0.01)


def test_morphology_changes_ink_in_the_right_direction() -> None:
    x = digit()
    ink = x.sum()
    assert imageops.morph(x, 0.5, dilate=True).sum() > ink
    assert imageops.morph(x, 1.0, dilate=True).sum() > imageops.morph(x, 0.5, dilate=True).sum()
    assert imageops.morph(x, 0.5, dilate=False).sum() < ink
    # A 3-px bar survives a 1-px erosion as a 1-px bar.
    assert imageops.morph(x, 1.0, dilate=False).amax() == 1.0


def test_photometric_ops_stay_in_range_and_act() -> None:
    x = digit()
    g = torch.Generator().manual_seed(0)
    noisy = imageops.add_gaussian_noise(x, 50.0, torch.randn(x.shape, generator=g))
    assert float(noisy.min()) >= 0.0 and float(noisy.max()) <= 1.0
    assert float((noisy - x).abs().mean()) > 0.05
    sp = imageops.salt_and_pepper(x, 0.1, torch.rand(x.shape, generator=g))
    changed = float((sp != x).float().mean())
    assert 0.03 < changed < 0.1  # about half of the 10% already had that value
    low = imageops.reduce_contrast(x, 0.3)
    assert float(low.max() - low.min()) <= 0.3 + 1e-6
    dim = imageops.reduce_brightness(x, 0.4)
    assert math.isclose(float(dim.max()), 0.4, abs_tol=1e-6)


def test_occlusion_blacks_out_exactly_the_rectangle() -> None:
    x = torch.ones(2, 1, 28, 28)
    out = imageops.occlude(x, torch.tensor([2.0, 10.0]), torch.tensor([3.0, 0.0]), 4.0, 5.0)
    assert int((out == 0).sum()) == 2 * 4 * 5
    assert float(out[0, 0, 2:6, 3:8].sum()) == 0.0
    assert float(out[1, 0, 10:14, 0:5].sum()) == 0.0


def test_elastic_field_is_smooth_and_scaled_by_alpha() -> None:
    u = torch.rand(2, 2, 28, 28, generator=torch.Generator().manual_seed(0))
    small = imageops.smooth_field(u, 10.0, 4.0)
    big = imageops.smooth_field(u, 30.0, 4.0)
    assert torch.allclose(big, 3 * small, atol=1e-5)
    # Neighbouring displacements are close: smooth, not per-pixel noise.
    assert float((small[..., 1:] - small[..., :-1]).abs().mean()) < 0.2 * float(small.abs().mean())
