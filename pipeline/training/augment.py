"""Batch preprocessing on the device: uint8 pixels to normalised, augmented floats.

Everything is one tensor op over the whole batch (no per-sample Python): a random
affine transform per image (shift, rotation, isotropic scale, optional shear) applied
with ``F.affine_grid`` + ``F.grid_sample``, then the degradation families of the
robustness suite (:mod:`pipeline.quality.robustness`), each on a random share ``p`` of the batch:
stroke thickness, elastic deformation (folded into the same ``grid_sample``), blur,
occlusion, contrast, brightness, Gaussian noise, salt-and-pepper. The ops are those of
:mod:`pipeline.training.imageops`. Random parameters are drawn from an explicit CPU
``torch.Generator`` so a run is reproducible and resumable on any device, then moved to
the batch's device. A family with ``p == 0`` draws nothing, so the affine-only stream
of random numbers is unchanged from earlier versions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pipeline.core.config import AugmentConfig, FactorAugment
from pipeline.training import imageops

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


def _subset(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    """CPU indices of the images that get a family, each with probability ``p``.

    Drawn on the CPU, so selecting them on the device needs no host sync; the op then
    runs on those images only (its cost scales with ``p``).
    """
    return torch.nonzero(torch.rand(n, generator=g) < p).reshape(-1)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + torch.rand(n, generator=g) * (hi - lo)


def _apply(
    x: torch.Tensor, idx: torch.Tensor, op: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``x`` with ``op`` applied to the images at ``idx`` (CPU indices)."""
    if idx.numel() == 0:
        return x
    dev_idx = idx.to(x.device, non_blocking=True)
    return x.index_copy(0, dev_idx, op(x.index_select(0, dev_idx)))


Step = Callable[[torch.Tensor, AugmentConfig, torch.Generator], torch.Tensor]


