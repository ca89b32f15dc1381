"""The evaluate stage: test-set metrics, confusion matrix and the worst mistakes.

Everything is computed from the PyTorch logits of the candidate on the 10,000 test
images (raw pixels through :class:`pipeline.handoff.export.RawPixelClassifier`, i.e. the same
normalisation the exported graph applies). Outputs (paths from ``cfg.evaluate``):

- ``metrics/eval/`` (dvclive, ``live_dir``): ``metrics.json`` with numbers only (accuracy,
  loss = mean cross-entropy without label smoothing, macro F1; DVC metrics) and
  ``plots/sklearn/confusion_matrix.json`` (dvclive's confusion plot data, drawn by
  ``dvc plots show``: actual digit on the vertical axis, predicted on the horizontal).
- ``reports/eval/run.json``: what was evaluated (model, model sha256, dataset version),
  ``n`` and ``errors``.
- ``reports/eval/per_class.json``: precision/recall/F1/support per digit.
- ``reports/eval/confusion.png`` (same orientation) and ``reports/eval/mistakes.png``.

Quality beyond clean accuracy (:func:`pipeline.quality.report.assess`): the
robustness suite on the test split, the temperature fitted on the VALIDATION split
training held out (:func:`pipeline.data.holdout.validation_split`; never the test split) with
ECE/NLL on test before and after, and the confidence threshold chosen on validation for
``quality.target_precision`` with its test coverage and the share of non-digit probes
flagged. Into the same dvclive directory go the numbers (``robustness/<family>/s<k>``,
``calibration/*``, ``abstention/*`` in ``metrics.json``), the plot data
``plots/custom/robustness.json`` (accuracy by severity, a row per family and severity)
and ``plots/custom/reliability.json`` (before/after), and both as PNG under
``plots/images/``. ``evaluate.quality_path`` holds the whole report with the fitted
temperature and threshold (the export stage puts them into the ONNX graph and its
metadata), ``evaluate.quality_card_path`` the model card section.

Which model is measured: evaluate runs before export (dvc.yaml: train -> evaluate ->
export -> gate), so these figures come from the PyTorch module through the same
raw-pixel wrapper that is exported. What is gated is what is served: when any quality
threshold of the gate is set, the gate stage runs the same suite again through
onnxruntime on the exported file and checks those numbers (:mod:`pipeline.release.gate`).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.core.atomic import sha256_file, write_bytes, write_json, write_text
from pipeline.core.config import Config, EvaluateConfig
from pipeline.core.contract import NUM_CLASSES
from pipeline.core.dirswap import atomic_dir
from pipeline.quality.report import QualityReport
from pipeline.training.model_io import LoadedModel

log = logging.getLogger("pipeline.quality.evaluate")

# dvclive writes it to <live_dir>/plots/sklearn/<name>.json; dvc.yaml's plots name the file.
CONFUSION_PLOT = "confusion_matrix"
Logits = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class EvalResult:
    """Metrics of ``n`` predictions. ``confusion[actual, predicted]`` counts, ``(10, 10)``."""

    n: int
    accuracy: float
    loss: float
    confusion: IntArray
    precision: tuple[float, ...]
    recall: tuple[float, ...]
    f1: tuple[float, ...]
    support: tuple[int, ...]

    @property
    def errors(self) -> int:
        return int(self.n - np.trace(self.confusion))

    @property
    def macro_f1(self) -> float:
        return float(np.mean(self.f1))

    def summary(self) -> dict[str, float]:
        """The numbers of ``metrics.json``: what experiments are compared by.

        ``errors`` and ``n`` are left to ``run.json``: they follow from the accuracy,
        and every column counts in ``dvc exp show``.
        """
        return {"accuracy": self.accuracy, "loss": self.loss, "macro_f1": self.macro_f1}

    def per_class(self) -> dict[str, dict[str, float | int]]:
        return {
            str(c): {
                "precision": self.precision[c],
                "recall": self.recall[c],
                "f1": self.f1[c],
                "support": self.support[c],
            }
            for c in range(NUM_CLASSES)
        }


def log_softmax(logits: Logits) -> npt.NDArray[np.float64]:
    """Numerically stable log-softmax over axis 1, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    out: npt.NDArray[np.float64] = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return out


