"""The ``training-pipeline`` flow: the DVC pipeline, stage by stage, as Prefect tasks.

Prefect schedules, retries and shows; DVC decides what is stale and records lineage.
The flow

1. composes the run's profile and overrides into ``params.yaml`` with DVC's own Hydra
   composition, as ``dvc exp run -S`` does (see :mod:`flows.params_file`), and validates
   it once (:func:`pipeline.config.load_config`), so DVC and every stage see exactly them;
2. runs ``dvc repro --single-item <stage>`` for each stage of ``dvc.yaml`` in order;
   DVC skips what is up to date (asked through DVC's Python API; such a task run shows
   as ``Skipped``); downloads retry inside :mod:`pipeline.sources`, so no stage is
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

from flows.dvc_tasks import StageResult, gate_task, push_task, stage_task, status_task
from flows.params_file import prepare_params, restore_params
from flows.record import record_task
from flows.reports import RunReport, build_report
from pipeline.config import Config
from pipeline.errors import GateRejected, OrchestrationError

STAGES = ("ingest", "validate", "train", "evaluate", "export", "gate", "promote")
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
    logger = get_run_logger()
    root = Path(repo).expanduser().resolve() if repo else Path.cwd()
    params_path = root / "params.yaml"
    prepared = prepare_params(root, profile, params)
    cfg = prepared.cfg
    do_push = cfg.flow.push_to_remote if push is None else push
    do_record = cfg.registry.record if record is None else record
    logger.info(
        "repo %s, profile %s, overrides %s, params hash %s",
        root,
        cfg.profile,
        prepared.overrides or "none",
        cfg.params_hash()[:12],
    )
    if prepared.changed:
        logger.info("params.yaml composed with this run's parameters (as `dvc exp run -S`)")

    done: dict[str, str] = {}

    def header(extra: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        stages = ", ".join(f"{s}: {done.get(s, 'not run')}" for s in STAGES)
        return [
            ("profile", cfg.profile),
            ("overrides", ", ".join(prepared.overrides) or None),
            ("params hash", cfg.params_hash()),
            ("repository", str(root)),
            ("stages", stages),
            *extra,
        ]

    try:
        for stage in STAGES:
            result = run_stage(root, stage, cfg)
            done[stage] = "ran" if result.ran else "up to date"
    except GateRejected as err:
        # Expected: the model is not good enough. One line and a Rejected state, no traceback.
        done["gate"] = "rejected"
        if restore_params(params_path, prepared):
            logger.warning("gate rejected: params.yaml restored to its state before the run")
        publish_report(root, cfg, f"Rejected: {err}", header([]))
        return Failed(message=str(err), name="Rejected")
    except BaseException as err:
        if restore_params(params_path, prepared):
            logger.warning("run failed: params.yaml restored to its state before the run")
        # A Prefect cancel reaches the flow process as SIGTERM (TerminationSignal).
        cancelled = isinstance(err, TerminationSignal | KeyboardInterrupt)
        outcome = "Cancelled" if cancelled else "Failed"
        publish_report(root, cfg, f"{outcome}: {type(err).__name__}: {err}", header([]))
        raise

    status_task(root)
    report = publish_report(root, cfg, "Completed", header([("push to DVC remote", do_push)]))
    if report.missing:
        raise OrchestrationError(
            "the pipeline finished but outputs the report needs are missing: "
            + "; ".join(report.missing.values())
        )
    recorded = None
    if do_record:  # commit + tags; pushes DVC first, then git (when do_push)
        recorded = record_task(root, cfg, do_push)
    elif do_push:
        push_task(root)
    else:
        logger.info("not pushing to the DVC remote (push disabled)")
    return {
        "profile": cfg.profile,
        "params_hash": cfg.params_hash(),
        "stages": done,
        "pushed": do_push,
        "recorded": recorded,
    }


if __name__ == "__main__":
    training_pipeline()
