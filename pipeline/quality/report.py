"""Model quality beyond clean accuracy: robustness, calibration and abstention together.

:func:`assess` runs, for one *predict* function (PyTorch module or onnxruntime session,
``(n, 28, 28) uint8 -> (n, 10) logits``):

1. the robustness suite on the test split (:mod:`pipeline.quality.robustness`);
2. temperature scaling fitted on the VALIDATION split, ECE/NLL on test before and after
   (:mod:`pipeline.quality.calibration`);
3. the confidence threshold chosen on validation (calibrated probabilities) for
   ``quality.target_precision``, its coverage/precision on test, and the share of
   non-digit probes flagged not confident (:mod:`pipeline.quality.abstention`).

:func:`quality_checks` turns a report into gate checks (per-family floors at
``quality.severity`` and the ECE ceiling), each with observed value and threshold.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.core.config import GateConfig, QualityConfig
from pipeline.core.errors import ConfigError
from pipeline.quality.abstention import (
    ProbeReport,
    Selective,
    Threshold,
    choose_threshold,
    make_probes,
    probe_report,
    selective,
)
from pipeline.quality.calibration import (
    CalibrationReport,
    Reliability,
    calibrate,
    reliability,
    reliability_png,
    softmax,
)
from pipeline.quality.robustness import FAMILY_NAMES, Predict, SuiteResult, run_suite

Images = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class QualityReport:
    suite: SuiteResult
    calibration: CalibrationReport
    threshold: Threshold  # chosen on validation
    test: Selective  # that threshold on the test split
    probes: ProbeReport
    severity: int
    reliability_before: Reliability  # test split, before temperature scaling
    reliability_after: Reliability

    def metrics(self) -> dict[str, Any]:
        """Numbers only, nested (dvclive summary / metrics JSON)."""
        return {
            "robustness": self.suite.metrics(),
            "robustness_min_at_severity": round(self.suite.worst(self.severity)[1], 6),
            "calibration": {
                k: v for k, v in self.calibration.to_dict().items() if isinstance(v, float | int)
            },
            "abstention": {
                "threshold": round(self.threshold.threshold, 6),
                "target_precision": self.threshold.target_precision,
                "val_coverage": round(self.threshold.coverage, 6),
                "val_precision": round(self.threshold.precision, 6),
                "test_coverage": round(self.test.coverage, 6),
                "test_precision": round(self.test.precision, 6),
                "probes_flagged": round(self.probes.flagged_all, 6),
                **{f"flagged_{k}": round(v, 6) for k, v in self.probes.flagged.items()},
            },
        }

    def compact(self) -> dict[str, Any]:
        """The short summary that travels in ONNX metadata and model cards."""
        return {
            "robustness": json.loads(self.suite.compact_json()),
            "severity_checked": self.severity,
            "temperature": round(self.calibration.temperature, 4),
            "ece_before": round(self.calibration.ece_before, 5),
            "ece_after": round(self.calibration.ece_after, 5),
            "confidence_threshold": round(self.threshold.threshold, 6),
            "target_precision": self.threshold.target_precision,
            "coverage": round(self.test.coverage, 5),
            "probes_flagged": round(self.probes.flagged_all, 4),
        }

    def compact_json(self) -> str:
        return json.dumps(self.compact(), separators=(",", ":"), sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": {
                "version": self.suite.version,
                "seed": self.suite.seed,
                "n": self.suite.n,
                "clean_accuracy": self.suite.clean_accuracy,
                "rows": self.suite.rows(),
            },
            "calibration": self.calibration.to_dict(),
            "threshold": asdict(self.threshold),
            "test": asdict(self.test),
            "probes": self.probes.to_dict(),
            "severity": self.severity,
        }


def _logits(predict: Predict, images: Images) -> npt.NDArray[np.float64]:
    out = [np.asarray(predict(images[i : i + 1000])) for i in range(0, len(images), 1000)]
    return np.concatenate(out).astype(np.float64)


def assess(
    predict: Predict,
    val_images: Images,
    val_labels: npt.ArrayLike,
    test_images: Images,
    test_labels: npt.ArrayLike,
    cfg: QualityConfig,
    device: str = "cpu",
) -> QualityReport:
    """Robustness, calibration and abstention of ``predict`` (returns LOGITS).

    ``val_*``: the validation split carved from training (fits the temperature and the
    threshold); ``test_*``: the test split (only measured). Inputs are read, never written.
    """
    val_y = np.asarray(val_labels, dtype=np.int64)
    test_y = np.asarray(test_labels, dtype=np.int64)
    if len(val_y) == 0:
        raise ConfigError("quality: the validation split is empty (train.val_size: 0)")
    val_z = _logits(predict, np.asarray(val_images))
    test_z = _logits(predict, np.asarray(test_images))
    cal = calibrate(val_z, val_y, test_z, test_y, cfg.calibration_bins)
    t = cal.temperature
    val_p, test_p = softmax(val_z, t), softmax(test_z, t)
    thr = choose_threshold(val_p.max(1), val_p.argmax(1) == val_y, cfg.target_precision)
    test_sel = selective(test_p.max(1), test_p.argmax(1) == test_y, thr.threshold)
    probes = make_probes(np.asarray(test_images), cfg.n_probes, cfg.seed)
    probe = probe_report(lambda im: softmax(_logits(predict, im), t), probes, thr.threshold)
    n = cfg.n_images or len(test_y)
    suite = run_suite(predict, test_images[:n], test_y[:n], seed=cfg.seed, device=device)
    bins = cfg.calibration_bins
    return QualityReport(
        suite,
        cal,
        thr,
        test_sel,
        probe,
        cfg.severity,
        reliability(softmax(test_z), test_y, bins),
        reliability(test_p, test_y, bins),
    )


def robustness_png(suite: SuiteResult, title: str) -> bytes:
    """Accuracy against severity (0 = clean) per family, three panels by group, as PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.quality.robustness import get_family

    groups = ("geometric", "photometric", "shape")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), sharey=True)
    for ax, group in zip(axes, groups, strict=True):
        for name, accs in suite.accuracy.items():
            if get_family(name).group != group:
                continue
            ax.plot(
                range(len(accs) + 1),
                [100 * suite.clean_accuracy, *(100 * a for a in accs)],
                marker="o",
                label=name,
            )
        ax.set_title(group)
        ax.set_xlabel("severity (0 = clean)")
        ax.set_xticks(range(4))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("test accuracy (%)")
    fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def log_to_live(live: Any, report: QualityReport, title: str = "") -> None:
    """Log ``report`` into an open ``dvclive.Live`` (no step): nested metrics under
    ``robustness/``, ``calibration/``, ``abstention/``; plots ``robustness`` (accuracy by
    severity, one line per family) and ``reliability`` (before/after); both PNGs.
    """

    def flat(prefix: str, tree: dict[str, Any]) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                flat(f"{prefix}{key}/", value)
            elif isinstance(value, int | float) and not isinstance(value, bool):
                live.log_metric(f"{prefix}{key}", value, plot=False)

    flat("", report.metrics())
    clean = [
        {"family": f, "severity": 0, "accuracy": round(report.suite.clean_accuracy, 6)}
        for f in report.suite.accuracy
    ]
    rows = clean + [
        {"family": r["family"], "severity": r["severity"], "accuracy": r["accuracy"]}
        for r in report.suite.rows()
    ]
    live.log_plot(
        "robustness",
        rows,
        x="severity",
        y="accuracy",
        template="linear",
        title="Accuracy by perturbation severity (0 = clean)",
        x_label="severity",
        y_label="accuracy",
    )
    rel = [{**r, "which": "before"} for r in report.reliability_before.rows()]
    rel += [{**r, "which": "after"} for r in report.reliability_after.rows()]
    live.log_plot(
        "reliability",
        rel,
        x="confidence",
        y="accuracy",
        template="scatter",
        title="Reliability (test split, before/after temperature scaling)",
        x_label="confidence",
        y_label="accuracy",
    )
    live.log_image("robustness.png", _png_image(robustness_png(report.suite, title)))
    live.log_image(
        "reliability.png",
        _png_image(reliability_png(report.reliability_before, report.reliability_after, title)),
    )


