"""The gate: accept or reject the exported candidate, measured through onnxruntime.

Checks (each recorded with its observed value and threshold in ``reports/gate.json``):

- ``parity``: ``metrics/parity.json`` passed and was computed on this exact ONNX file.
- ``min_accuracy``: candidate ONNX test accuracy >= ``gate.min_accuracy``.
- ``max_regression``: candidate accuracy >= production accuracy - ``gate.max_regression``,
  both recomputed now on the same test set; skipped (recorded as such) when there is
  no production model yet, so only the floor applies.
- quality, only when a threshold is set (``gate.min_robust_accuracy``,
  ``gate.robust_floors``, ``gate.max_ece``; null/empty = off, and the suite is not even
  run): :func:`pipeline.quality.report.assess` of the candidate ONNX file through onnxruntime
  -- what is gated is what is served -- with the temperature and the threshold fitted on
  the validation split training held out, then :func:`pipeline.quality.report.quality_checks`:
  ``robust_<family>`` (accuracy at ``quality.severity`` >= its floor) and ``max_ece``
  (ECE after temperature scaling). A failed one names the family in the reason. The
  evaluate stage measured the same suite on the PyTorch module before export; the gate
  re-measures it on the exported graph because that is the file promote installs.

The report says ``"decision": "accepted"`` or ``"rejected"``. Rejection writes the report
first, then raises :class:`GateRejected`, so ``python -m pipeline gate`` prints one line
and exits non-zero: a CI check.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.core.atomic import sha256_file, write_json
from pipeline.core.config import Config, GateConfig, QualityConfig
from pipeline.core.contract import MODEL_FILE
from pipeline.core.errors import ArtifactError, ConfigError, GateRejected, ModelFileError
from pipeline.core.json_io import read_json
from pipeline.handoff.onnx_runtime import onnx_accuracy
from pipeline.quality.report import QualityReport

log = logging.getLogger("pipeline.release.gate")


@dataclass(frozen=True)
class Check:
    """One gate condition. ``observed``/``threshold`` are None only when not applicable."""

    name: str
    passed: bool
    observed: float | str | None
    threshold: float | str | None
    message: str


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    checks: tuple[Check, ...]
    candidate_sha256: str
    candidate_accuracy: float
    production_sha256: str | None
    production_accuracy: float | None

    @property
    def reasons(self) -> list[str]:
        """Messages of the failed checks."""
        return [c.message for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        out = {"decision": "accepted" if self.passed else "rejected", **asdict(self)}
        out["checks"] = [asdict(c) for c in self.checks]
        out["reasons"] = self.reasons
        return out


def accuracy_checks(
    candidate_accuracy: float, production_accuracy: float | None, cfg: GateConfig
) -> list[Check]:
    """The floor and the regression check (pure: accuracies in, checks out)."""
    floor = Check(
        "min_accuracy",
        candidate_accuracy >= cfg.min_accuracy,
        candidate_accuracy,
        cfg.min_accuracy,
        f"candidate accuracy {candidate_accuracy:.4f} "
        f"{'>=' if candidate_accuracy >= cfg.min_accuracy else '<'} "
        f"floor {cfg.min_accuracy:.4f}",
    )
    if production_accuracy is None:
        regression = Check(
            "max_regression",
            True,
            None,
            cfg.max_regression,
            "no production model: regression check not applicable",
        )
    else:
        drop = production_accuracy - candidate_accuracy
        ok = drop <= cfg.max_regression + 1e-12  # float slack: 0.9900-0.9880 is not 0.002
        regression = Check(
            "max_regression",
            ok,
            drop,
            cfg.max_regression,
            f"accuracy drop vs production {drop:+.4f} (production {production_accuracy:.4f}, "
            f"candidate {candidate_accuracy:.4f}) {'<=' if ok else '>'} "
            f"allowed {cfg.max_regression:.4f}",
        )
    return [floor, regression]


def parity_check(parity_path: Path, candidate_sha256: str) -> Check:
    """The export stage's parity report must exist, have passed, and be about this file."""
    try:
        report = read_json(parity_path, "parity report", "run the export stage")
    except ArtifactError as err:
        return Check("parity", False, "unreadable", "passed", str(err))
    if report.get("onnx_sha256") != candidate_sha256:
        return Check(
            "parity",
            False,
            str(report.get("onnx_sha256")),
            candidate_sha256,
            f"{parity_path} was computed for another ONNX file; re-run the export stage",
        )
    ok = report.get("passed") is True
    return Check(
        "parity",
        ok,
        "passed" if ok else "failed",
        "passed",
        f"parity report {'passed' if ok else 'failed'} "
        f"(max |dlogit| {report.get('max_abs_diff')}, atol {report.get('atol')})",
    )


def quality_enabled(cfg: GateConfig) -> bool:
    """Whether any robustness/calibration threshold is set (otherwise the suite is skipped)."""
    return cfg.min_robust_accuracy is not None or bool(cfg.robust_floors) or cfg.max_ece is not None


