"""The robustness suite: seeded, perturbed copies of the test set, accuracy per family.

Thirteen families in three groups, each at three severities (1 mild, 2 the default
severity the gate checks, 3 strong); the levels are part of the suite's definition
(:data:`SUITE_VERSION`) so figures stay comparable across models and commits:

=========== ============ ====================================================== ==============
group       family       what changes (per image: random direction/sign/place)   levels 1/2/3
=========== ============ ====================================================== ==============
geometric   translate    shift by exactly L px in a random direction             2, 3, 4 px
geometric   rotate       rotation by ±L degrees                                 10, 20, 30
geometric   scale        zoom by 1 ± L                                          0.1, 0.2, 0.3
geometric   shear        horizontal shear (slant) ±L                            0.15, 0.3, 0.45
geometric   elastic      elastic field, alpha L px, sigma 4 px (Simard 2003)     24, 34, 44
photometric noise        additive Gaussian noise, sigma L on 0..255, clamped     20, 35, 50
photometric salt_pepper  share L of pixels set to 0 or 255                       0.02, 0.05, 0.1
photometric blur         Gaussian blur, sigma L px                               0.5, 1.0, 1.5
photometric contrast     contrast reduced to L (blend with the image mean)       0.5, 0.3, 0.15
photometric brightness   intensity multiplied by L                               0.6, 0.4, 0.25
shape       thin         erosion by L px (thinner strokes)                       0.25, 0.5, 0.75
shape       thick        dilation by L px (thicker strokes)                      0.5, 1.0, 1.5
shape       occlusion    black patch of L x L px or bar of L/2 px (half each),   4, 6, 8
                         placed at random over the central 20x20 digit box
=========== ============ ====================================================== ==============

Images are perturbed on the given device, :data:`CHUNK` at a time, each chunk with its
own ``torch.Generator`` seeded from ``(seed, family, severity, chunk index)``: the same
seed gives the same pixels on any device and for any prediction batch size. Results
are rounded back to ``uint8`` (what a client would send). Labels never change and the
inputs are never written to: the suite reads the test split and keeps copies in memory.

:func:`run_suite` takes any *predict* function from ``(n, 28, 28) uint8`` to ``(n, 10)``
scores, so the same suite runs on a PyTorch module or an onnxruntime session
(:func:`torch_predictor`, :func:`onnx_predictor`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from pipeline.core.contract import IMAGE_SIDE, INPUT_NAME, LOGITS, PIXEL_MAX
from pipeline.training import imageops

SUITE_VERSION = "robustness-v1"
CHUNK = 1000
SEVERITIES = (1, 2, 3)
DEFAULT_SEVERITY = 2
Group = Literal["geometric", "photometric", "shape"]
Images = npt.NDArray[np.uint8]
Scores = npt.NDArray[np.floating[Any]]
Predict = Callable[[Images], Scores]
# x (B, 1, 28, 28) float in [0, 1] on the device, level, CPU generator -> perturbed x
Apply = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]


def _cpu_to(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(x.device, non_blocking=True)


def _signs(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=g).to(torch.float32) * 2 - 1


def _affine(
    x: torch.Tensor,
    *,
    angle: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shear: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    n = x.shape[0]
    zeros, ones = torch.zeros(n), torch.ones(n)
    theta = imageops.affine_theta(
        angle if angle is not None else zeros,
        scale if scale is not None else ones,
        shear if shear is not None else zeros,
        shift if shift is not None else torch.zeros(n, 2),
        IMAGE_SIDE,
    )
    return imageops.warp(x, _cpu_to(theta, x))


def _translate(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    phi = torch.rand(x.shape[0], generator=g) * (2 * math.pi)
    return _affine(x, shift=torch.stack([torch.cos(phi), torch.sin(phi)], dim=1) * level)


def _rotate(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    return _affine(x, angle=_signs(x.shape[0], g) * math.radians(level))


def _scale(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    return _affine(x, scale=1.0 + _signs(x.shape[0], g) * level)


def _shear(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    return _affine(x, shear=_signs(x.shape[0], g) * level)


ELASTIC_SIGMA = 4.0


def _elastic(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    u = _cpu_to(torch.rand(n, 2, IMAGE_SIDE, IMAGE_SIDE, generator=g), x)
    disp = imageops.smooth_field(u, level, ELASTIC_SIGMA)
    theta = imageops.affine_theta(
        torch.zeros(n), torch.ones(n), torch.zeros(n), torch.zeros(n, 2), IMAGE_SIDE
    )
    return imageops.warp(x, _cpu_to(theta, x), disp)


def _noise(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    return imageops.add_gaussian_noise(x, level, _cpu_to(torch.randn(x.shape, generator=g), x))


def _salt_pepper(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    return imageops.salt_and_pepper(x, level, _cpu_to(torch.rand(x.shape, generator=g), x))


def _blur(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    return imageops.gaussian_blur(x, level)


def _contrast(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    return imageops.reduce_contrast(x, level)


def _brightness(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    return imageops.reduce_brightness(x, level)


def _thin(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    return imageops.morph(x, level, dilate=False)


def _thick(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    return imageops.morph(x, level, dilate=True)


def _occlusion(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    top, left, h, w = (_cpu_to(t, x) for t in imageops.occlusion_boxes(x.shape[0], level, g))
    return imageops.occlude(x, top, left, h, w)


@dataclass(frozen=True)
class Family:
    """One perturbation family: ``levels[s - 1]`` is the strength at severity ``s``."""

    name: str
    group: Group
    unit: str
    levels: tuple[float, float, float]
    apply: Apply = field(repr=False, compare=False)


FAMILIES: tuple[Family, ...] = (
    Family("translate", "geometric", "px", (2, 3, 4), _translate),
    Family("rotate", "geometric", "degrees", (10, 20, 30), _rotate),
    Family("scale", "geometric", "relative zoom", (0.1, 0.2, 0.3), _scale),
    Family("shear", "geometric", "shear factor", (0.15, 0.3, 0.45), _shear),
    Family("elastic", "geometric", "alpha px (sigma 4)", (24, 34, 44), _elastic),
    Family("noise", "photometric", "sigma on 0..255", (20, 35, 50), _noise),
    Family("salt_pepper", "photometric", "pixel share", (0.02, 0.05, 0.1), _salt_pepper),
    Family("blur", "photometric", "sigma px", (0.5, 1.0, 1.5), _blur),
    Family("contrast", "photometric", "contrast factor", (0.5, 0.3, 0.15), _contrast),
    Family("brightness", "photometric", "intensity factor", (0.6, 0.4, 0.25), _brightness),
    Family("thin", "shape", "erosion px", (0.25, 0.5, 0.75), _thin),
    Family("thick", "shape", "dilation px", (0.5, 1.0, 1.5), _thick),
    Family("occlusion", "shape", "patch side px (bar: half)", (4, 6, 8), _occlusion),
)
FAMILY_NAMES = tuple(f.name for f in FAMILIES)
_BY_NAME = {f.name: f for f in FAMILIES}


def get_family(name: str) -> Family:
    """The family called ``name``. Raises ``KeyError`` listing the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown perturbation family {name!r}; known: {FAMILY_NAMES}") from None