def _png_image(data: bytes) -> Any:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data))


def model_card_section(report: QualityReport) -> str:
    """Markdown for the model card: robustness table, calibration, abstention."""
    from pipeline.quality.robustness import get_family

    s = report.severity
    lines = [
        "## Robustness, calibration and abstention",
        "",
        f"Suite `{report.suite.version}` (seed {report.suite.seed}, {report.suite.n} test "
        f"images per copy), clean accuracy {100 * report.suite.clean_accuracy:.2f}%. "
        f"The gate checks severity {s}.",
        "",
        "| family | levels 1 / 2 / 3 | accuracy 1 / 2 / 3 (%) |",
        "|---|---|---|",
    ]
    for name, accs in report.suite.accuracy.items():
        fam = get_family(name)
        levels = " / ".join(f"{v:g}" for v in fam.levels)
        lines.append(
            f"| {name} ({fam.unit}) | {levels} | "
            + " / ".join(f"{100 * a:.2f}" for a in accs)
            + " |"
        )
    c, t, p = report.calibration, report.threshold, report.probes
    bins = len(report.reliability_before.count)
    lines += [
        "",
        f"- Calibration: temperature {c.temperature:.3f} fitted on {c.n_fit} validation "
        f"images; test ECE ({bins} bins) {100 * c.ece_before:.2f}% before, "
        f"{100 * c.ece_after:.2f}% after; NLL {c.nll_before:.4f} -> {c.nll_after:.4f}. "
        "The `probabilities` output includes the temperature; `logits` do not.",
        f"- Abstention: confident when the top probability >= {t.threshold:.4f} (chosen on "
        f"validation for {100 * t.target_precision:.1f}% precision); test coverage "
        f"{100 * report.test.coverage:.2f}% at precision {100 * report.test.precision:.2f}%.",
        f"- Non-digit probes flagged not confident: {100 * p.flagged_all:.1f}% ("
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in p.flagged.items())
        + f"; {p.n_per_probe} each).",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class QualityCheck:
    """Same fields as the gate's ``Check`` (kept here so this module needs no gate import)."""

    name: str
    passed: bool
    observed: float | None
    threshold: float | None
    message: str


