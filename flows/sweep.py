"""The ``hyperparameter-sweep`` flow: Optuna trials on a Dask cluster (wiring only).

1. loads params.yaml once with the run's overrides (trials, parallelism, space,
   ``params``) and checks the search space before anything starts
   (:func:`pipeline.sweep.search.check_sweep`: empty/malformed space, unknown setting,
   zero trials);
2. connects to Dask (:func:`pipeline.sweep.cluster.dask_client`): the ``dask_address``
   parameter, else the environment variable ``MNIST_DASK_ADDRESS`` (read here, at the entry
   point), else ``sweep.dask_address``, else an embedded LocalCluster sized to the machine.
   An unreachable scheduler fails within ``sweep.connect_timeout_s``;
3. scatters the train split to the workers and runs the trials
   (:func:`pipeline.sweep.search.run_sweep`);
4. writes ``sweep.report_dir`` (CSV/JSON, Optuna plots, ``best.yaml``) and publishes the
   trials as a table artifact and a markdown summary.

Why Dask's own client rather than prefect-dask's ``DaskTaskRunner``: a sweep is an
ask/tell loop that submits the next trial when one ends, talks to running trials (per-epoch
pruning over Dask queues) and re-submits a trial whose workers died. That loop needs
the futures and the scheduler, which ``distributed.Client`` gives directly. With
``DaskTaskRunner`` every trial would be a Prefect task run executing on a worker, so every
worker would need the Prefect API and the Prefect package, and a task re-run by Dask after
its worker died would meet its own half-finished task run in the API. Here the workers
run plain library functions (:func:`pipeline.sweep.search.dask_trial`) and need only this
package; Prefect sees the sweep as two tasks and gets every trial in the artifacts.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipeline.core.config import Config, load_config
from pipeline.sweep.cluster import dask_client
from pipeline.sweep.report import SweepReport, write_sweep_reports
from pipeline.sweep.search import SweepResult, check_sweep, load_sweep_data, run_sweep

ADDRESS_ENV = "MNIST_DASK_ADDRESS"
TABLE_KEY = "sweep-trials"
SUMMARY_KEY = "sweep-summary"


def _under(root: Path, path: Path) -> Path:
    return path if path.is_absolute() else root / path


def sweep_config(
    root: Path,
    profile: str | None,
    params: dict[str, Any] | None,
    trials: int | None,
    parallelism: int | None,
    space: dict[str, Any] | None,
) -> Config:
    """params.yaml of ``root`` with the run's overrides; relative paths made absolute."""
    overrides: dict[str, Any] = dict(params or {})
    if profile is not None:
        overrides["profile"] = profile
    for key, value in (("trials", trials), ("parallelism", parallelism), ("space", space)):
        if value is not None:
            overrides[f"sweep.{key}"] = value
    cfg = load_config(root / "params.yaml", overrides)
    return replace(
        cfg,
        data=replace(cfg.data, prepared_dir=_under(root, cfg.data.prepared_dir)),
        validate=replace(cfg.validate, stats_path=_under(root, cfg.validate.stats_path)),
        sweep=replace(cfg.sweep, report_dir=_under(root, cfg.sweep.report_dir)),
    )


@task(name="run-trials", cache_policy=NO_CACHE)
def trials_task(cfg: Config, address: str | None) -> SweepResult:
    logger = get_run_logger()
    data = load_sweep_data(cfg)
    with dask_client(cfg.sweep, address) as client:
        logger.info(
            "Dask cluster: %s (%s)", client.scheduler_info()["address"], address or "embedded"
        )
        return run_sweep(client, cfg, data, on_event=logger.info)


@task(name="write-reports", cache_policy=NO_CACHE)
def reports_task(result: SweepResult, cfg: Config) -> SweepReport:
    return write_sweep_reports(result, cfg.sweep.report_dir, cfg.profile)


def summary_markdown(report: SweepReport) -> str:
    s = report.summary
    lines = [
        "# Hyperparameter sweep",
        "",
        f"- trials: {s['trials']} ({', '.join(f'{k}: {v}' for k, v in s['states'].items())})",
        f"- workers: {', '.join(s['workers'])}; parallelism {s['parallelism']}",
        f"- trials per worker: {s['trials_per_worker']}",
        f"- retried trials: {s['retried_trials'] or 'none'}",
        f"- wall time: {s['wall_seconds']} s ({s['trials_per_minute']} trials/min)",
    ]
    if s["best"]:
        lines += [
            f"- best: trial {s['best']['number']}, val accuracy {s['best']['val_accuracy']:.5f}",
            f"- apply: `python -m pipeline sweep-apply {report.best_path}`",
        ]
    return "\n".join(lines) + "\n"


@flow(
    name="hyperparameter-sweep",
    description="Optuna search over train settings; trials on Dask; best config as override.",
)
def hyperparameter_sweep(
    trials: int | None = None,
    parallelism: int | None = None,
    space: dict[str, Any] | None = None,
    dask_address: str | None = None,
    profile: str | None = None,
    params: dict[str, Any] | None = None,
    repo: str | None = None,
) -> dict[str, Any]:
    """Search ``sweep.space`` (or ``space``) in ``repo``; returns the sweep summary.

    Args:
        trials: number of trials (``sweep.trials``).
        parallelism: trials at a time (``sweep.parallelism``; 0 = the cluster's threads).
        space: replaces ``sweep.space``, e.g. ``{"lr": {"low": 0.01, "high": 0.3, "log": true}}``.
        dask_address: a Dask scheduler, ``tcp://host:8786``; default the environment
            variable ``MNIST_DASK_ADDRESS``, then ``sweep.dask_address``, then a LocalCluster.
        profile: a profile of params.yaml; None keeps the file's ``profile``.
        params: other dotted overrides, e.g. ``{"train.max_train_samples": 10000}``.
        repo: the repository root (params.yaml, data, reports); default the working directory.
    """
    logger = get_run_logger()
    root = Path(repo).expanduser().resolve() if repo else Path.cwd()
    cfg = sweep_config(root, profile, params, trials, parallelism, space)
    check_sweep(cfg)
    address = dask_address or os.environ.get(ADDRESS_ENV) or None
    logger.info(
        "sweep: %d trials over %s, profile %s, params hash %s",
        cfg.sweep.trials,
        ", ".join(cfg.sweep.space),
        cfg.profile,
        cfg.params_hash()[:12],
    )
    result = trials_task(cfg, address)
    report = reports_task(result, cfg)
    create_table_artifact(report.rows, key=TABLE_KEY, description="Every trial of the sweep")
    create_markdown_artifact(
        summary_markdown(report), key=SUMMARY_KEY, description="Hyperparameter sweep"
    )
    logger.info("trials per worker: %s", report.summary["trials_per_worker"])
    logger.info("retried trials: %s", report.summary["retried_trials"] or "none")
    if report.best_path is not None:
        logger.info("best: %s -> %s", report.summary["best"], report.best_path)
    result.best  # noqa: B018 - raises SweepError (after the reports) if no trial completed
    return {
        **report.summary,
        "report_dir": str(report.report_dir),
        "best_path": str(report.best_path),
    }


if __name__ == "__main__":
    hyperparameter_sweep()