def _thickness(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    th = cfg.thickness
    if not (th.p > 0 and (th.max_erode_px > 0 or th.max_dilate_px > 0)):
        return x
    idx = _subset(x.shape[0], th.p, g)
    # Half thinner, half thicker, one radius per batch and direction.
    dilate = torch.rand(idx.numel(), generator=g) < 0.5
    r = torch.rand(2, generator=g)
    x = _apply(x, idx[~dilate], lambda v: imageops.morph(v, float(r[0]) * th.max_erode_px, False))
    return _apply(x, idx[dilate], lambda v: imageops.morph(v, float(r[1]) * th.max_dilate_px, True))


def _geometry(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Affine (rotation, scale, shift, shear) and elastic, in one resampling."""
    n, dev = x.shape[0], x.device
    theta = affine_matrices(n, cfg, g)
    if cfg.max_shear > 0:
        shear = (torch.rand(n, generator=g) * 2 - 1) * cfg.max_shear
        # theta maps output to input coordinates: the inverse shear acts first.
        inv_shear = torch.zeros(n, 2, 2)
        inv_shear[:, 0, 0], inv_shear[:, 0, 1], inv_shear[:, 1, 1] = 1.0, -shear, 1.0
        theta = torch.cat([inv_shear @ theta[:, :, :2], inv_shear @ theta[:, :, 2:]], dim=2)
    el = cfg.elastic
    disp = None
    if el.p > 0 and el.max_alpha > 0:
        idx = _subset(n, el.p, g)
        if idx.numel():
            alpha = _uniform(idx.numel(), 0.0, el.max_alpha, g).to(dev)
            field = torch.rand(idx.numel(), 2, *x.shape[-2:], generator=g).to(dev)
            disp = torch.zeros(n, 2, *x.shape[-2:], device=dev).index_copy(
                0, idx.to(dev), imageops.smooth_field(field, alpha, el.sigma)
            )
    return imageops.warp(x, theta.to(dev, non_blocking=True), disp)


def _blur(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    if not (cfg.blur.p > 0 and cfg.blur.max_sigma > 0):
        return x
    idx = _subset(x.shape[0], cfg.blur.p, g)
    sigma = _uniform(idx.numel(), 0.0, cfg.blur.max_sigma, g).to(x.device)
    return _apply(x, idx, lambda v: imageops.gaussian_blur(v, sigma))


def _occlusion(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    oc = cfg.occlusion
    if not (oc.p > 0 and oc.max_size >= 2):
        return x
    idx = _subset(x.shape[0], oc.p, g)
    size = float(torch.randint(2, int(oc.max_size) + 1, (), generator=g))
    boxes = [t.to(x.device) for t in imageops.occlusion_boxes(idx.numel(), size, g)]
    return _apply(x, idx, lambda v: imageops.occlude(v, *boxes))


def _reduce(
    x: torch.Tensor,
    aug: FactorAugment,
    op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    g: torch.Generator,
) -> torch.Tensor:
    """``op`` with a factor in ``[aug.min_factor, 1]`` on a random share ``aug.p``."""
    if not (aug.p > 0 and aug.min_factor < 1):
        return x
    idx = _subset(x.shape[0], aug.p, g)
    factor = _uniform(idx.numel(), aug.min_factor, 1.0, g).to(x.device)
    return _apply(x, idx, lambda v: op(v, factor))


def _contrast(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    return _reduce(x, cfg.contrast, imageops.reduce_contrast, g)


def _brightness(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    return _reduce(x, cfg.brightness, imageops.reduce_brightness, g)


def _noise(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    if not (cfg.noise.p > 0 and cfg.noise.max_sigma > 0):
        return x
    idx = _subset(x.shape[0], cfg.noise.p, g)
    sigma = _uniform(idx.numel(), 0.0, cfg.noise.max_sigma, g).to(x.device)
    normal = torch.randn(idx.numel(), *x.shape[1:], generator=g).to(x.device)
    return _apply(x, idx, lambda v: imageops.add_gaussian_noise(v, sigma, normal))


def _salt_pepper(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    sp = cfg.salt_pepper
    if not (sp.p > 0 and sp.max_fraction > 0):
        return x
    idx = _subset(x.shape[0], sp.p, g)
    frac = _uniform(idx.numel(), 0.0, sp.max_fraction, g).to(x.device)
    uniform = torch.rand(idx.numel(), *x.shape[1:], generator=g).to(x.device)
    return _apply(x, idx, lambda v: imageops.salt_and_pepper(v, frac, uniform))


# The digit first, then the image, then the sensor. The order is also the order of the
# generator's draws, so it fixes what a seed produces.
_STEPS: tuple[Step, ...] = (
    _thickness,
    _geometry,
    _blur,
    _occlusion,
    _contrast,
    _brightness,
    _noise,
    _salt_pepper,
)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment a ``(B, 1, H, W)`` float batch in [0, 1]; the result stays in [0, 1].

    Order: thickness, affine (+ elastic, in the same resampling), blur, occlusion,
    contrast, brightness, noise, salt-and-pepper (the digit first, then the image, then
    the sensor). Each family runs on its random subset only.
    """
    for step in _STEPS:
        x = step(x, cfg, generator)
    return x


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
        x = augment_batch(x, augment, generator)
    return normalize(x, mean, std)


# Label of a synthetic non-digit in a training batch (see :func:`prepare_training_batch`).
OUTLIER = -1
_BLOCK = 4  # block side of the block-shuffled outliers
_WINDOW = 8  # fragment outliers keep one WINDOW x WINDOW window of a digit


def synthetic_outliers(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Non-digits made from a ``(K, 1, 28, 28)`` batch in [0, 1], four kinds in turn.

    Kinds (image ``i`` gets kind ``i % 4``): a flat grey level; the digit cut into 4x4
    blocks that are shuffled; smooth random blobs (uniform noise blurred with sigma
    2 px, contrast-stretched); a fragment (all but one random 8x8 window of the digit's
    20x20 box blacked out). Deliberately not the evaluation probes' pixel-level shuffle
    or white noise (:mod:`pipeline.quality.abstention`): those stay unseen kinds.
    """
    k, _, h, w = x.shape
    dev = x.device
    kind = torch.arange(k) % 4
    out = torch.empty_like(x)
    grey = torch.rand(k, generator=g).to(dev).reshape(k, 1, 1, 1).expand_as(x)
    # Block shuffle: (K, 49 blocks, 16 px) permuted along the block axis.
    nb = (h // _BLOCK) * (w // _BLOCK)
    blocks = x.reshape(k, h // _BLOCK, _BLOCK, w // _BLOCK, _BLOCK).permute(0, 1, 3, 2, 4)
    blocks = blocks.reshape(k, nb, _BLOCK * _BLOCK)
    perm = torch.argsort(torch.rand(k, nb, generator=g), dim=1).to(dev)
    blocks = torch.gather(blocks, 1, perm.unsqueeze(-1).expand_as(blocks))
    shuffled = (
        blocks.reshape(k, h // _BLOCK, w // _BLOCK, _BLOCK, _BLOCK)
        .permute(0, 1, 3, 2, 4)
        .reshape(k, 1, h, w)
    )
    blobs = imageops.gaussian_blur(torch.rand(k, 1, h, w, generator=g).to(dev), 2.0)
    lo = blobs.amin(dim=(2, 3), keepdim=True)
    hi = blobs.amax(dim=(2, 3), keepdim=True)
    blobs = (blobs - lo) / (hi - lo).clamp_min(1e-6)
    box_lo = (h - 20) // 2
    top = (box_lo + torch.randint(0, 20 - _WINDOW + 1, (k,), generator=g)).to(dev)
    left = (box_lo + torch.randint(0, 20 - _WINDOW + 1, (k,), generator=g)).to(dev)
    rows = torch.arange(h, device=dev).reshape(1, 1, h, 1)
    cols = torch.arange(w, device=dev).reshape(1, 1, 1, w)
    t, lf = top.reshape(k, 1, 1, 1), left.reshape(k, 1, 1, 1)
    window = (rows >= t) & (rows < t + _WINDOW) & (cols >= lf) & (cols < lf + _WINDOW)
    fragment = x * window
    kd = kind.to(dev).reshape(k, 1, 1, 1)
    out = torch.where(
        kd == 0, grey, torch.where(kd == 1, shuffled, torch.where(kd == 2, blobs, fragment))
    )
    return out


def prepare_training_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: float,
    std: float,
    augment: AugmentConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`prepare_batch` for training, plus outlier exposure.

    With ``augment.outliers.p > 0`` a random share of the (augmented) images is replaced
    by :func:`synthetic_outliers` of themselves and their labels by :data:`OUTLIER`;
    :func:`training_loss` trains those towards the uniform distribution. With ``p == 0``
    this is ``prepare_batch`` and the labels unchanged (same random numbers).
    """
    x = prepare_batch(images, mean, std, augment, generator)
    if not (augment.enabled and augment.outliers.p > 0):
        return x, labels
    idx = _subset(x.shape[0], augment.outliers.p, generator)
    if idx.numel() == 0:
        return x, labels
    dev_idx = idx.to(x.device, non_blocking=True)
    unit = x.index_select(0, dev_idx) * std + mean  # back to [0, 1] for the generator
    fake = normalize(synthetic_outliers(unit, generator), mean, std)
    y = labels.index_fill(0, dev_idx, OUTLIER)
    return x.index_copy(0, dev_idx, fake), y


def training_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float
) -> torch.Tensor:
    """Mean cross-entropy; rows labelled :data:`OUTLIER` are scored against the uniform
    distribution instead (outlier exposure, Hendrycks et al. 2019).

    Without outliers in the batch this equals
    ``F.cross_entropy(logits, labels, label_smoothing=label_smoothing)``.
    """
    digit = labels >= 0
    ce = F.cross_entropy(
        logits, labels.clamp_min(0), label_smoothing=label_smoothing, reduction="none"
    )
    uniform = -F.log_softmax(logits, dim=1).mean(dim=1)
    return torch.where(digit, ce, uniform).mean()
