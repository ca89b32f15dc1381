"""Abstention: when the model should say "not confident", and how often it does.

A prediction is *confident* when its top-class probability (the calibrated
``probabilities`` output) is at least a threshold. :func:`choose_threshold` picks the
lowest threshold whose accepted VALIDATION predictions reach a target precision (e.g.
99.9% correct among the accepted), i.e. the largest coverage for that precision; the
test set only reports coverage and precision at that threshold.

Non-digit probes (:func:`make_probes`) check the other side: inputs that are not a
digit should be flagged not confident. Four kinds, made from the test split with a seed:

- ``blank``: a uniform image, grey level drawn in 0..255 per image (a quarter all-black);
- ``uniform_noise``: every pixel uniform in 0..255;
- ``shuffled``: a test digit with its 784 pixels randomly permuted (same ink, no shape);
- ``occluded``: a test digit with all but a random 8x8 window of its 20x20 box blacked
  out (84% of the digit box hidden).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.core.contract import DIGIT_BOX, IMAGE_SIDE

PROBES = ("blank", "uniform_noise", "shuffled", "occluded")
Images = npt.NDArray[np.uint8]
PredictProba = Callable[[Images], npt.NDArray[np.floating[Any]]]

_WINDOW = 8


@dataclass(frozen=True)
class Threshold:
    """The chosen confidence threshold and what it gives on the set it was chosen on."""

    threshold: float
    target_precision: float
    coverage: float  # share of inputs accepted (confidence >= threshold)
    precision: float  # accuracy among the accepted
    n: int
    achievable: bool  # False: no threshold reaches the target; the strictest is used


def choose_threshold(
    confidence: npt.ArrayLike, correct: npt.ArrayLike, target_precision: float
) -> Threshold:
    """Lowest threshold whose accepted set ``{confidence >= t}`` has precision >= target.

    ``confidence``: ``(N,)`` top-class probabilities; ``correct``: ``(N,)`` bools.
    Among all prefixes of the inputs sorted by confidence (descending), the longest one
    with precision >= target wins; ties in confidence are kept together (a threshold
    cannot split them). If none reaches the target, the highest confidence is used and
    ``achievable`` is False.
    """
    c = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    if c.shape != ok.shape or c.ndim != 1 or c.size == 0:
        raise ValueError(f"confidence and correct must be equal-length 1-D, got {c.shape}")
    if not 0 < target_precision <= 1:
        raise ValueError(f"target_precision must be in (0, 1], got {target_precision}")
    order = np.argsort(-c, kind="stable")
    cs, oks = c[order], ok[order]
    hits = np.cumsum(oks)
    k = np.arange(1, c.size + 1)
    # Only prefixes ending at the last of a group of equal confidences are thresholds.
    last_of_tie = np.append(cs[1:] != cs[:-1], True)
    good = (hits / k >= target_precision - 1e-12) & last_of_tie
    if good.any():
        end = int(np.flatnonzero(good)[-1])
        achievable = True
    else:
        end = int(np.flatnonzero(last_of_tie)[0])
        achievable = False
    return Threshold(
        threshold=float(cs[end]),
        target_precision=target_precision,
        coverage=float((end + 1) / c.size),
        precision=float(hits[end] / (end + 1)),
        n=int(c.size),
        achievable=achievable,
    )


@dataclass(frozen=True)
class Selective:
    """Coverage and precision of a threshold on a labelled set."""

    threshold: float
    coverage: float
    precision: float
    n: int


def selective(confidence: npt.ArrayLike, correct: npt.ArrayLike, threshold: float) -> Selective:
    c = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    accepted = c >= threshold
    n_acc = int(accepted.sum())
    return Selective(
        threshold=threshold,
        coverage=float(n_acc / c.size),
        precision=float(ok[accepted].mean()) if n_acc else float("nan"),
        n=int(c.size),
    )


def make_probes(images: Images, n: int, seed: int) -> dict[str, Images]:
    """``n`` images per probe kind, ``(n, 28, 28) uint8``, built from ``images`` (read only)."""
    rng = np.random.default_rng(seed)
    side = IMAGE_SIDE
    src = np.asarray(images)
    pick = rng.choice(len(src), size=n, replace=len(src) < n)
    levels = rng.integers(0, 256, size=n)
    levels[: n // 4] = 0
    blank = np.broadcast_to(levels[:, None, None], (n, side, side)).astype(np.uint8)
    noise = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
    flat = src[pick].reshape(n, -1)
    perm = np.argsort(rng.random((n, side * side)), axis=1)
    shuffled = np.take_along_axis(flat, perm, axis=1).reshape(n, side, side).astype(np.uint8)
    occluded = src[rng.choice(len(src), size=n, replace=len(src) < n)].copy()
    lo = (side - DIGIT_BOX) // 2
    tops = rng.integers(lo, lo + DIGIT_BOX - _WINDOW + 1, size=n)
    lefts = rng.integers(lo, lo + DIGIT_BOX - _WINDOW + 1, size=n)
    for i in range(n):  # n is small (about 1000): clarity over vectorising
        keep = occluded[i, tops[i] : tops[i] + _WINDOW, lefts[i] : lefts[i] + _WINDOW].copy()
        occluded[i, lo : lo + DIGIT_BOX, lo : lo + DIGIT_BOX] = 0
        occluded[i, tops[i] : tops[i] + _WINDOW, lefts[i] : lefts[i] + _WINDOW] = keep
    return {"blank": blank, "uniform_noise": noise, "shuffled": shuffled, "occluded": occluded}


@dataclass(frozen=True)
class ProbeReport:
    """Share of each probe kind flagged not confident, and over all probes."""

    threshold: float
    flagged: dict[str, float]
    flagged_all: float
    n_per_probe: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_report(
    predict_proba: PredictProba, probes: dict[str, Images], threshold: float
) -> ProbeReport:
    """Run ``predict_proba`` (``(n, 28, 28) uint8`` -> ``(n, 10)`` probabilities) on each probe."""
    flagged: dict[str, float] = {}
    total = hits = 0
    for name, imgs in probes.items():
        conf = np.asarray(predict_proba(imgs)).max(axis=1)
        low = int((conf < threshold).sum())
        flagged[name] = low / len(imgs)
        total += len(imgs)
        hits += low
    sizes = {len(v) for v in probes.values()}
    return ProbeReport(
        threshold=threshold,
        flagged=flagged,
        flagged_all=hits / total,
        n_per_probe=sizes.pop() if len(sizes) == 1 else -1,
    )
