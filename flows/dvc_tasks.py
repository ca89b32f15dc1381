"""DVC commands as Prefect tasks, with their output streamed into the run logger.

Each pipeline stage runs as ``python -m dvc repro --single-item <stage>`` in the
repository: DVC alone decides whether the stage is stale, runs its ``cmd``, and writes
``dvc.lock``, exactly as a ``dvc repro`` by hand would. One DVC command runs at a time
(DVC holds one lock per repository), so the flow calls these tasks one after another.

The DVC of the running interpreter is used (``sys.executable -m dvc``), and that
interpreter's ``bin`` directory leads ``PATH`` so the stages' ``python -m pipeline``
runs in the same environment as the flow. Output lines (stdout and stderr merged, in
order) are passed to a callback as they arrive; the tasks pass the Prefect run logger.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline.errors import ArtifactError, GateRejected, OrchestrationError
from pipeline.json_io import read_json

LineSink = Callable[[str], None]

TAIL_LINES = 30
SKIPPED_MARK = "didn't change, skipping"


@dataclass(frozen=True)
class CommandResult:
    """A finished command: its argv, exit status and last output lines (for messages)."""

    argv: tuple[str, ...]
    returncode: int
    tail: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass(frozen=True)
class StageResult:
    """One ``dvc repro --single-item`` run. ``ran`` is False when DVC found it up to date."""

    stage: str
    ran: bool


def command_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for DVC and its stages: this interpreter first on ``PATH``.

    ``PYTHONUNBUFFERED`` makes the stages' output arrive line by line, not at exit.
    """
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    env["PATH"] = bin_dir + (os.pathsep + path if path else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def stream_command(
    argv: Sequence[str],
    cwd: Path,
    sink: LineSink,
    env: Mapping[str, str] | None = None,
) -> CommandResult:
    """Run ``argv`` in ``cwd``, pass each output line (no newline) to ``sink`` as it comes.

    stderr is merged into stdout so the lines keep their order. Carriage returns end a
    line too (progress bars). If anything interrupts the reading (an exception in
    ``sink``, a cancelled task), the child process is killed, never left running.
    """
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,  # universal newlines: \r, \n and \r\n all end a line
        encoding="utf-8",
        errors="replace",
        bufsize=1,
    )
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            if not line.strip():
                continue
            tail.append(line)
            sink(line)
        returncode = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    return CommandResult(tuple(argv), returncode, tuple(tail))


def dvc_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def run_dvc(repo: Path, args: Sequence[str], sink: LineSink) -> CommandResult:
    return stream_command(dvc_argv(*args), Path(repo), sink, command_env())


def _failure(result: CommandResult, what: str) -> OrchestrationError:
    shown = "\n".join(result.tail[-10:])
    return OrchestrationError(f"{what} failed (exit {result.returncode}):\n{shown}")


def read_gate_report(path: Path) -> dict[str, Any] | None:
    """The gate's JSON report, or None if it is missing or unreadable."""
    try:
        return read_json(path, "gate report")
    except ArtifactError:
        return None


def gate_rejection(report: Mapping[str, Any]) -> GateRejected:
    """The flow's error for a rejecting gate report; the message lists every reason."""
    reasons = [str(r) for r in report.get("reasons") or []]
    if not reasons:
        reasons = [
            f"{c.get('name', '?')}: {c.get('message', 'failed')}"
            for c in report.get("checks") or []
            if isinstance(c, Mapping) and c.get("passed") is False
        ]
    if not reasons:
        reasons = ["the gate report gives no reasons"]
    return GateRejected("gate rejected the candidate: " + "; ".join(reasons), reasons)


def _file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size)


def repro_stage(repo: Path, stage: str, sink: LineSink) -> StageResult:
    """``dvc repro --single-item <stage>``; :class:`OrchestrationError` if it fails."""
    ran = True

    def watch(line: str) -> None:
        nonlocal ran
        if SKIPPED_MARK in line and f"'{stage}'" in line:
            ran = False
        sink(line)

    result = run_dvc(repo, ["repro", "--single-item", stage], watch)
    if not result.ok:
        raise _failure(result, f"stage {stage!r} (dvc repro)")
    return StageResult(stage, ran)


