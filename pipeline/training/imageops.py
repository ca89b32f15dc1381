"""Batched image degradations with a parameter per image, shared by training and the suite.

Every op takes ``x``: ``(B, 1, H, W) float32`` in ``[0, 1]`` (white digit on black) on
any device and per-image parameters as ``(B,)`` tensors on the same device (a Python
float is broadcast), and returns a new tensor of the same shape, still in ``[0, 1]``.
No op draws random numbers: callers pass them in (drawn from an explicit generator),
so :mod:`pipeline.training.augment` and :mod:`pipeline.quality.robustness` stay reproducible.

torchvision's ``transforms.v2.functional`` ops apply ONE parameter set to a whole batch;
training and the suite need a different rotation, sigma or patch per image in a single
tensor op, hence this small module of plain tensor code (grid_sample, grouped
convolutions, max-pooling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.core.contract import DIGIT_BOX, IMAGE_SIDE

Param = torch.Tensor | float


def _per_image(p: Param, x: torch.Tensor) -> torch.Tensor:
    """``p`` as a ``(B, 1, 1, 1)`` float tensor on ``x``'s device."""
    t = torch.as_tensor(p, dtype=torch.float32, device=x.device)
    return t.expand(x.shape[0]).reshape(-1, 1, 1, 1) if t.ndim == 0 else t.reshape(-1, 1, 1, 1)


def affine_theta(
    angle_rad: torch.Tensor,
    scale: torch.Tensor,
    shear: torch.Tensor,
    shift_px: torch.Tensor,
    side: int,
) -> torch.Tensor:
    """``(B, 2, 3)`` sampling matrices for ``F.affine_grid`` of a forward transform.

    The image is sheared (``x += shear * y``), scaled by ``scale``, rotated by
    ``angle_rad`` (counter-clockwise on screen is negative here; only |angle| matters for
    the suite and the sign is random), then shifted by ``shift_px`` ``(B, 2)`` pixels.
    ``affine_grid`` maps output to input coordinates, so the matrix is the inverse.
    """
    b = angle_rad.shape[0]
    cos, sin = torch.cos(angle_rad), torch.sin(angle_rad)
    fwd = torch.zeros(b, 2, 2, dtype=torch.float32, device=angle_rad.device)
    # R @ (scale * Sh), Sh = [[1, shear], [0, 1]]
    fwd[:, 0, 0] = cos * scale
    fwd[:, 0, 1] = (cos * shear - sin) * scale
    fwd[:, 1, 0] = sin * scale
    fwd[:, 1, 1] = (sin * shear + cos) * scale
    inv = torch.linalg.inv(fwd)
    t = shift_px.to(torch.float32) * (2.0 / side)  # pixels -> normalised coordinates
    theta = torch.empty(b, 2, 3, dtype=torch.float32, device=angle_rad.device)
    theta[:, :, :2] = inv
    theta[:, :, 2] = -(inv @ t.unsqueeze(-1)).squeeze(-1)
    return theta


def warp(
    x: torch.Tensor, theta: torch.Tensor, displacement_px: torch.Tensor | None = None
) -> torch.Tensor:
    """Resample ``x`` through affine ``theta`` ``(B, 2, 3)`` plus an optional displacement.

    ``displacement_px``: ``(B, 2, H, W)`` per-pixel offsets (x, y) in pixels, added to the
    sampling grid (elastic deformation). Out-of-image pixels are 0 (background).
    """
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    if displacement_px is not None:
        h, w = x.shape[-2:]
        scale = torch.tensor([2.0 / w, 2.0 / h], device=x.device)
        grid = grid + displacement_px.permute(0, 2, 3, 1) * scale
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def blur_matrices(sigma: torch.Tensor, side: int) -> torch.Tensor:
    """``(B, side, side)`` matrices ``G[b, i, j] = g(i - j) / sum_k g(k)``, ``g`` a Gaussian.

    A 1-D Gaussian blur with zero padding as a matrix (``y = G @ v``); sigma 0 gives the
    identity. The normaliser runs over the whole infinite kernel (truncated at 4 sigma),
    so border pixels lose the mass that falls outside the image, like zero padding.
    """
    s = sigma.to(torch.float32).clamp_min(1e-3).reshape(-1, 1, 1)
    i = torch.arange(side, dtype=torch.float32, device=sigma.device)
    d = (i.reshape(1, -1, 1) - i.reshape(1, 1, -1)) ** 2
    radius = torch.arange(-side, side + 1, dtype=torch.float32, device=sigma.device)
    norm = torch.exp(-0.5 * (radius.reshape(1, 1, -1) / s) ** 2).sum(dim=-1, keepdim=True)
    return torch.exp(-0.5 * d / s**2) / norm


def gaussian_blur(x: torch.Tensor, sigma: Param) -> torch.Tensor:
    """Separable Gaussian blur, one sigma (pixels) per image (or one for all); zero padding.

    Computed as ``G @ x @ G.T`` with :func:`blur_matrices`: two small batched matmuls,
    much faster on a CPU than a grouped convolution with a per-image kernel.
    """
    h, w = x.shape[-2:]
    if h != w:
        raise ValueError(f"gaussian_blur expects square images, got {h}x{w}")
    if isinstance(sigma, torch.Tensor):
        s = sigma.to(device=x.device, dtype=torch.float32).reshape(-1)
    else:  # one matrix, broadcast over the batch
        s = torch.tensor([float(sigma)], device=x.device)
    g = blur_matrices(s, h).unsqueeze(1)  # (B or 1, 1, H, H)
    return g @ x @ g.transpose(-1, -2)