def confusion_matrix(actual: npt.ArrayLike, predicted: npt.ArrayLike) -> IntArray:
    """``(10, 10) int64``: rows actual, columns predicted."""
    a = np.asarray(actual, dtype=np.int64)
    p = np.asarray(predicted, dtype=np.int64)
    if a.shape != p.shape:
        raise ValueError(f"actual {a.shape} and predicted {p.shape} differ in shape")
    for name, arr in (("actual", a), ("predicted", p)):
        if arr.size and (arr.min() < 0 or arr.max() >= NUM_CLASSES):
            raise ValueError(f"{name} labels must be in 0..{NUM_CLASSES - 1}")
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(cm, (a, p), 1)
    return cm


def _safe_div(num: npt.NDArray[Any], den: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    # A class never predicted (or absent) gets 0, not NaN: JSON-able and conservative.
    out: npt.NDArray[np.float64] = np.divide(
        num, den, out=np.zeros(num.shape, dtype=np.float64), where=den > 0
    )
    return out


def compute_metrics(logits: Logits, labels: npt.ArrayLike) -> EvalResult:
    """Metrics of ``(N, 10)`` logits against ``(N,)`` labels in 0..9 (N >= 1)."""
    y = np.asarray(labels, dtype=np.int64)
    z = np.asarray(logits)
    if z.ndim != 2 or z.shape[1] != NUM_CLASSES or z.shape[0] != y.shape[0]:
        raise ValueError(
            f"logits must be (N, {NUM_CLASSES}) for {y.shape[0]} labels, got {z.shape}"
        )
    if y.size == 0:
        raise ValueError("cannot evaluate an empty test set")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or Inf")
    pred = z.argmax(axis=1)
    cm = confusion_matrix(y, pred)
    tp = np.diag(cm).astype(np.float64)
    precision = _safe_div(tp, cm.sum(axis=0).astype(np.float64))
    recall = _safe_div(tp, cm.sum(axis=1).astype(np.float64))
    f1 = _safe_div(2 * precision * recall, precision + recall)
    loss = float(-log_softmax(z)[np.arange(y.size), y].mean())
    return EvalResult(
        n=int(y.size),
        accuracy=float((pred == y).mean()),
        loss=loss,
        confusion=cm,
        precision=tuple(float(v) for v in precision),
        recall=tuple(float(v) for v in recall),
        f1=tuple(float(v) for v in f1),
        support=tuple(int(v) for v in cm.sum(axis=1)),
    )


def worst_mistakes(logits: Logits, labels: npt.ArrayLike, k: int) -> IntArray:
    """Indices of up to ``k`` misclassified images, most confident wrong answer first."""
    y = np.asarray(labels, dtype=np.int64)
    probs = np.exp(log_softmax(logits))
    pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(pred != y)
    conf = probs[wrong, pred[wrong]]
    # Stable sort on -confidence: ties keep test-set order, so the figure is reproducible.
    order = np.argsort(-conf, kind="stable")
    out: IntArray = wrong[order[:k]].astype(np.int64)
    return out


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def confusion_png(cm: IntArray, title: str) -> bytes:
    """Heat map of the confusion matrix with counts, as PNG bytes."""
    return _png(confusion_figure(cm, title))


def confusion_figure(cm: IntArray, title: str) -> Any:
    """The heat map as a matplotlib figure: rows (y axis) actual, columns (x axis) predicted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    # Log colour scale: the diagonal (~1000) would otherwise wash out the errors (~1-10).
    ax.imshow(np.log1p(cm), cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        if v:
            color = "white" if np.log1p(v) > 0.6 * np.log1p(cm.max()) else "black"
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(NUM_CLASSES))
    ax.set_yticks(range(NUM_CLASSES))
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    return fig


def mistakes_png(
    images: npt.NDArray[np.uint8],
    labels: npt.ArrayLike,
    logits: Logits,
    indices: IntArray,
    title: str,
) -> bytes:
    """Grid of the given test images titled ``#idx true->pred (p)``, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.asarray(labels, dtype=np.int64)
    probs = np.exp(log_softmax(logits))
    cols = 6
    rows = max(1, -(-len(indices) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.5, rows * 1.7), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, indices.tolist(), strict=False):
        p = int(probs[i].argmax())
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"#{i} {y[i]}\u2192{p} ({probs[i, p]:.2f})", fontsize=7)
    if len(indices) == 0:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle(title, fontsize=9)
    return _png(fig)