def chunk_seed(seed: int, family: str, severity: int, chunk: int) -> int:
    """A 63-bit generator seed for one chunk (stable across Python runs and platforms)."""
    digest = hashlib.sha256(f"{SUITE_VERSION}:{seed}:{family}:{severity}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def perturb(images: torch.Tensor, family: str, severity: int, seed: int) -> torch.Tensor:
    """A perturbed copy of ``images`` ``(N, 28, 28) uint8`` on their device (same shape/dtype).

    ``severity`` in 1..3. Deterministic for ``(seed, family, severity)``: chunk ``k``
    (images ``k*CHUNK .. (k+1)*CHUNK``) uses its own generator, see :func:`chunk_seed`.
    """
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    if images.dtype != torch.uint8 or images.ndim != 3:
        raise ValueError(
            f"images must be (N, H, W) uint8, got {tuple(images.shape)} {images.dtype}"
        )
    fam = get_family(family)
    level = float(fam.levels[severity - 1])
    out = torch.empty_like(images)
    for k, start in enumerate(range(0, images.shape[0], CHUNK)):
        g = torch.Generator().manual_seed(chunk_seed(seed, family, severity, k))
        x = images[start : start + CHUNK].unsqueeze(1).to(torch.float32) / PIXEL_MAX
        y = fam.apply(x, level, g)
        out[start : start + CHUNK] = (
            (y.squeeze(1) * PIXEL_MAX).round_().clamp_(0, 255).to(torch.uint8)
        )
    return out


@dataclass(frozen=True)
class SuiteResult:
    """Accuracy on the clean set and per ``family -> (severity 1, 2, 3)``."""

    clean_accuracy: float
    accuracy: dict[str, tuple[float, ...]]
    n: int
    seed: int
    version: str = SUITE_VERSION

    def at(self, family: str, severity: int = DEFAULT_SEVERITY) -> float:
        return self.accuracy[family][severity - 1]

    def worst(self, severity: int = DEFAULT_SEVERITY) -> tuple[str, float]:
        """The family with the lowest accuracy at ``severity`` and that accuracy."""
        name = min(self.accuracy, key=lambda f: self.accuracy[f][severity - 1])
        return name, self.at(name, severity)

    def metrics(self) -> dict[str, dict[str, float]]:
        """``{family: {"s1": acc, "s2": acc, "s3": acc}}`` (for dvclive/JSON)."""
        return {
            f: {f"s{i + 1}": round(a, 6) for i, a in enumerate(accs)}
            for f, accs in self.accuracy.items()
        }

    def rows(self) -> list[dict[str, Any]]:
        """One row per family and severity (a long table for ``dvc plots`` / pandas)."""
        out: list[dict[str, Any]] = []
        for f, accs in self.accuracy.items():
            fam = get_family(f)
            for i, a in enumerate(accs):
                out.append(
                    {
                        "family": f,
                        "group": fam.group,
                        "severity": i + 1,
                        "level": fam.levels[i],
                        "accuracy": round(a, 6),
                    }
                )
        return out

    def compact_json(self) -> str:
        """A short JSON (about 0.5 kB) for ONNX ``metadata_props`` and model cards."""
        payload = {
            "version": self.version,
            "seed": self.seed,
            "n": self.n,
            "clean": round(self.clean_accuracy, 4),
            "accuracy": {f: [round(a, 4) for a in accs] for f, accs in self.accuracy.items()},
        }
        return json.dumps(payload, separators=(",", ":"), sort_keys=True)


def _accuracy(predict: Predict, images: Images, labels: npt.NDArray[Any]) -> float:
    scores = np.asarray(predict(images))
    if scores.shape != (len(images), 10):
        raise ValueError(f"predict returned {scores.shape} for {len(images)} images")
    return float(np.mean(scores.argmax(axis=1) == np.asarray(labels, dtype=np.int64)))


def run_suite(
    predict: Predict,
    images: Images,
    labels: npt.NDArray[Any],
    seed: int = 0,
    families: Iterable[str] | None = None,
    severities: Sequence[int] = SEVERITIES,
    device: str | torch.device = "cpu",
) -> SuiteResult:
    """Accuracy of ``predict`` on the clean images and every family and severity.

    ``images``: ``(N, 28, 28) uint8`` (e.g. the memory-mapped test split: it is only
    read); ``labels``: ``(N,)`` ints 0..9. Perturbations run on ``device`` one family
    and severity at a time; ``predict`` gets ``(n, 28, 28) uint8`` numpy arrays of at
    most :data:`CHUNK` images and returns ``(n, 10)`` scores (logits or probabilities).
    """
    names = tuple(families) if families is not None else FAMILY_NAMES
    for name in names:
        get_family(name)
    y = np.asarray(labels, dtype=np.int64)
    src = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).to(device)
    clean = _suite_accuracy(predict, src, y)
    acc: dict[str, tuple[float, ...]] = {}
    for name in names:
        acc[name] = tuple(
            _suite_accuracy(predict, perturb(src, name, s, seed), y) for s in severities
        )
    return SuiteResult(clean_accuracy=clean, accuracy=acc, n=len(y), seed=seed)


