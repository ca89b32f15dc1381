"""benchmarks/load_test.py, run for real (briefly) against a real server subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_brief_load_test_has_zero_errors(tmp_path: Path, onnx_models: tuple[Path, Path]) -> None:
    out = tmp_path / "serving.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "load_test.py"),
            "--duration",
            "1.5",
            "--concurrency",
            "1",
            "8",
            "32",
            "--model",
            str(onnx_models[0]),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert [lvl["concurrency"] for lvl in report["levels"]] == [1, 8, 32]
    assert report["total_errors"] == 0
    for lvl in report["levels"]:
        assert lvl["errors"] == 0 and lvl["ok"] > 0
        assert 0 < lvl["p50_ms"] <= lvl["p95_ms"] <= lvl["p99_ms"] <= lvl["max_ms"]
    assert report["model"]["provider"] == "CPUExecutionProvider"
    assert "| concurrency |" in result.stdout
