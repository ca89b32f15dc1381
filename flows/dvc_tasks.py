"""DVC commands as Prefect tasks, with their output streamed into the run logger.

Each pipeline stage runs as ``python -m dvc repro --single-item <stage>`` in the
repository: DVC alone decides whether the stage is stale, runs its ``cmd``, and writes
``dvc.lock``, exactly as a ``dvc repro`` by hand would. One DVC command runs at a time
(DVC holds one lock per repository), so the flow calls these tasks one after another.

The DVC of the running interpreter is used, in the environment of
:func:`pipeline.release.vcs.command_env`, so the stages' ``python -m pipeline`` runs
where the flow runs. Output lines (stdout and stderr merged, in order) are passed to a
callback as they arrive (:func:`pipeline.release.vcs.stream_command`); the tasks pass
the Prefect run logger.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed, State

from pipeline.core.errors import ArtifactError, GateRejected, OrchestrationError
from pipeline.core.json_io import read_json
from pipeline.release.vcs import CommandResult, LineSink, command_env, dvc_argv, stream_command


@dataclass(frozen=True)
class StageResult:
    """One ``dvc repro --single-item`` run. ``ran`` is False when DVC found it up to date."""

    stage: str
    ran: bool


def pipeline_stages(repo: Path) -> tuple[str, ...]:
    """The stages of ``repo/dvc.yaml`` in the order written there, which is their run order.

    The flow runs exactly these, so a stage added to dvc.yaml is never left out of it.
    :class:`OrchestrationError` when dvc.yaml is missing or declares no stages.
    """
    path = Path(repo) / "dvc.yaml"
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise OrchestrationError(f"{path}: cannot read the pipeline: {err}") from err
    stages = spec.get("stages") if isinstance(spec, dict) else None
    if not isinstance(stages, dict) or not stages:
        raise OrchestrationError(f"{path}: declares no stages")
    return tuple(str(name) for name in stages)


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


def stale_stages(repo: Path, targets: Sequence[str] | None = None) -> dict[str, Any]:
    """DVC's own answer, through its Python API, to "what would ``dvc repro`` run?".

    Maps each stale stage (of ``targets``, default all) to DVC's reasons; a stage that is
    not in the mapping is up to date. Raises :class:`OrchestrationError` if DVC cannot tell.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        # DVC resolves stage names against the working directory, not the repo root.
        with contextlib.chdir(repo), Repo(str(repo)) as dvc_repo:
            status: dict[str, Any] = dvc_repo.status(targets=list(targets) if targets else None)
    except DvcException as err:
        raise OrchestrationError(f"dvc status in {repo}: {err}") from err
    return status


def _file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size)


def repro_stage(repo: Path, stage: str, sink: LineSink) -> StageResult:
    """``dvc repro --single-item <stage>``; :class:`OrchestrationError` if it fails.

    Whether it ran is DVC's status of the stage just before (stages run one at a time).
    """
    ran = stage in stale_stages(repo, [stage])
    result = run_dvc(repo, ["repro", "--single-item", stage], sink)
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


def dvc_push(repo: Path, sink: LineSink) -> None:
    result = run_dvc(repo, ["push"], sink)
    if not result.ok:
        raise _failure(result, "dvc push")


# Prefect tasks. DVC decides staleness, so Prefect must never skip a task from its
# own cache (NO_CACHE) nor keep results around (persist_result=False).


def _finished(result: StageResult) -> State[StageResult]:
    """A stage DVC skipped shows as a ``Skipped`` (completed) task run in Prefect."""
    if result.ran:
        return Completed(data=result, message=f"{result.stage}: ran")
    return Completed(data=result, name="Skipped", message=f"{result.stage}: up to date (DVC)")


@task(name="dvc-stage", cache_policy=NO_CACHE, persist_result=False)
def stage_task(repo: Path, stage: str) -> State[StageResult]:
    """Run one stage through DVC, its output in this task's log."""
    logger = get_run_logger()
    result = repro_stage(repo, stage, logger.info)
    logger.info("stage %s: %s", stage, "ran" if result.ran else "up to date, skipped by DVC")
    return _finished(result)


@task(name="dvc-gate", cache_policy=NO_CACHE, persist_result=False)
def gate_task(repo: Path, stage: str, report_path: Path) -> State[StageResult]:
    """Run the gate stage through DVC.

    A rejection is an expected outcome, not a crash: one log line with the reasons and a
    ``Rejected`` (failed) state whose result is the :class:`GateRejected`, no traceback.
    """
    logger = get_run_logger()
    try:
        result = repro_gate(repo, stage, report_path, logger.info)
    except GateRejected as err:
        logger.error("%s", err)
        return Failed(data=err, message=str(err), name="Rejected")
    logger.info("gate: %s", "passed" if result.ran else "up to date (passed before)")
    return _finished(result)


@task(name="dvc-status", cache_policy=NO_CACHE, persist_result=False)
def status_task(repo: Path) -> dict[str, Any]:
    """Fail unless ``dvc status`` is clean: the flow and DVC must agree after a run."""
    logger = get_run_logger()
    status = stale_stages(repo)
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
