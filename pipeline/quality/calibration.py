"""Calibration: ECE, NLL, reliability diagrams, and temperature scaling fitted on validation.

A classifier is calibrated when, among the inputs it answers with confidence ``c``,
a share ``c`` is right. Measures (numpy, float64):

- :func:`ece`: expected calibration error of the top-label confidence over
  :data:`N_BINS` equal-width bins (Guo et al. 2017), in [0, 1];
- :func:`nll`: mean negative log-likelihood of the true class;
- :func:`reliability`: per-bin count, mean confidence and accuracy (the diagram's data),
  :func:`reliability_png` draws it.

:func:`fit_temperature` finds the ``T > 0`` minimising the NLL of ``softmax(logits / T)``
on the VALIDATION split (LBFGS on ``log T``, so ``T`` stays positive); the test set is
never used to fit. Dividing by ``T`` keeps the argmax. :func:`with_temperature` wraps a
raw-pixel module so that its ``probabilities`` output is ``softmax(logits / T)`` while
``logits`` stay as they were: that is what the export puts in the ONNX graph.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

N_BINS = 15
FloatArray = npt.NDArray[np.float64]


def softmax(logits: npt.ArrayLike, temperature: float = 1.0) -> FloatArray:
    """Row-wise softmax of ``(N, K)`` logits divided by ``temperature``, float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: FloatArray = e / e.sum(axis=1, keepdims=True)
    return out


def nll(logits: npt.ArrayLike, labels: npt.ArrayLike, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` (N,) under ``softmax(logits / T)``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    m = z.max(axis=1, keepdims=True)
    log_p = z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))
    y = np.asarray(labels, dtype=np.int64)
    return float(-log_p[np.arange(y.size), y].mean())


@dataclass(frozen=True)
class Reliability:
    """Per bin ``[i / n_bins, (i + 1) / n_bins)`` (the last one closed): counts and means.

    ``confidence[i]`` and ``accuracy[i]`` are NaN for an empty bin.
    """

    edges: tuple[float, ...]
    count: tuple[int, ...]
    confidence: tuple[float, ...]
    accuracy: tuple[float, ...]

    @property
    def ece(self) -> float:
        n = sum(self.count)
        return float(
            sum(
                c / n * abs(a - p)
                for c, a, p in zip(self.count, self.accuracy, self.confidence, strict=True)
                if c
            )
        )

    def rows(self) -> list[dict[str, float | int]]:
        """Non-empty bins as rows (for a ``dvc plots`` JSON)."""
        return [
            {
                "bin_low": self.edges[i],
                "bin_high": self.edges[i + 1],
                "count": self.count[i],
                "confidence": round(self.confidence[i], 6),
                "accuracy": round(self.accuracy[i], 6),
            }
            for i in range(len(self.count))
            if self.count[i]
        ]


def reliability(probs: npt.ArrayLike, labels: npt.ArrayLike, n_bins: int = N_BINS) -> Reliability:
    """Reliability-diagram data of ``(N, K)`` probabilities against ``(N,)`` labels."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2 or p.shape[0] != y.shape[0] or y.size == 0:
        raise ValueError(f"probs must be (N, K) for {y.shape[0]} labels (N >= 1), got {p.shape}")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bin i holds (edges[i], edges[i+1]] as in Guo et al.; confidence 0 cannot occur.
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return Reliability(
        edges=tuple(float(e) for e in edges),
        count=tuple(int(c) for c in count),
        confidence=tuple(float(c) for c in mean_conf),
        accuracy=tuple(float(a) for a in acc),
    )


def ece(probs: npt.ArrayLike, labels: npt.ArrayLike, n_bins: int = N_BINS) -> float:
    """Expected calibration error (top label, ``n_bins`` equal-width bins), in [0, 1]."""
    return reliability(probs, labels, n_bins).ece


def fit_temperature(logits: npt.ArrayLike, labels: npt.ArrayLike, max_iter: int = 100) -> float:
    """The temperature ``T`` minimising the NLL of ``softmax(logits / T)`` (LBFGS on log T).

    Use VALIDATION logits: fitting on the test set would make the test ECE meaningless.
    Returns a float in ``[1e-2, 1e2]``; raises ``ValueError`` for empty or non-finite input.
    """
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if z.ndim != 2 or z.shape[0] != y.shape[0] or y.numel() == 0:
        raise ValueError(f"logits must be (N, K) for {y.shape[0]} labels (N >= 1)")
    if not torch.isfinite(z).all():
        raise ValueError("logits contain NaN or Inf")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):
        raise ValueError("temperature fit diverged")
    return min(max(t, 1e-2), 1e2)


@dataclass(frozen=True)
class CalibrationReport:
    """Temperature fitted on validation; ECE/NLL on the evaluation set before and after."""

    temperature: float
    n_fit: int
    n_eval: int
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    val_nll_before: float
    val_nll_after: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def calibrate(
    val_logits: npt.ArrayLike,
    val_labels: npt.ArrayLike,
    eval_logits: npt.ArrayLike,
    eval_labels: npt.ArrayLike,
    n_bins: int = N_BINS,
) -> CalibrationReport:
    """Fit ``T`` on the validation logits; report ECE and NLL on the evaluation (test) logits."""
    t = fit_temperature(val_logits, val_labels)
    return CalibrationReport(
        temperature=t,
        n_fit=len(np.asarray(val_labels)),
        n_eval=len(np.asarray(eval_labels)),
        ece_before=ece(softmax(eval_logits), eval_labels, n_bins),
        ece_after=ece(softmax(eval_logits, t), eval_labels, n_bins),
        nll_before=nll(eval_logits, eval_labels),
        nll_after=nll(eval_logits, eval_labels, t),
        val_nll_before=nll(val_logits, val_labels),
        val_nll_after=nll(val_logits, val_labels, t),
    )


class TemperatureScaled(nn.Module):
    """``module(image) -> (logits, probabilities)`` with ``probabilities = softmax(logits / T)``.

    ``module`` returns ``(logits, probabilities)`` (e.g. the export's raw-pixel wrapper)
    or bare logits; its logits are passed through unchanged. ``T`` is a float32 buffer,
    so it becomes a constant of the exported graph.
    """

    temperature: torch.Tensor

    def __init__(self, module: nn.Module, temperature: float) -> None:
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {temperature}")
        self.module = module
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.module(image)
        logits = out[0] if isinstance(out, tuple) else out
        return logits, torch.softmax(logits / self.temperature, dim=1)


def with_temperature(module: nn.Module, temperature: float) -> nn.Module:
    """The export hook: ``module`` with calibrated probabilities (identity for ``T == 1``)."""
    return TemperatureScaled(module, temperature).eval()


def reliability_png(before: Reliability, after: Reliability | None, title: str) -> bytes:
    """Reliability diagram (accuracy against confidence per bin) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    for data, label, marker in ((before, "before", "o"), (after, "after (temperature)", "s")):
        if data is None:
            continue
        rows = data.rows()
        ax.plot(
            [r["confidence"] for r in rows],
            [r["accuracy"] for r in rows],
            marker=marker,
            label=f"{label}: ECE {100 * data.ece:.2f}%",
        )
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
