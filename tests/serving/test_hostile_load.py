"""The bounded hostile-input load test, for real: 20 s at concurrency 8 against
``python -m pipeline serve`` on loopback (benchmarks/hostile_load_test.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_hostile_mix_is_refused_with_4xx_bounded_rss_and_fast_valid_requests(
    tmp_path: Path, onnx_models: tuple[Path, Path]
) -> None:
    out = tmp_path / "hostile.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "hostile_load_test.py"),
            "--duration",
            "20",
            "--concurrency",
            "8",
            "--model",
            str(onnx_models[0]),
            "--max-p99-ms",
            "1e9",  # judged below, against the machine's load
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.is_file(), result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert result.returncode == 0, result.stdout + result.stderr  # statuses, 5xx, RSS
    assert report["requests"] > 1000 and report["valid_ok"] > 500
    assert not any(s.startswith("5") for s in report["statuses"]), report["statuses"]
    hostile = {k: v for k, v in report["by_kind"].items() if not k.startswith("valid")}
    assert set(hostile) == {
        "lying_jpeg_6000",
        "huge_png_6300",
        "lying_png_2000",
        "onnx_as_image",
        "bad_json",
    }
    assert all(set(v) <= {"400", "422"} for v in hostile.values()), hostile
    assert report["rss_peak_mib"] < 1536
    p99 = report["valid_p99_ms"]
    load = report["load_average_before"][0]
    cpus = os.cpu_count() or 1
    if p99 >= 50 and load > cpus:
        # Client, server and other people's jobs share these CPUs: say so, visibly.
        pytest.xfail(f"valid p99 {p99} ms not judged: load average {load} on {cpus} CPUs")
    assert p99 < 50, result.stdout
