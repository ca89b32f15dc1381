"""Hyperparameter search with Optuna, trials on a Dask cluster, pruning on the driver.

The pieces:

- :func:`search_space` turns ``sweep.space`` (see :class:`pipeline.core.config.SweepConfig`)
  into Optuna distributions; :func:`trial_config` applies one trial's values to the base
  ``train`` settings (validated by the same schema as params.yaml).
- :func:`make_study`: a maximising study, seeded :class:`~optuna.samplers.TPESampler`
  (``constant_liar`` so parallel asks do not pile onto one point) and a median or
  successive-halving pruner on per-epoch validation accuracy.
- :func:`run_trial`: one trial = :func:`pipeline.training.train.fit` on the TRAIN split with the
  trial's settings; the objective is the final epoch's accuracy on the validation split
  carved out of it (``train.val_size``). The test split is never loaded by a sweep.
- :func:`run_sweep`: the driver. It asks the study for trials, submits them to Dask and
  tells the results back.

How pruning works with remote workers (no shared filesystem, no extra service)
------------------------------------------------------------------------------
The study lives in memory on the driver and is the only copy: there is no SQLite file
that workers on other machines would need to open, and no RDB server to run. A worker
reports each epoch's validation accuracy to the driver through a Dask ``Queue`` (held
by the scheduler, which every worker and the driver already reach), then blocks on a
per-attempt reply queue; the driver calls ``trial.report`` and ``trial.should_prune``
and puts the decision back. The round trip costs a few milliseconds per epoch, against
epochs of seconds. Pruning decisions therefore see every other trial's latest values,
exactly as Optuna's in-process pruning would. (Optuna's gRPC storage proxy would need
``grpcio`` and the workers to reach the driver; ``optuna-integration``'s DaskStorage is
not installed here.)

Data: the driver loads the train split once and ``client.scatter(..., broadcast=True)``
sends it to every worker; trials receive it as an argument.

Worker loss: Dask's scheduler re-runs a task whose worker died on another worker
(``distributed.scheduler.allowed-failures`` times); when Dask gives up
(``KilledWorker``), or forgets the trial because every copy of the scattered data died
with its workers (Dask's Active Memory Manager drops broadcast replicas that no task on
that worker needs), the driver scatters again if needed and submits the trial again, up
to ``sweep.trial_retries`` times. Each trial is placed on the worker with the fewest
running trials per thread (Dask would queue two on a busy 1-thread worker).
Every attempt announces itself (worker name) on the report queue, so the records
show which trials were retried and where.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from pipeline.core import dotted
from pipeline.core.config import (
    SWEEP_FIXED,
    Config,
    SweepConfig,
    TrainConfig,
    config_from_dict,
    to_dict,
)
from pipeline.core.errors import ClusterError, ConfigError, PipelineError, SweepError
from pipeline.data.dataset import SplitArrays, load_split
from pipeline.data.stats import read_normalization

if TYPE_CHECKING:
    import optuna
    from distributed import Client, Future

log = logging.getLogger(__name__)

TrialState = Literal["complete", "pruned", "fail"]

# A worker waits this long for the driver's prune decision before giving up the trial.
DECISION_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class SweepData:
    """What every trial trains on: the TRAIN split (``(N, 28, 28) uint8``, ``(N,) uint8``)
    and its pixel mean/std on the [0, 1] scale."""

    arrays: SplitArrays
    mean: float
    std: float


def load_sweep_data(cfg: Config) -> SweepData:
    """The train split (cut to ``train.max_train_samples``) and its normalisation.

    Reads ``data.prepared_dir/train_*.npy`` and ``validate.stats_path`` only: never the
    test split. The arrays are copied out of the memory map (they are sent to workers).
    """
    arrays = load_split(cfg.data.prepared_dir, "train", mmap=True)
    n = len(arrays)
    if cfg.train.max_train_samples is not None:
        n = min(n, cfg.train.max_train_samples)
    mean, std = read_normalization(cfg.validate.stats_path)
    return SweepData(
        SplitArrays(
            images=np.ascontiguousarray(arrays.images[:n]),
            labels=np.ascontiguousarray(arrays.labels[:n]),
        ),
        mean,
        std,
    )


def _train_default(key: str) -> Any:
    """The default of the dotted train setting ``key`` (decides int vs float ranges).

    From :func:`to_dict`, which keeps ints, floats and bools as they are (only paths and
    tuples change form, and no range is searched over those).
    """
    return dotted.get(to_dict(TrainConfig()), key)


def search_space(sweep: SweepConfig) -> dict[str, optuna.distributions.BaseDistribution]:
    """``sweep.space`` as Optuna distributions, keyed by the dotted train setting.

    Integer settings (``width``, ``epochs``...) give an ``IntDistribution``, float ones a
    ``FloatDistribution``, ``choices`` a ``CategoricalDistribution``. The entries were
    validated when params.yaml was loaded; an empty space is a :class:`ConfigError` here.
    """
    from optuna.distributions import (
        BaseDistribution,
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if not sweep.space:
        raise ConfigError("sweep.space: empty; name at least one train setting to search")
    out: dict[str, BaseDistribution] = {}
    for key, p in sweep.space.items():
        if p.choices is not None:
            out[key] = CategoricalDistribution(p.choices)
        elif isinstance(_train_default(key), int):
            assert isinstance(p.low, int) and isinstance(p.high, int)  # checked by the schema
            out[key] = IntDistribution(p.low, p.high, log=p.log, step=int(p.step or 1))
        else:
            assert p.low is not None and p.high is not None
            out[key] = FloatDistribution(
                float(p.low), float(p.high), log=p.log, step=None if p.step is None else p.step
            )
    return out


def trial_config(base: TrainConfig, params: Mapping[str, Any], threads: int) -> TrainConfig:
    """``base`` with ``params`` (dotted train keys) applied, validated by the schema.

    A trial keeps nothing on disk (no checkpoint) and uses ``threads`` torch threads.
    """
    fixed = sorted(set(params) & SWEEP_FIXED)
    if fixed:
        raise ConfigError(f"sweep.space: {', '.join(fixed)} may not be varied by a sweep")
    overrides = {f"train.{k}": v for k, v in params.items()}
    overrides["train.num_threads"] = threads
    return config_from_dict({"train": to_dict(base)}, overrides).train


def make_study(sweep: SweepConfig) -> optuna.Study:
    """A maximising in-memory study: seeded TPE and the configured pruner."""
    import optuna

    pruner: optuna.pruners.BasePruner
    if sweep.pruner == "median":
        pruner = optuna.pruners.MedianPruner(
            n_startup_trials=sweep.pruner_startup_trials,
            n_warmup_steps=sweep.pruner_warmup_epochs,
        )
    elif sweep.pruner == "halving":
        pruner = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=max(1, sweep.pruner_warmup_epochs), reduction_factor=3
        )
    else:
        pruner = optuna.pruners.NopPruner()
    # TPE starts from random points; a third of the budget (at most TPE's default 10).
    startup = min(10, max(1, sweep.trials // 3))
    sampler = optuna.samplers.TPESampler(
        seed=sweep.seed, n_startup_trials=startup, constant_liar=True
    )
    return optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)


class EpochReporter(Protocol):
    """Receives each epoch's validation accuracy; returns True to stop (prune) the trial."""

    def __call__(self, epoch: int, val_accuracy: float) -> bool: ...


