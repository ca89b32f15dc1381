"""Batch preprocessing: dtype/shape/range, identity transform, shifts, determinism."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from pipeline.core.config import (
    AugmentConfig,
    BlurAugment,
    ElasticAugment,
    FactorAugment,
    NoiseAugment,
    OcclusionAugment,
    OutlierAugment,
    SaltPepperAugment,
    ThicknessAugment,
)
from pipeline.training.augment import (
    OUTLIER,
    affine_matrices,
    augment_batch,
    normalize,
    prepare_batch,
    prepare_training_batch,
    random_affine,
    synthetic_outliers,
    to_unit,
    training_loss,
)

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


ALL_FAMILIES = AugmentConfig(
    max_shear=0.3,
    elastic=ElasticAugment(p=0.5, max_alpha=34.0),
    noise=NoiseAugment(p=0.5, max_sigma=50.0),
    salt_pepper=SaltPepperAugment(p=0.5, max_fraction=0.1),
    blur=BlurAugment(p=0.5, max_sigma=1.5),
    contrast=FactorAugment(p=0.5, min_factor=0.2),
    brightness=FactorAugment(p=0.5, min_factor=0.2),
    thickness=ThicknessAugment(p=0.5, max_erode_px=0.5, max_dilate_px=1.0),
    occlusion=OcclusionAugment(p=0.5, max_size=8.0),
)


def test_every_family_is_reproducible_and_stays_in_range() -> None:
    x = to_unit(batch(64))
    a = augment_batch(x, ALL_FAMILIES, torch.Generator().manual_seed(3))
    b = augment_batch(x, ALL_FAMILIES, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.shape == x.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_families_with_p_zero_leave_the_affine_stream_unchanged() -> None:
    """Defaults (all p = 0) draw exactly the random numbers of the affine-only version."""
    x = to_unit(batch())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(augment_batch(x, AugmentConfig(), g1), random_affine(x, AugmentConfig(), g2))
    assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.parametrize(
    "family",
    ["elastic", "noise", "salt_pepper", "blur", "contrast", "brightness", "thickness", "occlusion"],
)
def test_each_family_changes_only_about_p_of_the_images(family: str) -> None:
    x = to_unit(batch(200)) * 0.7 + 0.2  # grey background: every family changes some pixel
    none = AugmentConfig(max_shift_px=0.0, max_rotation_deg=0.0, scale_range=(1.0, 1.0))
    base = getattr(ALL_FAMILIES, family)
    cfg = replace(none, **{family: replace(base, p=0.25)})
    out = augment_batch(x, cfg, torch.Generator().manual_seed(11))
    changed = ((out - x).abs().amax(dim=(1, 2, 3)) > 1e-4).float().mean()
    assert 0.1 < float(changed) < 0.4


def test_outliers_are_relabelled_and_trained_towards_uniform() -> None:
    x = batch(128)
    y = torch.randint(0, 10, (128,), generator=torch.Generator().manual_seed(0))
    cfg = AugmentConfig(outliers=OutlierAugment(p=0.25))
    _, yb = prepare_training_batch(x, y, 0.13, 0.31, cfg, torch.Generator().manual_seed(1))
    out = yb == OUTLIER
    assert 15 < int(out.sum()) < 50
    assert torch.equal(yb[~out], y[~out])
    # Without outliers the loss is plain (label-smoothed) cross-entropy.
    logits = torch.randn(128, 10, generator=torch.Generator().manual_seed(2))
    plain = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
    assert torch.allclose(training_loss(logits, y, 0.1), plain)
    # Uniform logits are optimal for an all-outlier batch: loss = log(10).
    all_out = torch.full((4,), OUTLIER)
    assert math.isclose(
        float(training_loss(torch.zeros(4, 10), all_out, 0.1)), math.log(10), rel_tol=1e-6
    )
    assert float(training_loss(logits[:4], all_out, 0.1)) > math.log(10)
    # p = 0: labels untouched and the same pixels as prepare_batch.
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    xb0, yb0 = prepare_training_batch(x, y, 0.1, 0.3, AugmentConfig(), g1)
    assert torch.equal(yb0, y) and torch.equal(xb0, prepare_batch(x, 0.1, 0.3, AugmentConfig(), g2))


def test_synthetic_outliers_are_not_the_digits() -> None:
    x = to_unit(batch(8))
    out = synthetic_outliers(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert (out != x).flatten(1).any(1).all()