def smooth_field(uniform: torch.Tensor, alpha: Param, sigma: float) -> torch.Tensor:
    """Elastic displacement in pixels (Simard et al. 2003): ``alpha * blur(U[-1, 1], sigma)``.

    ``uniform``: ``(B, 2, H, W)`` in ``[0, 1)``; returns ``(B, 2, H, W)``.
    """
    field = gaussian_blur(uniform * 2.0 - 1.0, float(sigma))
    return field * _per_image(alpha, uniform)


def add_gaussian_noise(x: torch.Tensor, sigma255: Param, normal: torch.Tensor) -> torch.Tensor:
    """``clamp(x + sigma255 / 255 * normal)``: sigma on the 0..255 scale, normal ~ N(0, 1)."""
    return (x + _per_image(sigma255, x) / 255.0 * normal).clamp_(0.0, 1.0)


def salt_and_pepper(x: torch.Tensor, fraction: Param, uniform: torch.Tensor) -> torch.Tensor:
    """Set a ``fraction`` of pixels to 0 or 1 (half each); ``uniform``: ``x``-shaped U[0, 1)."""
    f = _per_image(fraction, x)
    out = torch.where(uniform < f / 2, torch.zeros_like(x), x)
    return torch.where((uniform >= f / 2) & (uniform < f), torch.ones_like(x), out)


def reduce_contrast(x: torch.Tensor, factor: Param) -> torch.Tensor:
    """Blend each image with its own mean: ``m + factor * (x - m)`` (torchvision's definition)."""
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (m + _per_image(factor, x) * (x - m)).clamp_(0.0, 1.0)


def reduce_brightness(x: torch.Tensor, factor: Param) -> torch.Tensor:
    """``x * factor``: a dimmer digit on the same black background."""
    return (x * _per_image(factor, x)).clamp_(0.0, 1.0)


def _cross_max(x: torch.Tensor) -> torch.Tensor:
    """Max over each pixel and its 4 neighbours (a 3x3 cross); outside the image is ignored."""
    h, w = x.shape[-2:]
    p = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    out = torch.maximum(p[..., 1 : h + 1, 1 : w + 1], p[..., 0:h, 1 : w + 1])
    out = torch.maximum(out, p[..., 2 : h + 2, 1 : w + 1])
    out = torch.maximum(out, p[..., 1 : h + 1, 0:w])
    return torch.maximum(out, p[..., 1 : h + 1, 2 : w + 2])


def morph(x: torch.Tensor, radius_px: float, dilate: bool) -> torch.Tensor:
    """Grey-scale dilation (thicker strokes) or erosion (thinner) by ``radius_px`` pixels.

    ``floor(radius_px)`` steps of a 3x3 cross, then the fractional rest as a blend with
    one more step (``(1 - f) * y + f * step(y)``): MNIST strokes are only 2-4 px wide,
    so sub-pixel amounts matter, and this stays one cheap pooling pass per step.
    Erosion is the dual (``-dilate(-x)``). ``radius_px`` 0 is the identity.
    """
    if radius_px <= 0:
        return x
    y = x if dilate else -x
    whole, frac = int(radius_px), radius_px - int(radius_px)
    for _ in range(whole):
        y = _cross_max(y)
    if frac > 1e-6:
        y = (1.0 - frac) * y + frac * _cross_max(y)
    return (y if dilate else -y).clamp(0.0, 1.0)


def occlude(
    x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: Param, width: Param
) -> torch.Tensor:
    """Black out one rectangle per image: rows ``[top, top+h)``, columns ``[left, left+w)``."""
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device).reshape(1, 1, h, 1)
    cols = torch.arange(w, device=x.device).reshape(1, 1, 1, w)
    t, lf = _per_image(top, x), _per_image(left, x)
    hh, ww = _per_image(height, x), _per_image(width, x)
    inside = (rows >= t) & (rows < t + hh) & (cols >= lf) & (cols < lf + ww)
    return x.masked_fill(inside, 0.0)


def occlusion_boxes(
    n: int, size: float, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(top, left, height, width)`` ``(n,)`` CPU tensors of the occluders for level ``size``.

    The geometry the robustness suite's occlusion family and training's occlusion
    augmentation share. Half the images get a ``size`` x ``size`` patch, half a bar
    ``size / 2`` px thick (horizontal or vertical, as long as the digit box); all lie
    inside the central box.
    """
    u = torch.rand(n, 4, generator=g)
    bar = u[:, 0] < 0.5
    vertical = u[:, 1] < 0.5
    thick = max(1.0, round(size / 2))
    h = torch.where(bar, torch.where(vertical, float(DIGIT_BOX), thick), float(size))
    w = torch.where(bar, torch.where(vertical, thick, float(DIGIT_BOX)), float(size))
    lo = (IMAGE_SIDE - DIGIT_BOX) / 2
    top = torch.floor(lo + u[:, 2] * (DIGIT_BOX - h + 1))
    left = torch.floor(lo + u[:, 3] * (DIGIT_BOX - w + 1))
    return top, left, h, w