def robustness_checks(
    candidate_path: Path,
    val_images: npt.NDArray[np.uint8],
    val_labels: npt.NDArray[np.uint8],
    test_images: npt.NDArray[np.uint8],
    test_labels: npt.NDArray[np.uint8],
    gate: GateConfig,
    quality: QualityConfig,
) -> tuple[list[Check], QualityReport]:
    """The quality checks of the ONNX file at ``candidate_path``, through onnxruntime (CPU).

    ``val_*``: the held-out validation split (fits the temperature and threshold);
    ``test_*``: the test split, ``(N, 28, 28) uint8`` and ``(N,)`` labels. Returns the
    checks (:func:`pipeline.quality.report.quality_checks`, same fields as :class:`Check`) and
    the report. An unknown family in ``gate.robust_floors`` is a :class:`ConfigError`,
    raised before anything is measured.
    """
    from pipeline.handoff.onnx_runtime import create_session
    from pipeline.quality.report import assess, quality_checks
    from pipeline.quality.robustness import FAMILY_NAMES, onnx_predictor

    unknown = sorted(set(gate.robust_floors) - set(FAMILY_NAMES))
    if unknown:
        raise ConfigError(
            f"gate.robust_floors: unknown families {unknown}; known: {', '.join(FAMILY_NAMES)}"
        )
    session = create_session(Path(candidate_path), "cpu")
    report = assess(
        onnx_predictor(session.session), val_images, val_labels, test_images, test_labels, quality
    )
    checks = [
        Check(c.name, c.passed, c.observed, c.threshold, c.message)
        for c in quality_checks(report, gate)
    ]
    return checks, report


def decide(
    candidate_path: Path,
    production_path: Path | None,
    images: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.uint8],
    cfg: GateConfig,
    parity_path: Path | None = None,
    batch_size: int = 1000,
    extra_checks: tuple[Check, ...] = (),
) -> GateDecision:
    """Measure candidate (and production, if given and present) ONNX accuracy and decide.

    ``extra_checks`` (e.g. :func:`robustness_checks`) are appended and count like the others.
    """
    candidate_path = Path(candidate_path)
    if not candidate_path.is_file():
        raise ModelFileError(f"{candidate_path}: candidate ONNX missing; run the export stage")
    cand_sha = sha256_file(candidate_path)
    cand_acc = onnx_accuracy(candidate_path, images, labels, batch_size)
    prod_sha: str | None = None
    prod_acc: float | None = None
    if production_path is not None and Path(production_path).is_file():
        prod_sha = sha256_file(Path(production_path))
        prod_acc = onnx_accuracy(Path(production_path), images, labels, batch_size)
    checks = accuracy_checks(cand_acc, prod_acc, cfg) + list(extra_checks)
    if parity_path is not None:
        checks.insert(0, parity_check(parity_path, cand_sha))
    return GateDecision(
        passed=all(c.passed for c in checks),
        checks=tuple(checks),
        candidate_sha256=cand_sha,
        candidate_accuracy=cand_acc,
        production_sha256=prod_sha,
        production_accuracy=prod_acc,
    )


def run_gate_stage(cfg: Config) -> GateDecision:
    """Decide on ``cfg.export.onnx_path``, write ``cfg.gate.report_path``, raise if rejected."""
    from pipeline.data.dataset import dataset_version, load_split

    # A report from an earlier run must not outlive a gate that crashes half-way:
    # promote would otherwise trust it.
    Path(cfg.gate.report_path).unlink(missing_ok=True)
    test = load_split(cfg.data.prepared_dir, "test")
    images, labels = np.asarray(test.images), np.asarray(test.labels)
    extra: list[Check] = []
    quality: QualityReport | None = None
    if quality_enabled(cfg.gate) and Path(cfg.export.onnx_path).is_file():
        from pipeline.data.holdout import validation_split

        val = validation_split(load_split(cfg.data.prepared_dir, "train"), cfg.train)
        extra, quality = robustness_checks(
            cfg.export.onnx_path,
            np.asarray(val.images),
            np.asarray(val.labels),
            images,
            labels,
            cfg.gate,
            cfg.quality,
        )
    decision = decide(
        cfg.export.onnx_path,
        Path(cfg.registry.production_dir) / MODEL_FILE,
        images,
        labels,
        cfg.gate,
        parity_path=cfg.export.parity_path,
        batch_size=cfg.evaluate.batch_size,
        extra_checks=tuple(extra),
    )
    report = {
        **decision.to_dict(),
        "candidate_path": str(cfg.export.onnx_path),
        "dataset_version": dataset_version(cfg.data.prepared_dir),
        "n": len(test),
        # The ONNX candidate's robustness/calibration summary; null when no quality
        # threshold is set (the suite was not run).
        "quality": None if quality is None else quality.compact(),
        "decided_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_json(cfg.gate.report_path, report)
    if not decision.passed:
        raise GateRejected("candidate rejected: " + "; ".join(decision.reasons), decision.reasons)
    log.info(
        "gate: passed (accuracy %.4f, production %s)",
        decision.candidate_accuracy,
        "none" if decision.production_accuracy is None else f"{decision.production_accuracy:.4f}",
    )
    return decision
