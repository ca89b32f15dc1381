"""flows.dvc_tasks without Prefect: log streaming, DVC runs on a real (fake) project."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from flows.dvc_tasks import (
    command_env,
    dvc_push,
    gate_rejection,
    repro_gate,
    repro_stage,
    stale_stages,
    stream_command,
)
from pipeline.errors import GateRejected, OrchestrationError


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_stream_command_passes_lines_in_order_as_they_arrive(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "print('one'); sys.stdout.flush()\n"
        "print('two on stderr', file=sys.stderr); sys.stderr.flush()\n"
        "time.sleep(1.0)\n"
        "sys.stdout.write('progress 1\\rprogress 2\\n'); sys.stdout.flush()\n"
        "sys.exit(3)\n"
    )
    seen: list[tuple[float, str]] = []
    start = time.monotonic()
    result = stream_command(_py(code), tmp_path, lambda line: seen.append((time.monotonic(), line)))
    assert [line for _, line in seen] == ["one", "two on stderr", "progress 1", "progress 2"]
    assert result.returncode == 3 and not result.ok
    assert result.tail == ("one", "two on stderr", "progress 1", "progress 2")
    # Streamed, not collected at exit: the first line came before the one-second sleep ended.
    assert seen[0][0] - start < seen[-1][0] - start - 0.5


def test_stream_command_kills_the_child_when_the_sink_fails(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    code = (
        "import os, sys, time\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "print('first', flush=True)\n"
        "time.sleep(60)\n"
    )

    def sink(line: str) -> None:
        raise RuntimeError("logger broke")

    with pytest.raises(RuntimeError, match="logger broke"):
        stream_command(_py(code), tmp_path, sink)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_command_env_puts_this_interpreter_first() -> None:
    env = command_env({"PATH": "/usr/bin", "KEEP": "1"})
    assert env["PATH"].split(os.pathsep) == [str(Path(sys.executable).parent), "/usr/bin"]
    assert env["KEEP"] == "1" and env["PYTHONUNBUFFERED"] == "1"


def test_gate_rejection_message_lists_every_reason() -> None:
    err = gate_rejection({"passed": False, "reasons": ["accuracy 0.98 < 0.99", "parity failed"]})
    assert isinstance(err, GateRejected)
    assert str(err) == "gate rejected the candidate: accuracy 0.98 < 0.99; parity failed"
    assert err.reasons == ["accuracy 0.98 < 0.99", "parity failed"]


def test_gate_rejection_falls_back_to_failed_checks() -> None:
    err = gate_rejection(
        {
            "passed": False,
            "checks": [
                {"name": "parity", "passed": True, "message": "ok"},
                {"name": "min_accuracy", "passed": False, "message": "0.98 < 0.99"},
            ],
        }
    )
    assert str(err) == "gate rejected the candidate: min_accuracy: 0.98 < 0.99"
    assert "no reasons" in str(gate_rejection({"passed": False}))


def test_stages_through_dvc_status_and_push(fake_project: Path) -> None:
    lines: list[str] = []
    results = [
        repro_stage(fake_project, s, lines.append)
        for s in ("ingest", "validate", "train", "evaluate", "export")
    ]
    assert all(r.ran for r in results)
    assert repro_gate(fake_project, "gate", Path("reports/gate.json"), lines.append).ran
    assert repro_stage(fake_project, "promote", lines.append).ran
    # The stage's own output (stdout and stderr) reached the sink.
    assert "fake train: starting" in lines and "fake train: a line on stderr" in lines
    assert stale_stages(fake_project) == {}
    # DVC, not the flow, decides staleness: a second run skips the stage.
    assert not repro_stage(fake_project, "train", lines.append).ran
    dvc_push(fake_project, lines.append)
    remote = fake_project.parent / "remote"
    assert any(p.is_file() for p in remote.rglob("*"))


def test_status_reports_what_is_stale(fake_project: Path) -> None:
    repro_stage(fake_project, "ingest", print)
    status = stale_stages(fake_project)
    assert "validate" in status  # never ran: DVC says so


def test_rejecting_gate_raises_gate_rejected_with_reasons(fake_project: Path) -> None:
    for s in ("ingest", "validate", "train", "evaluate", "export"):
        repro_stage(fake_project, s, print)
    params = fake_project / "params.yaml"
    params.write_text(params.read_text().replace("min_accuracy: 0.99\n", "min_accuracy: 0.999\n"))
    with pytest.raises(GateRejected, match=r"candidate accuracy 0.9950 < floor 0.9990") as info:
        repro_gate(fake_project, "gate", Path("reports/gate.json"), print)
    assert info.value.reasons == ["candidate accuracy 0.9950 < floor 0.9990"]
    assert json.loads((fake_project / "reports/gate.json").read_text())["passed"] is False


def test_broken_gate_is_not_mistaken_for_a_rejection(fake_project: Path) -> None:
    # The gate fails before writing a report (its input is missing): a plain stage failure,
    # even though an old rejecting report lies around from an earlier run.
    report = fake_project / "reports/gate.json"
    report.parent.mkdir(parents=True)
    report.write_text(json.dumps({"passed": False, "reasons": ["old"]}))
    with pytest.raises(OrchestrationError, match="stage 'gate'") as info:
        repro_gate(fake_project, "gate", Path("reports/gate.json"), print)
    assert not isinstance(info.value, GateRejected)