@dataclass(frozen=True)
class TrialOutcome:
    """What one attempt of a trial produced (sent back from the worker)."""

    number: int
    state: TrialState
    val_accuracy: list[float]  # per epoch, in [0, 1]
    seconds: float
    worker: str
    error: str | None = None


def run_trial(
    data: SweepData, cfg: TrainConfig, number: int, report: EpochReporter, worker: str = "local"
) -> TrialOutcome:
    """Train one trial; ``report`` decides after every epoch whether to go on.

    A trial that diverges or has impossible settings (any :class:`PipelineError`) is a
    failed trial, not an error of the sweep.
    """
    from pipeline.training.train import EpochRecord, fit

    values: list[float] = []

    def on_epoch(record: EpochRecord) -> bool:
        values.append(record.val_accuracy)
        return report(record.epoch, record.val_accuracy)

    t0 = time.perf_counter()
    log.info("trial %d: fit starts", number)
    try:
        result = fit(data.arrays, data.mean, data.std, cfg, on_epoch=on_epoch, progress=False)
    except PipelineError as err:
        seconds = time.perf_counter() - t0
        return TrialOutcome(number, "fail", values, seconds, worker, f"{type(err).__name__}: {err}")
    state: TrialState = "complete" if result.completed else "pruned"
    return TrialOutcome(number, state, values, time.perf_counter() - t0, worker)