def quality_checks(report: QualityReport, gate: GateConfig) -> list[QualityCheck]:
    """Gate checks: one per family at ``report.severity``, and the ECE after scaling.

    ``gate.min_robust_accuracy`` None disables the family floors (``robust_floors``
    entries still apply); ``gate.max_ece`` None disables the ECE check. An unknown
    family in ``gate.robust_floors`` is a :class:`ConfigError`.
    """
    unknown = sorted(set(gate.robust_floors) - set(FAMILY_NAMES))
    if unknown:
        raise ConfigError(
            f"gate.robust_floors: unknown families {unknown}; known: {', '.join(FAMILY_NAMES)}"
        )
    checks: list[QualityCheck] = []
    s = report.severity
    for family in FAMILY_NAMES:
        floor = gate.robust_floors.get(family, gate.min_robust_accuracy)
        if floor is None or family not in report.suite.accuracy:
            continue
        acc = report.suite.at(family, s)
        ok = acc >= floor
        checks.append(
            QualityCheck(
                f"robust_{family}",
                ok,
                acc,
                floor,
                f"{family} (severity {s}) accuracy {acc:.4f} {'>=' if ok else '<'} "
                f"floor {floor:.4f}",
            )
        )
    if gate.max_ece is not None:
        e = report.calibration.ece_after
        ok = e <= gate.max_ece
        checks.append(
            QualityCheck(
                "max_ece",
                ok,
                e,
                gate.max_ece,
                f"ECE after temperature scaling {100 * e:.2f}% {'<=' if ok else '>'} "
                f"allowed {100 * gate.max_ece:.2f}%",
            )
        )
    return checks
