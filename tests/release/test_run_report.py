"""pipeline/release/run_report.py: the run report reads the dvclive metrics and the run files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core.config import load_config
from pipeline.release.run_report import build_report, report_paths

ROOT = Path(__file__).resolve().parents[2]


def _dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_report_joins_metrics_and_run_information(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "params.yaml")
    paths = {name: tmp_path / p for name, p in report_paths(cfg).items()}
    assert paths["train"] == tmp_path / "metrics" / "train" / "metrics.json"
    assert paths["eval"] == tmp_path / "metrics" / "eval" / "metrics.json"
    _dump(paths["train"], {"val_accuracy": 0.9912, "train_seconds": 12.5})
    _dump(paths["train_run"], {"profile": "quick", "params_hash": "ab" * 32})
    _dump(paths["eval"], {"accuracy": 0.9931, "loss": 0.0213, "macro_f1": 0.993})
    _dump(paths["eval_run"], {"n": 10000, "errors": 69, "model_sha256": "cd" * 32})
    _dump(paths["per_class"], {str(c): {"precision": 0.5, "recall": 1.0} for c in range(10)})

    report = build_report(tmp_path, cfg, outcome="Completed")

    md = report.markdown
    assert "| val_accuracy | 0.9912 |" in md and "| profile | quick |" in md
    assert "| accuracy | 0.9931 |" in md and "| errors | 69 of 10000 |" in md
    assert f"| model sha256 | {'cd' * 32} |" in md
    assert [r["class"] for r in report.per_class] == [str(c) for c in range(10)]
    assert report.per_class[0]["support"] is None  # optional field: n/a, not an error
    # Unwritten outputs are named, each with its file, not silently skipped.
    assert set(report.missing) == {"data_stats", "validation", "gate", "model_card"}
    assert f"- gate: {paths['gate']}: file missing" in md


def test_a_missing_run_file_is_reported_even_with_metrics_present(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "params.yaml")
    paths = {name: tmp_path / p for name, p in report_paths(cfg).items()}
    _dump(paths["eval"], {"accuracy": 0.99})
    report = build_report(tmp_path, cfg, outcome="Completed")
    assert "eval_run" in report.missing and "eval" not in report.missing
    assert f"**missing**: {paths['eval_run']}: file missing" in report.markdown


def test_gate_section_shows_every_check_with_observed_value_and_threshold(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "params.yaml")
    paths = {name: tmp_path / p for name, p in report_paths(cfg).items()}
    _dump(
        paths["gate"],
        {
            "passed": False,
            "candidate_accuracy": 0.995,
            "checks": [
                {
                    "name": "min_accuracy",
                    "passed": True,
                    "observed": 0.995,
                    "threshold": 0.99,
                    "message": "candidate accuracy 0.9950 >= floor 0.9900",
                },
                {
                    "name": "robust_noise",
                    "passed": False,
                    "observed": 0.8123,
                    "threshold": 0.9,
                    "message": "noise (severity 2) accuracy 0.8123 < floor 0.9000",
                },
            ],
            "quality": {"temperature": 1.2345, "ece_after": 0.004, "confidence_threshold": 0.97},
        },
    )
    md = build_report(tmp_path, cfg, outcome="Failed").markdown
    assert "**REJECTED**" in md
    assert (
        "| robust_noise | FAIL | 0.8123 | 0.9000 | noise (severity 2) accuracy 0.8123 < floor" in md
    )
    assert "| min_accuracy | pass | 0.9950 | 0.9900 |" in md
    assert "| temperature | 1.2345 |" in md and "| confidence threshold | 0.9700 |" in md