def log_metrics(
    live_dir: Path,
    result: EvalResult,
    labels: npt.ArrayLike,
    pred: IntArray,
    quality: QualityReport | None = None,
) -> Path:
    """Write ``live_dir`` with dvclive, atomically as a whole; return the metrics file.

    ``metrics.json`` holds only numbers (accuracy, loss, macro F1: what people compare
    across experiments). ``plots/sklearn/confusion_matrix.json`` is dvclive's
    confusion plot data, one ``{"actual", "predicted"}`` row per image; dvc.yaml draws it
    with actual digits on the vertical axis and predicted on the horizontal one, like
    :func:`confusion_png`. With ``quality``, its numbers (nested under ``robustness``,
    ``calibration``, ``abstention``) and plots are added
    (:func:`pipeline.quality.report.log_to_live`).
    """
    from pipeline.core.live_files import FileLive

    with atomic_dir(live_dir) as tmp:
        # dvc.yaml declares the metrics and plots: dvclive writes only the files. No
        # end()/context manager: under `dvc exp run` end() would `git add` files of the
        # staging directory and talk to Studio; make_summary() writes metrics.json.
        live = FileLive(str(tmp))
        for name, value in result.summary().items():
            live.log_metric(name, value, plot=False)  # one evaluation: no per-step series
        live.log_sklearn_plot(
            "confusion_matrix",
            np.asarray(labels, dtype=np.int64),
            pred,
            name=CONFUSION_PLOT,
            title="Test set confusion matrix",
            x_label="predicted digit",
            y_label="actual digit",
        )
        if quality is not None:
            from pipeline.quality.report import log_to_live

            log_to_live(live, quality, f"test accuracy {result.accuracy:.4f}")
        live.make_summary()
    return Path(live_dir) / "metrics.json"


def write_reports(
    cfg: EvaluateConfig,
    result: EvalResult,
    logits: Logits,
    images: npt.NDArray[np.uint8],
    labels: npt.ArrayLike,
    run_info: dict[str, Any],
    quality: QualityReport | None = None,
) -> dict[str, Any]:
    """Write every evaluate output; return the numbers of ``metrics.json``.

    ``run_info`` (model, hashes, dataset version) goes to ``cfg.run_info_path`` with ``n``
    and ``errors``, not into the DVC metrics, so ``dvc metrics show`` lists numbers only.
    With ``quality``: its metrics and plots join the dvclive directory, and
    ``cfg.quality_path`` / ``cfg.quality_card_path`` are written (see
    :func:`quality_record`).
    """
    pred = np.asarray(logits).argmax(axis=1).astype(np.int64)
    log_metrics(cfg.live_dir, result, labels, pred, quality)
    if quality is not None:
        from pipeline.quality.report import model_card_section

        write_json(cfg.quality_path, quality_record(quality, run_info))
        write_text(cfg.quality_card_path, model_card_section(quality))
    write_json(cfg.run_info_path, {**run_info, "n": result.n, "errors": result.errors})
    write_json(cfg.per_class_path, result.per_class())
    title = f"test accuracy {result.accuracy:.4f} (n={result.n})"
    write_bytes(cfg.confusion_png, confusion_png(result.confusion, title))
    idx = worst_mistakes(logits, labels, cfg.n_mistakes)
    write_bytes(
        cfg.mistakes_png,
        mistakes_png(images, labels, logits, idx, f"most confident mistakes ({len(idx)})"),
    )
    return {**result.summary(), **(quality.metrics() if quality is not None else {})}