def repro_gate(repo: Path, stage: str, report_path: Path, sink: LineSink) -> StageResult:
    """Run the gate stage; a rejection becomes :class:`GateRejected` with the reasons.

    The gate stage exits non-zero both when it rejects and when it breaks. It is a
    rejection only if this run rewrote the report and the report says ``passed: false``;
    anything else is an :class:`OrchestrationError` with the command's last lines.
    """
    report_file = Path(repo) / report_path
    before = _file_stamp(report_file)
    try:
        return repro_stage(repo, stage, sink)
    except OrchestrationError as err:
        report = read_gate_report(report_file)
        rewritten = _file_stamp(report_file) != before
        if rewritten and report is not None and report.get("passed") is False:
            raise gate_rejection(report) from err
        raise


def dvc_status(repo: Path, sink: LineSink) -> dict[str, Any]:
    """``dvc status --json`` as a mapping; empty means data and pipeline are up to date."""
    lines: list[str] = []
    result = run_dvc(repo, ["status", "--json"], lines.append)
    for line in lines:
        sink(line)
    if not result.ok:
        raise _failure(result, "dvc status")
    # DVC may print warnings before the JSON document; it is the last '{'-line onwards.
    starts = [i for i, line in enumerate(lines) if line.lstrip().startswith("{")]
    if not starts:
        raise OrchestrationError(f"dvc status --json printed no JSON: {lines[-5:]}")
    try:
        status = json.loads("\n".join(lines[starts[-1] :]))
    except json.JSONDecodeError as err:
        raise OrchestrationError(f"dvc status --json: unreadable output: {err}") from err
    if not isinstance(status, dict):
        raise OrchestrationError(f"dvc status --json: expected an object, got {status!r}")
    return status


def dvc_push(repo: Path, sink: LineSink) -> None:
    result = run_dvc(repo, ["push"], sink)
    if not result.ok:
        raise _failure(result, "dvc push")


# Prefect tasks. DVC decides staleness, so Prefect must never skip a task from its
# own cache (NO_CACHE) nor keep results around (persist_result=False).


@task(name="dvc-stage", cache_policy=NO_CACHE, persist_result=False)
def stage_task(repo: Path, stage: str) -> StageResult:
    """Run one stage through DVC, its output in this task's log."""
    logger = get_run_logger()
    result = repro_stage(repo, stage, logger.info)
    logger.info("stage %s: %s", stage, "ran" if result.ran else "up to date, skipped by DVC")
    return result


@task(name="dvc-gate", cache_policy=NO_CACHE, persist_result=False)
def gate_task(repo: Path, stage: str, report_path: Path) -> StageResult:
    """Run the gate stage through DVC; fails with the gate's reasons on rejection."""
    logger = get_run_logger()
    result = repro_gate(repo, stage, report_path, logger.info)
    logger.info("gate: %s", "passed" if result.ran else "up to date (passed before)")
    return result


@task(name="dvc-status", cache_policy=NO_CACHE, persist_result=False)
def status_task(repo: Path) -> dict[str, Any]:
    """Fail unless ``dvc status`` is clean: the flow and DVC must agree after a run."""
    logger = get_run_logger()
    status = dvc_status(repo, logger.debug)
    if status:
        raise OrchestrationError(
            "dvc status is not clean after the run (DVC and the flow disagree): "
            + json.dumps(status, sort_keys=True)[:2000]
        )
    logger.info("dvc status: data and pipelines are up to date")
    return status


@task(
    name="dvc-push", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=10
)
def push_task(repo: Path) -> None:
    """Upload the new data and model versions to the default DVC remote."""
    logger = get_run_logger()
    dvc_push(repo, logger.info)
