"""The ``training-pipeline`` flow: the DVC pipeline, stage by stage, as Prefect tasks.

Prefect schedules, retries and shows; DVC decides what is stale and records lineage.
The flow

1. composes the run's profile and overrides into ``params.yaml`` with DVC's own Hydra
   composition, as ``dvc exp run -S`` does (see :mod:`flows.params_file`), and validates
   it once (:func:`pipeline.core.config.load_config`), so DVC and every stage see exactly them;
2. runs ``dvc repro --single-item <stage>`` for each stage of ``dvc.yaml`` in order;
   DVC skips what is up to date (asked through DVC's Python API; such a task run shows
   as ``Skipped``); downloads retry inside :mod:`pipeline.data.sources`, so no stage is
   retried here;
3. ends ``Rejected`` (a failed state) with the gate's reasons in one line when the gate
   rejects (promote does not run; no traceback: a rejection is an expected outcome);
4. checks ``dvc status`` is clean (DVC agrees with what the flow did);
5. publishes a markdown report and a per-class table as artifacts (on failure too);
6. pushes data and models to the DVC remote (``push`` / ``flow.push_to_remote``).

A run that fails before the last stage finished puts ``params.yaml`` back as it was, so
one bad manual run (an impossible gate, say) does not poison the next scheduled one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import TerminationSignal
from prefect.states import Failed, State

from flows.dvc_tasks import (
    StageResult,
    gate_task,
    pipeline_stages,
    push_task,
    stage_task,
    status_task,
)
from flows.params_file import PreparedParams, prepare_params, restore_params
from flows.registry_tasks import record_task
from pipeline.core.config import Config
from pipeline.core.errors import GateRejected, OrchestrationError
from pipeline.release.run_report import RunReport, build_report

REPORT_KEY = "training-report"
PER_CLASS_KEY = "per-class-metrics"


def run_stage(root: Path, stage: str, cfg: Config) -> StageResult:
    """One stage as its own Prefect task (named after the stage).

    The tasks end in a Prefect state of their own (``Skipped`` when DVC found the stage
    up to date); its data is the :class:`StageResult`, and a failed task raises here.
    """
    if stage == "gate":
        gate = gate_task.with_options(name=stage)
        state = gate(root, stage, Path(cfg.gate.report_path), return_state=True)
        return cast(StageResult, state.result())
    task = stage_task.with_options(name=stage)
    return cast(StageResult, task(root, stage, return_state=True).result())


def publish_report(
    root: Path, cfg: Config, outcome: str, header: list[tuple[str, Any]]
) -> RunReport:
    """Create the two artifacts of a run; returns the report (with its missing files)."""
    report = build_report(root, cfg, outcome=outcome, header=header)
    create_markdown_artifact(
        report.markdown, key=REPORT_KEY, description=f"MNIST training pipeline: {outcome}"
    )
    if report.per_class:
        create_table_artifact(
            report.per_class, key=PER_CLASS_KEY, description="Test-set metrics per digit"
        )
    return report


class _Run:
    """One flow run: the stages DVC ran or skipped, and the report of how it ended."""

    def __init__(self, root: Path, stages: tuple[str, ...], prepared: PreparedParams) -> None:
        self.root = root
        self.prepared = prepared
        self.cfg = prepared.cfg
        self.stages = stages
        self.done: dict[str, str] = {}
        self.logger = get_run_logger()

    def header(self, extra: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        stages = ", ".join(f"{s}: {self.done.get(s, 'not run')}" for s in self.stages)
        return [
            ("profile", self.cfg.profile),
            ("overrides", ", ".join(self.prepared.overrides) or None),
            ("params hash", self.cfg.params_hash()),
            ("repository", str(self.root)),
            ("stages", stages),
            *extra,
        ]

    def run_stages(self) -> None:
        """Every stage of dvc.yaml, in its order, as a task of its own."""
        for stage in self.stages:
            result = run_stage(self.root, stage, self.cfg)
            self.done[stage] = "ran" if result.ran else "up to date"

    def restore(self, why: str) -> None:
        if restore_params(self.root / "params.yaml", self.prepared):
            self.logger.warning("%s: params.yaml restored to its state before the run", why)

    def rejected(self, err: GateRejected) -> State[Any]:
        """Expected: the model is not good enough. One line and a Rejected state."""
        self.done["gate"] = "rejected"
        self.restore("gate rejected")
        publish_report(self.root, self.cfg, f"Rejected: {err}", self.header([]))
        return Failed(message=str(err), name="Rejected")

    def failed(self, err: BaseException) -> None:
        self.restore("run failed")
        # A Prefect cancel reaches the flow process as SIGTERM (TerminationSignal).
        cancelled = isinstance(err, TerminationSignal | KeyboardInterrupt)
        outcome = "Cancelled" if cancelled else "Failed"
        publish_report(
            self.root, self.cfg, f"{outcome}: {type(err).__name__}: {err}", self.header([])
        )

    def completed(self, push: bool) -> None:
        """DVC agrees, the report is published and complete; else OrchestrationError."""
        status_task(self.root)
        extra = [("push to DVC remote", push)]
        report = publish_report(self.root, self.cfg, "Completed", self.header(extra))
        if report.missing:
            raise OrchestrationError(
                "the pipeline finished but outputs the report needs are missing: "
                + "; ".join(report.missing.values())
            )


@flow(
    name="training-pipeline",
    description="MNIST: ingest, validate, train, evaluate, export, gate, promote (through DVC).",
)
def training_pipeline(
    profile: str | None = None,
    params: dict[str, Any] | None = None,
    repo: str | None = None,
    push: bool | None = None,
    record: bool | None = None,
) -> dict[str, Any] | State[Any]:
    """Run the DVC pipeline in ``repo`` (default: the working directory).

    Args:
        profile: a profile of ``conf/profile/`` (``default``, ``quick``...). With
            ``params``, composed into params.yaml as ``dvc exp run -S`` does; with
            neither, params.yaml runs as it is (like ``dvc repro``).
        params: dotted-key overrides, e.g. ``{"gate.min_accuracy": 0.995}``; JSON-typed
            values (numbers, booleans, strings, lists), checked against the schema.
        repo: the repository root holding dvc.yaml and params.yaml.
        push: push data and models to the DVC remote after success; None =
            ``flow.push_to_remote`` of params.yaml.
        record: commit the run and register the promoted model (GTO tags, pushed when
            ``push``); None = ``registry.record`` of params.yaml (on by default).

    Returns a summary: profile, params hash, what each stage did, whether it pushed.
    """
    root = Path(repo).expanduser().resolve() if repo else Path.cwd()
    # Read before params.yaml is composed: an unreadable dvc.yaml leaves it untouched.
    stages = pipeline_stages(root)
    run = _Run(root, stages, prepare_params(root, profile, params))
    cfg = run.cfg
    do_push = cfg.flow.push_to_remote if push is None else push
    do_record = cfg.registry.record if record is None else record
    _log_start(run)
    try:
        run.run_stages()
    except GateRejected as err:
        return run.rejected(err)
    except BaseException as err:
        run.failed(err)
        raise
    run.completed(do_push)
    return {
        "profile": cfg.profile,
        "params_hash": cfg.params_hash(),
        "stages": run.done,
        "pushed": do_push,
        "recorded": _publish(root, cfg, do_push, do_record),
    }


def _log_start(run: _Run) -> None:
    run.logger.info(
        "repo %s, profile %s, overrides %s, params hash %s",
        run.root,
        run.cfg.profile,
        run.prepared.overrides or "none",
        run.cfg.params_hash()[:12],
    )
    if run.prepared.changed:
        run.logger.info("params.yaml composed with this run's parameters (as `dvc exp run -S`)")


def _publish(root: Path, cfg: Config, push: bool, record: bool) -> dict[str, Any] | None:
    """Record the run (commit + tags; pushes DVC first, then git when ``push``) or push."""
    if record:
        return record_task(root, cfg, push)
    if push:
        push_task(root)
    else:
        get_run_logger().info("not pushing to the DVC remote (push disabled)")
    return None


if __name__ == "__main__":
    training_pipeline()