def _suite_accuracy(predict: Predict, images: torch.Tensor, y: npt.NDArray[np.int64]) -> float:
    correct = 0
    for start in range(0, images.shape[0], CHUNK):
        batch = images[start : start + CHUNK].cpu().numpy()
        correct += round(_accuracy(predict, batch, y[start : start + CHUNK]) * len(batch))
    return correct / len(y)


def torch_predictor(module: nn.Module, batch_size: int = CHUNK) -> Predict:
    """Predict with a *raw-pixel* module (``(n, 1, 28, 28)`` float 0..255 in, logits out).

    ``module`` is e.g. :class:`pipeline.handoff.export.RawPixelClassifier` (its first output,
    the logits, is used when it returns a tuple); it is put in eval mode.
    """
    module.eval()

    @torch.no_grad()
    def predict(images: Images) -> Scores:
        outs = []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.asarray(images[i : i + batch_size], dtype=np.float32))
            out = module(x.unsqueeze(1))
            outs.append((out[0] if isinstance(out, tuple) else out).float().numpy())
        return np.concatenate(outs)

    return predict


def onnx_predictor(session: Any, output: str = LOGITS, batch_size: int = CHUNK) -> Predict:
    """Predict with an ``onnxruntime.InferenceSession`` of the contract's model."""

    def predict(images: Images) -> Scores:
        outs = []
        for i in range(0, len(images), batch_size):
            x = np.ascontiguousarray(images[i : i + batch_size], dtype=np.float32)[:, None]
            outs.append(session.run([output], {INPUT_NAME: x})[0])
        return np.concatenate(outs)

    return predict