def _queue_names(channel: str, number: int, attempt: str) -> tuple[str, str]:
    return f"{channel}-reports", f"{channel}-decide-{number}-{attempt}"


def dask_trial(data: SweepData, cfg: TrainConfig, number: int, channel: str) -> TrialOutcome:
    """:func:`run_trial` on a Dask worker, reporting epochs to the driver over Dask queues."""
    from distributed import Queue, get_worker

    worker = str(get_worker().name)
    attempt = uuid.uuid4().hex[:8]
    reports_name, decide_name = _queue_names(channel, number, attempt)
    reports, decisions = Queue(reports_name), Queue(decide_name)
    reports.put({"kind": "start", "trial": number, "attempt": attempt, "worker": worker})

    def report(epoch: int, val_accuracy: float) -> bool:
        msg = {"kind": "epoch", "trial": number, "attempt": attempt}
        reports.put({**msg, "epoch": epoch, "value": val_accuracy})
        try:
            return bool(decisions.get(timeout=DECISION_TIMEOUT_S))
        except TimeoutError as err:
            raise ClusterError(f"trial {number}: no decision from the sweep driver") from err

    try:
        return run_trial(data, cfg, number, report, worker)
    finally:
        decisions.close()


@dataclass
class TrialRecord:
    """One trial as reported: its parameters, per-epoch val accuracy and where it ran."""

    number: int
    params: dict[str, Any]
    state: TrialState | Literal["running"] = "running"
    val_accuracy: float | None = None  # the objective: the last epoch's, if complete
    val_accuracy_per_epoch: list[float] = field(default_factory=list)
    seconds: float | None = None
    worker: str | None = None  # the worker of the attempt that finished
    attempts: list[str] = field(default_factory=list)  # the worker of every attempt
    resubmitted: int = 0
    error: str | None = None

    @property
    def retried(self) -> bool:
        return len(self.attempts) > 1 or self.resubmitted > 0