def quality_record(quality: QualityReport, run_info: dict[str, Any]) -> dict[str, Any]:
    """The JSON of ``evaluate.quality_path``: what the export stage builds the model from.

    ``temperature`` and ``confidence_threshold`` at full float precision (the graph's
    constant and the served threshold), ``compact`` (the summary for ONNX metadata and
    model cards), ``model_sha256`` (which model file they belong to), the full report.
    """
    return {
        "model_sha256": run_info.get("model_sha256"),
        "dataset_version": run_info.get("dataset_version"),
        "temperature": quality.calibration.temperature,
        "confidence_threshold": quality.threshold.threshold,
        "compact": quality.compact(),
        "report": quality.to_dict(),
    }


def evaluate_model(
    model: LoadedModel, images: npt.NDArray[np.uint8], labels: npt.ArrayLike, batch_size: int
) -> tuple[EvalResult, Logits]:
    """PyTorch (CPU) logits and metrics of ``model`` on ``(N, 28, 28) uint8`` images."""
    from pipeline.training.model_io import torch_logits

    logits = torch_logits(model, images, batch_size)
    return compute_metrics(logits, labels), logits


def run_evaluate_stage(cfg: Config) -> dict[str, Any]:
    """Evaluate ``cfg.train.model_path`` on the prepared test split; return the metrics."""
    from pipeline.data.dataset import dataset_version, load_split
    from pipeline.training.model_io import load_model_file

    model = load_model_file(cfg.train.model_path)
    test = load_split(cfg.data.prepared_dir, "test")
    images, labels = np.asarray(test.images), np.asarray(test.labels)
    result, logits = evaluate_model(model, images, labels, cfg.evaluate.batch_size)
    run_info = {
        "model": model.name,
        "model_sha256": sha256_file(cfg.train.model_path),
        "dataset_version": dataset_version(cfg.data.prepared_dir),
    }
    quality = assess_quality(cfg, model, images, labels)
    metrics = write_reports(cfg.evaluate, result, logits, images, labels, run_info, quality)
    log.info(
        "evaluate: accuracy %.4f, loss %.4f, %d errors of %d; temperature %.3f, "
        "ECE %.4f -> %.4f, confidence threshold %.4f (test coverage %.4f)",
        result.accuracy,
        result.loss,
        result.errors,
        result.n,
        quality.calibration.temperature,
        quality.calibration.ece_before,
        quality.calibration.ece_after,
        quality.threshold.threshold,
        quality.test.coverage,
    )
    return metrics


def assess_quality(
    cfg: Config,
    model: LoadedModel,
    test_images: npt.NDArray[np.uint8],
    test_labels: npt.ArrayLike,
) -> QualityReport:
    """:func:`pipeline.quality.report.assess` of the PyTorch raw-pixel module of ``model``.

    ``test_images``: ``(N, 28, 28) uint8``. The validation split is the one training held
    out (``train.val_size``, ``train.seed``, ``train.max_train_samples``), read from
    ``data.prepared_dir``; nothing is written there.
    """
    from pipeline.data.dataset import load_split
    from pipeline.data.holdout import validation_split
    from pipeline.quality.report import assess
    from pipeline.quality.robustness import torch_predictor
    from pipeline.training.model_io import wrap

    val = validation_split(load_split(cfg.data.prepared_dir, "train"), cfg.train)
    return assess(
        torch_predictor(wrap(model), cfg.evaluate.batch_size),
        np.asarray(val.images),
        np.asarray(val.labels),
        test_images,
        test_labels,
        cfg.quality,
    )
