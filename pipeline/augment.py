"""Batch preprocessing on the device: uint8 pixels to normalised, augmented floats.

Everything is one tensor op over the whole batch (no per-sample Python): a random
affine transform per image (shift, rotation, isotropic scale) applied with
``F.affine_grid`` + ``F.grid_sample``. Random parameters are drawn from an explicit
CPU ``torch.Generator`` (a few numbers per image) so a run is reproducible and
resumable on any device, then moved to the batch's device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.config import AugmentConfig

SIDE = 28


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """``(B, 28, 28) uint8`` in [0, 255] -> ``(B, 1, 28, 28) float32`` in [0, 1]."""
    return images.unsqueeze(1).to(torch.float32).div_(255.0)


def normalize(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """``(x - mean) / std`` on a [0, 1] float batch (any shape)."""
    return (x - mean) / std


def affine_matrices(n: int, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """``(n, 2, 3) float32`` CPU affine matrices for ``F.affine_grid``.

    Each image gets a uniform rotation in ±max_rotation_deg, a scale in scale_range
    and a shift in ±max_shift_px (per axis). ``affine_grid`` works in normalised
    coordinates ([-1, 1] spans 28 px), so pixels are converted with ``2 / 28``.
    """
    u = torch.rand(n, 4, generator=generator)
    angle = (u[:, 0] * 2 - 1) * math.radians(cfg.max_rotation_deg)
    lo, hi = cfg.scale_range
    scale = lo + u[:, 1] * (hi - lo)
    shift = (u[:, 2:] * 2 - 1) * (cfg.max_shift_px * 2.0 / SIDE)
    # The grid maps output coordinates to input ones, so the digit is scaled by `scale`
    # when the sampling matrix uses 1/scale.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.empty(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos, -sin, shift[:, 0]
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin, cos, shift[:, 1]
    return theta


def random_affine(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment a ``(B, 1, H, W)`` float batch in [0, 1]; out-of-image pixels are 0 (black).

    Applied before normalisation so that the zero padding is the MNIST background.
    """
    theta = affine_matrices(x.shape[0], cfg, generator).to(x.device, non_blocking=True)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def prepare_batch(
    images: torch.Tensor,
    mean: float,
    std: float,
    augment: AugmentConfig | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 ``(B, 28, 28)`` -> normalised float ``(B, 1, 28, 28)``, augmented if asked.

    ``augment`` is used only when it is given, enabled, and ``generator`` is given.
    """
    x = to_unit(images)
    if augment is not None and augment.enabled:
        if generator is None:
            raise ValueError("prepare_batch: augmentation needs a torch.Generator")
        x = random_affine(x, augment, generator)
    return normalize(x, mean, std)