@dataclass
class SweepResult:
    study: optuna.Study
    records: list[TrialRecord]
    workers: list[str]  # the cluster's worker names at the start
    parallelism: int
    wall_seconds: float

    @property
    def best(self) -> TrialRecord:
        done = [r for r in self.records if r.state == "complete" and r.val_accuracy is not None]
        if not done:
            raise SweepError("no trial of the sweep completed; see the trial records")
        return max(done, key=lambda r: (r.val_accuracy, -r.number))

    def trials_per_worker(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            if r.worker is not None:
                out[r.worker] = out.get(r.worker, 0) + 1
        return dict(sorted(out.items()))


@dataclass
class _Running:
    trial: optuna.Trial
    record: TrialRecord
    train_cfg: TrainConfig
    reported: set[int] = field(default_factory=set)  # epochs told to the study
    address: str | None = None  # the worker it was placed on


def check_sweep(cfg: Config) -> dict[str, optuna.distributions.BaseDistribution]:
    """Every check a sweep can do before it starts; returns the search space."""
    space = search_space(cfg.sweep)
    if cfg.train.val_size == 0:
        raise ConfigError("train.val_size: 0 leaves a sweep no validation split to score on")
    # Both ends of every range build a valid train config (choices were checked on load).
    for key, p in cfg.sweep.space.items():
        for value in p.choices if p.choices is not None else (p.low, p.high):
            trial_config(cfg.train, {key: value}, cfg.sweep.trial_threads)
    return space


def warm_up() -> None:
    """Import the trainer and run one tiny fit, so a worker's first trial is not charged
    the one-off costs (imports, first kernels: ~10 s on a busy 2-core machine)."""
    from pipeline.training.train import fit

    rng = np.random.default_rng(0)
    arrays = SplitArrays(
        images=rng.integers(0, 256, (96, 28, 28), dtype=np.uint8),
        labels=rng.integers(0, 10, 96, dtype=np.uint8),
    )
    tiny = TrainConfig(width=4, epochs=1, batch_size=32, val_size=32, num_threads=1)
    fit(arrays, 0.13, 0.31, tiny, progress=False)


def cluster_threads(client: Client) -> dict[str, int]:
    """Worker name -> threads, of the workers connected now."""
    info = client.scheduler_info()["workers"]
    return {str(w["name"]): int(w["nthreads"]) for w in info.values()}


class _SweepDriver:
    """One sweep's state on the driver: the study, the trials in flight, the cluster.

    :func:`run_sweep` builds one per sweep. Each method handles one step of the loop (ask
    and submit, answer the workers' reports, resubmit lost trials, record finished ones);
    the study is only ever touched from here, on the driver's thread.
    """

    def __init__(
        self,
        client: Client,
        cfg: Config,
        data: SweepData,
        space: dict[str, optuna.distributions.BaseDistribution],
        study: optuna.Study,
        emit: Callable[[str], None],
    ) -> None:
        from distributed import Queue

        self.client = client
        self.cfg = cfg
        self.sc = cfg.sweep
        self.data = data
        self.space = space
        self.study = study
        self.emit = emit
        self.threads = cluster_threads(client)
        if not self.threads:
            raise ClusterError("the Dask cluster has no workers")
        self.parallelism = self.sc.parallelism or sum(self.threads.values())
        self.channel = f"mnist-sweep-{uuid.uuid4().hex[:8]}"
        self.reports = Queue(f"{self.channel}-reports", client=client)
        # Replaced when every copy of the data was lost with its workers.
        self.payload = client.scatter(data, broadcast=True, hash=False)
        self.running: dict[Future, _Running] = {}
        self.by_number: dict[int, _Running] = {}
        self.records: list[TrialRecord] = []
        self.asked = 0
        self.t0 = time.monotonic()

    def warm_up_workers(self) -> None:
        """Run :func:`warm_up` once on every worker, before the clock starts."""
        # As tasks pinned to each worker (not client.run, which blocks the worker's event
        # loop for as long as the imports take).
        addresses = list(self.client.scheduler_info()["workers"])
        self.client.gather(
            [
                self.client.submit(warm_up, workers=[a], allow_other_workers=False, pure=False)
                for a in addresses
            ]
        )

    def run(self, poll_s: float) -> SweepResult:
        """Ask, submit and collect trials until the budget is spent and none is running."""
        self.t0 = time.monotonic()
        try:
            while True:
                self.fill()
                if not self.running:
                    break
                # Non-blocking drains (a blocking get that times out is logged by the
                # scheduler) around ``poll_s`` for the trials to report or end.
                self.drain()
                time.sleep(poll_s)
                self.drain()
                self.resubmit_lost()
                for fut in [f for f in self.running if f.done()]:
                    self.finish(fut, self.running.pop(fut))
        finally:
            if self.running:
                self.client.cancel(list(self.running))
            self.reports.close()
        wall = time.monotonic() - self.t0
        return SweepResult(self.study, self.records, sorted(self.threads), self.parallelism, wall)

    def fill(self) -> None:
        """Ask the study for new trials while the budget, the time and free slots allow."""
        # The deadline is checked once per round: a round that starts in time fills up.
        sc = self.sc
        out_of_time = sc.timeout_s is not None and time.monotonic() - self.t0 > sc.timeout_s
        while self.asked < sc.trials and len(self.running) < self.parallelism and not out_of_time:
            self.submit(self.ask())
            self.asked += 1

    def ask(self) -> _Running:
        """The study's next trial, with its train config, registered for the reports."""
        trial = self.study.ask(self.space)
        params = dict(trial.params)
        r = _Running(
            trial,
            TrialRecord(trial.number, params),
            trial_config(self.cfg.train, params, self.sc.trial_threads),
        )
        self.by_number[trial.number] = r
        self.records.append(r.record)
        return r

    def submit(self, r: _Running) -> None:
        """Send ``r`` to the cluster, on the worker with the fewest of our trials per thread."""
        key = f"trial-{r.record.number}-{r.record.resubmitted}-{self.channel}"
        r.address = self.least_busy_worker()
        fut = self.client.submit(
            dask_trial,
            self.payload,
            r.train_cfg,
            r.record.number,
            self.channel,
            key=key,
            pure=False,
            workers=None if r.address is None else [r.address],
            allow_other_workers=True,
        )
        self.running[fut] = r

    def least_busy_worker(self) -> str | None:
        """The address with the fewest running trials per thread (None: no workers)."""
        # Dask may queue two tasks on a 1-thread worker while another idles
        # (worker-saturation); a sweep wants one trial per free thread. Loosely: the
        # scheduler may still move the task (allow_other_workers).
        workers = self.client.scheduler_info()["workers"]
        busy = {a: 0 for a in workers}
        for other in self.running.values():
            if other.address in busy:
                busy[other.address] += 1
        return min(busy, key=lambda a: busy[a] / max(1, workers[a]["nthreads"]), default=None)

    def drain(self) -> None:
        """Handle every report waiting on the queue, without blocking."""
        for msg in self.reports.get(batch=True):
            self.handle(msg)

    def handle(self, msg: dict[str, Any]) -> None:
        """One report from a worker: an attempt started, or an epoch ended."""
        r = self.by_number[msg["trial"]]
        if r.record.state != "running":
            # A finished trial recomputed by Dask (its result was lost with a worker
            # before it was released): stop it at its first epoch; the study has it.
            if msg["kind"] == "epoch":
                self.decide(r, msg["attempt"], True)
        elif msg["kind"] == "start":
            r.record.attempts.append(msg["worker"])
            n = len(r.record.attempts)
            again = f" (attempt {n})" if n > 1 else ""
            self.emit(f"trial {r.record.number} started on worker {msg['worker']}{again}")
        else:
            self.report_epoch(r, msg)

    def report_epoch(self, r: _Running, msg: dict[str, Any]) -> None:
        """Tell the study an epoch's value and send the worker the prune decision."""
        epoch, value = int(msg["epoch"]), float(msg["value"])
        # A re-run attempt repeats epochs the study already has; Optuna keeps the first.
        if epoch not in r.reported:
            r.trial.report(value, epoch)
            r.reported.add(epoch)
        prune = r.trial.should_prune()
        if prune:
            self.emit(f"trial {r.record.number} pruned after epoch {epoch} (val acc {value:.4f})")
        self.decide(r, msg["attempt"], prune)

    def decide(self, r: _Running, attempt: str, prune: bool) -> None:
        """Answer the attempt blocked on its reply queue: stop (True) or go on."""
        from distributed import Queue

        name = _queue_names(self.channel, r.record.number, attempt)[1]
        Queue(name, client=self.client).put(prune)

    def resubmit_lost(self) -> None:
        """Submit again the trials the scheduler forgot (the data's workers died)."""
        lost = [f for f in self.running if f.status == "cancelled"]
        if not lost:
            return
        # The workers holding the data died (the Active Memory Manager may have dropped
        # the other copies): scatter it again before resubmitting.
        self.payload = self.client.scatter(self.data, broadcast=True, hash=False)
        for fut in lost:
            self.retry_or_fail(
                self.running.pop(fut),
                "its data was lost with a worker; resubmitting",
                "data lost with its workers",
            )

    def finish(self, fut: Future, r: _Running) -> None:
        """A trial's future is done: record its outcome, or retry it if its workers died."""
        from distributed.scheduler import KilledWorker

        try:
            out: TrialOutcome = fut.result()
        except KilledWorker as err:
            fut.release()
            self.retry_or_fail(
                r, f"its workers died ({err}); submitting it again", f"KilledWorker: {err}"
            )
            return
        # Released now: a result still held on a worker that dies later would be recomputed.
        fut.release()
        self.record_outcome(r, out)

    def retry_or_fail(self, r: _Running, note: str, error: str) -> None:
        """Submit ``r`` again while ``sweep.trial_retries`` allows (saying ``note``), else
        fail it with ``error``."""
        from optuna.trial import TrialState as OptunaState

        rec = r.record
        if rec.resubmitted < self.sc.trial_retries:
            rec.resubmitted += 1
            self.emit(f"trial {rec.number}: {note}")
            self.submit(r)
            return
        rec.state, rec.error = "fail", error
        self.study.tell(r.trial, state=OptunaState.FAIL)
        self.emit(f"trial {rec.number} failed: {rec.error}")

    def record_outcome(self, r: _Running, out: TrialOutcome) -> None:
        """Copy a finished attempt's outcome into the record and tell the study."""
        from optuna.trial import TrialState as OptunaState

        rec = r.record
        rec.state, rec.worker, rec.seconds = out.state, out.worker, round(out.seconds, 3)
        rec.val_accuracy_per_epoch, rec.error = out.val_accuracy, out.error
        if out.state == "complete":
            rec.val_accuracy = out.val_accuracy[-1]
            self.study.tell(r.trial, rec.val_accuracy)
        else:
            state = OptunaState.PRUNED if out.state == "pruned" else OptunaState.FAIL
            self.study.tell(r.trial, state=state)
        shown = f"val acc {rec.val_accuracy:.4f}" if rec.val_accuracy is not None else rec.error
        self.emit(
            f"trial {rec.number} {rec.state} on {out.worker} in {out.seconds:.1f} s: {shown or ''}"
        )


def run_sweep(
    client: Client,
    cfg: Config,
    data: SweepData,
    *,
    study: optuna.Study | None = None,
    on_event: Callable[[str], None] | None = None,
    poll_s: float = 0.2,
    warm: bool = True,
) -> SweepResult:
    """Run ``cfg.sweep.trials`` trials on ``client``'s cluster; returns every trial's record.

    ``study``: an existing study (e.g. with enqueued trials); default :func:`make_study`.
    ``on_event``: gets one line per trial event (start, prune, finish, retry).
    ``warm``: run :func:`warm_up` on every worker first (not counted in trial seconds).
    Raises :class:`ConfigError` before any trial for a bad space and
    :class:`SweepError` if no trial completed.
    """
    space = check_sweep(cfg)
    emit = on_event or log.info
    study = study if study is not None else make_study(cfg.sweep)
    driver = _SweepDriver(client, cfg, data, space, study, emit)
    if warm:
        driver.warm_up_workers()
    return driver.run(poll_s)


def best_overrides(record: TrialRecord) -> dict[str, Any]:
    """The best trial's values as a nested params override (``{"train": {...}}``).

    NumPy scalars (Optuna may hand them back) become plain Python values for YAML.
    """
    flat = {
        f"train.{key}": value.item() if isinstance(value, np.generic) else value
        for key, value in record.params.items()
    }
    return dotted.nest(flat)
