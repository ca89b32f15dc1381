"""The gate: accept or reject the exported candidate, measured through onnxruntime.

Checks (each recorded with its observed value and threshold in ``reports/gate.json``):

- ``parity``: ``metrics/parity.json`` passed and was computed on this exact ONNX file.
- ``min_accuracy``: candidate ONNX test accuracy >= ``gate.min_accuracy``.
- ``max_regression``: candidate accuracy >= production accuracy - ``gate.max_regression``,
  both recomputed now on the same test set; skipped (recorded as such) when there is
  no production model yet, so only the floor applies.

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

from pipeline.atomic import sha256_file, write_json
from pipeline.config import Config, GateConfig
from pipeline.contract import MODEL_FILE
from pipeline.errors import ArtifactError, GateRejected, ModelFileError
from pipeline.json_io import read_json
from pipeline.onnx_runtime import onnx_accuracy

log = logging.getLogger("pipeline.gate")


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


def decide(
    candidate_path: Path,
    production_path: Path | None,
    images: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.uint8],
    cfg: GateConfig,
    parity_path: Path | None = None,
    batch_size: int = 1000,
) -> GateDecision:
    """Measure candidate (and production, if given and present) ONNX accuracy and decide."""
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
    checks = accuracy_checks(cand_acc, prod_acc, cfg)
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
    from pipeline.dataset import dataset_version, load_split

    # A report from an earlier run must not outlive a gate that crashes half-way:
    # promote would otherwise trust it.
    Path(cfg.gate.report_path).unlink(missing_ok=True)
    test = load_split(cfg.data.prepared_dir, "test")
    decision = decide(
        cfg.export.onnx_path,
        Path(cfg.registry.production_dir) / MODEL_FILE,
        np.asarray(test.images),
        np.asarray(test.labels),
        cfg.gate,
        parity_path=cfg.export.parity_path,
        batch_size=cfg.evaluate.batch_size,
    )
    report = {
        **decision.to_dict(),
        "candidate_path": str(cfg.export.onnx_path),
        "dataset_version": dataset_version(cfg.data.prepared_dir),
        "n": len(test),
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
