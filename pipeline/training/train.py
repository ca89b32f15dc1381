"""The train stage: a fast, reproducible, resumable training loop.

The training images stay ONE ``uint8`` tensor on the device; every epoch draws a
permutation from an explicit ``torch.Generator`` and batches are index slices of it,
converted, augmented and normalised per batch on the device (:mod:`pipeline.training.augment`).
A validation split (``train.val_size``, seeded) is carved out of the training set; the
test set is never loaded here.

As in torchvision's classification reference: :func:`train_one_epoch`, :func:`evaluate`
and the loop :func:`fit` (file-free; a per-epoch callback may stop it).
:func:`run_train_stage` writes nothing but the per-epoch checkpoint until training is
over; then the model, the dvclive directory and the run info are staged beside their
destinations and renamed into place together, so a kill at any earlier moment leaves
the previous outputs as they were.
"""

from __future__ import annotations

import math
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from pipeline.core.atomic import sha256_file, write_json
from pipeline.core.config import Config, TrainConfig, to_dict
from pipeline.core.dirswap import atomic_dir
from pipeline.core.errors import ConfigError, NonFiniteLossError
from pipeline.data.dataset import SplitArrays, load_split
from pipeline.data.holdout import carve
from pipeline.data.stats import read_normalization
from pipeline.training.augment import prepare_batch, prepare_training_batch, training_loss
from pipeline.training.checkpoint import (
    clear_checkpoints,
    load_checkpoint,
    save_checkpoint,
    train_config_hash,
)
from pipeline.training.device import RuntimeInfo, configure_runtime, select_device
from pipeline.training.model_io import save_model_file
from pipeline.training.models import build_model, count_parameters

# Steps between host syncs (progress bar refresh and the NaN/Inf check).
_SYNC_EVERY = 25


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of history (dvclive logs each field at ``step = epoch``, from 1)."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    images_per_second: float
    seconds: float


EpochCallback = Callable[[EpochRecord], bool | None]


@dataclass
class TrainResult:
    """The trained model (on the CPU, eval mode) and what happened.

    ``metrics``: the numbers people compare (DVC metrics); ``info``: everything else.
    """

    model: nn.Module
    history: list[EpochRecord]
    metrics: dict[str, float | int]
    info: dict[str, Any]
    completed: bool  # False when the callback stopped training early


@dataclass
class Trainer:
    """The mutable state of one run: what a checkpoint holds, plus the runtime choices."""

    cfg: TrainConfig
    model: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]  # ``model`` or its torch.compile
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data_gen: torch.Generator  # permutations and augmentation
    amp_dtype: torch.dtype | None

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def state_dict(self) -> dict[str, Any]:
        # Python's random and NumPy's global RNG are not used by training: not stored.
        rng = {"torch": torch.get_rng_state(), "data": self.data_gen.get_state()}
        if next(self.model.parameters()).is_cuda:
            rng["cuda"] = torch.cuda.get_rng_state()
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.data_gen.set_state(rng["data"])
        if "cuda" in rng and next(self.model.parameters()).is_cuda:
            torch.cuda.set_rng_state(rng["cuda"])


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm parameters and biases (1-D tensors).
    groups = [
        {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
        )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def _make_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per batch."""
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=cfg.lr,
            total_steps=total_steps,
            pct_start=0.25,
            cycle_momentum=cfg.optimizer == "sgd" and cfg.momentum > 0,
            div_factor=10.0,
            final_div_factor=100.0,
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)


def build_trainer(
    cfg: TrainConfig, device: torch.device, amp_dtype: torch.dtype | None, total_steps: int
) -> Trainer:
    """Seed everything, build model, EMA, optimiser and schedule on ``device``."""
    torch.manual_seed(cfg.seed)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    model = build_model(cfg.model, cfg.width).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # use_buffers: BatchNorm running statistics are averaged too, so the EMA model is
    # self-consistent (torchvision's ExponentialMovingAverage does the same).
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        if cfg.ema_decay > 0
        else None
    )
    opt = _make_optimizer(model, cfg)
    return Trainer(
        cfg=cfg,
        model=model,
        forward=torch.compile(model) if cfg.compile else model,
        ema=ema.eval() if ema is not None else None,
        optimizer=opt,
        scheduler=_make_scheduler(opt, cfg, total_steps),
        data_gen=data_gen,
        amp_dtype=amp_dtype,
    )


def train_one_epoch(
    t: Trainer,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: float,
    std: float,
    epoch: int,
    progress: bool = True,
) -> tuple[float, float, float]:
    """One pass over a device-resident split, in whole batches (the ragged tail is dropped).

    ``images``: ``(N, 28, 28) uint8``; ``labels``: ``(N,) int64``. Returns the mean
    training loss, accuracy and images per second. Raises :class:`NonFiniteLossError`.
    """
    cfg, device = t.cfg, images.device
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    steps = int(labels.shape[0]) // cfg.batch_size
    t.model.train()
    t0 = time.perf_counter()
    perm = torch.randperm(int(labels.shape[0]), generator=t.data_gen).to(device)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    first_bad = torch.full((), -1, device=device, dtype=torch.int64)
    desc = f"epoch {epoch}/{cfg.epochs}"
    bar = tqdm(total=steps, desc=desc, unit="batch", file=sys.stderr, disable=not progress)
    for step in range(steps):
        idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        # Outlier exposure (train.augment.outliers) relabels some images as OUTLIER (-1).
        x, y = prepare_training_batch(images[idx], labels[idx], mean, std, cfg.augment, t.data_gen)
        with torch.autocast(device.type, dtype=t.amp_dtype, enabled=t.amp_dtype is not None):
            logits = t.forward(x.contiguous(memory_format=memory_format))
        loss = training_loss(logits.float(), y, cfg.label_smoothing)
        # Record the first non-finite step without a host sync; checked every few steps.
        bad_now = ~torch.isfinite(loss.detach())
        first_bad = torch.where(bad_now & (first_bad < 0), step, first_bad)
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t.optimizer.step()
        t.scheduler.step()
        if t.ema is not None:
            t.ema.update_parameters(t.model)
        loss_sum += loss.detach().double() * y.shape[0]
        correct += (logits.detach().argmax(1) == y).sum()
        if (step + 1) % _SYNC_EVERY == 0 or step + 1 == steps:
            if int(first_bad) >= 0:
                raise NonFiniteLossError(
                    f"non-finite training loss at epoch {epoch}, step {int(first_bad)}; "
                    "the last good checkpoint is kept (lower train.lr or check the data)"
                )
            seen = (step + 1) * cfg.batch_size
            bar.set_postfix(
                loss=f"{float(loss_sum) / seen:.4f}",
                acc=f"{int(correct) / seen:.4f}",
                img_s=f"{seen / max(time.perf_counter() - t0, 1e-9):.0f}",
                refresh=False,
            )
            bar.update((step + 1) - bar.n)
    bar.close()
    seen = steps * cfg.batch_size
    return float(loss_sum) / seen, int(correct) / seen, seen / (time.perf_counter() - t0)


@torch.no_grad()
def loss_and_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: float,
    std: float,
    batch_size: int,
    channels_last: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy (no smoothing) and accuracy of ``model`` on a device-resident split.

    ``images``: ``(N, 28, 28) uint8``; ``labels``: ``(N,) int64``. Returns ``(nan, nan)``
    for an empty split.
    """
    n = int(labels.shape[0])
    if n == 0:
        return math.nan, math.nan
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=images.device, dtype=torch.float64)
    correct = torch.zeros((), device=images.device, dtype=torch.int64)
    for start in range(0, n, batch_size):
        x = prepare_batch(images[start : start + batch_size], mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels[start : start + batch_size]
        with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    return float(loss_sum) / n, int(correct) / n


def fit(
    arrays: SplitArrays,
    mean: float,
    std: float,
    cfg: TrainConfig,
    *,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``cfg.model`` on ``arrays`` (the TRAIN split; a val split is carved out of it).

    ``arrays.images``: ``(N, 28, 28) uint8``; ``labels``: ``(N,) uint8`` in [0, 9].
    ``mean``/``std``: training-pixel statistics on the [0, 1] scale.
    ``checkpoint_dir``: where ``last.pt`` is written after every epoch (None: nowhere).
    ``resume``: continue from that checkpoint (:class:`CheckpointError` if missing or
    from another config). ``on_epoch``: called with each epoch's record after its
    checkpoint; returning True stops training (``completed`` is then False and the
    checkpoint can be resumed), e.g. an Optuna pruner.

    Raises :class:`NonFiniteLossError` on a NaN/Inf loss (the checkpoint on disk is the
    last good epoch, untouched) and :class:`ConfigError` for impossible settings.
    """
    t_setup = time.perf_counter()
    device = select_device(cfg.device, torch.cuda.is_available)  # looked up now: tests fake it
    runtime = configure_runtime(device, cfg.num_threads, cfg.amp, cfg.channels_last, cfg.compile)
    splits = _device_splits(arrays, cfg, device)
    amp_dtype = torch.bfloat16 if runtime.amp_dtype == "bfloat16" else None
    t = build_trainer(cfg, device, amp_dtype, (splits.n_train // cfg.batch_size) * cfg.epochs)
    cfg_hash = train_config_hash(
        cfg, {"n": splits.n_train + splits.n_val, "mean": round(mean, 8), "std": round(std, 8)}
    )
    history = _start_history(t, cfg_hash, checkpoint_dir, resume)
    setup_seconds = time.perf_counter() - t_setup

    for epoch in range(len(history) + 1, cfg.epochs + 1):
        record = _one_epoch(t, splits, mean, std, cfg, amp_dtype, epoch, progress)
        history.append(record)
        if checkpoint_dir is not None:
            state = {**t.state_dict(), "epoch": epoch, "history": [asdict(r) for r in history]}
            save_checkpoint(checkpoint_dir, cfg_hash, state)
        if on_epoch is not None and on_epoch(record):
            break

    final = t.eval_model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    return _result(final, history, cfg, splits, setup_seconds, runtime)


@dataclass(frozen=True)
class _Splits:
    """The train and validation splits on the device: images ``(N, 28, 28) uint8``,
    labels ``(N,) int64``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    @property
    def n_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def n_val(self) -> int:
        return int(self.y_val.shape[0])


def _device_splits(arrays: SplitArrays, cfg: TrainConfig, device: torch.device) -> _Splits:
    """Carve the validation split out of ``arrays`` and put both on ``device``."""
    train_np, val_np = carve(arrays, cfg)
    if len(train_np) < cfg.batch_size:
        raise ConfigError(
            f"train.batch_size: {cfg.batch_size} exceeds the {len(train_np)} training images"
        )
    # ONE uint8 tensor per split on the device (55000 x 784 B = 43 MB for MNIST).
    return _Splits(
        x_train=torch.from_numpy(train_np.images).to(device),
        y_train=torch.from_numpy(train_np.labels).to(device=device, dtype=torch.int64),
        x_val=torch.from_numpy(val_np.images).to(device),
        y_val=torch.from_numpy(val_np.labels).to(device=device, dtype=torch.int64),
    )


def _start_history(
    t: Trainer, cfg_hash: str, checkpoint_dir: Path | None, resume: bool
) -> list[EpochRecord]:
    """The epochs done so far: a resumed checkpoint's (loaded into ``t``), else none."""
    if checkpoint_dir is not None and resume:
        ck = load_checkpoint(checkpoint_dir, cfg_hash)
        t.load_state_dict(ck)
        return [EpochRecord(**row) for row in ck["history"]]
    if checkpoint_dir is not None:
        clear_checkpoints(checkpoint_dir)
    elif resume:
        raise ConfigError("resume requested but no checkpoint directory given")
    return []


def _one_epoch(
    t: Trainer,
    s: _Splits,
    mean: float,
    std: float,
    cfg: TrainConfig,
    amp_dtype: torch.dtype | None,
    epoch: int,
    progress: bool,
) -> EpochRecord:
    """Train one epoch, then score the validation split."""
    t0 = time.perf_counter()
    loss, acc, ips = train_one_epoch(t, s.x_train, s.y_train, mean, std, epoch, progress)
    val_loss, val_acc = loss_and_accuracy(
        t.eval_model, s.x_val, s.y_val, mean, std, cfg.eval_batch_size, cfg.channels_last, amp_dtype
    )
    lr = float(t.optimizer.param_groups[0]["lr"])
    record = EpochRecord(epoch, loss, acc, val_loss, val_acc, lr, ips, time.perf_counter() - t0)
    if progress:
        print(
            f"epoch {epoch}: train_loss {loss:.4f} val_loss {val_loss:.4f} "
            f"val_acc {val_acc:.4f} {ips:.0f} img/s {record.seconds:.1f} s",
            file=sys.stderr,
        )
    return record


def _result(
    final: nn.Module,
    history: list[EpochRecord],
    cfg: TrainConfig,
    s: _Splits,
    setup_seconds: float,
    runtime: RuntimeInfo,
) -> TrainResult:
    """The run's metrics (numbers, for dvclive) and info (what ran), around the model."""
    train_seconds = sum(r.seconds for r in history)
    n_images = len(history) * (s.n_train // cfg.batch_size) * cfg.batch_size
    last = history[-1]  # never empty: epochs >= 1, and a resumed run has its history
    metrics: dict[str, float | int] = {
        "val_accuracy": last.val_accuracy,
        "val_loss": last.val_loss,
        "train_loss": last.train_loss,
        "train_seconds": round(train_seconds, 3),
        "images_per_second": round(n_images / train_seconds, 1) if train_seconds > 0 else 0.0,
        "parameters": count_parameters(final),
        "epochs": len(history),
        # Linux reports ru_maxrss in KiB.
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    info: dict[str, Any] = {
        "model": cfg.model,
        "width": cfg.width,
        "seed": cfg.seed,
        "ema": cfg.ema_decay > 0,
        "epochs_planned": cfg.epochs,
        "completed": len(history) == cfg.epochs,
        "train_images": s.n_train,
        "val_images": s.n_val,
        "setup_seconds": round(setup_seconds, 3),
        "runtime": asdict(runtime),
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
    }
    return TrainResult(final, history, metrics, info, completed=info["completed"])


def log_to_dvclive(directory: Path, history: list[EpochRecord], summary: dict[str, Any]) -> None:
    """Write ``history`` (one step per epoch) and ``summary`` as a dvclive directory.

    Gives ``directory/metrics.json`` (``summary`` plus dvclive's ``step``) and
    ``directory/plots/metrics/<field>.tsv`` for every :class:`EpochRecord` field but
    ``epoch`` and ``seconds``. Only the files: no dvc.yaml, no experiment, no report.
    """
    from pipeline.core.live_files import FileLive

    live = FileLive(str(directory))
    for record in history:
        live.step = record.epoch
        for name, value in asdict(record).items():
            if name not in ("epoch", "seconds"):
                live.log_metric(name, value)
    live.summary = dict(summary)
    # make_summary, not end(): end() would `git add` files under the (staging) directory
    # during `dvc exp run` and talk to Studio.
    live.make_summary()


def run_train_stage(cfg: Config, resume: bool) -> TrainResult:
    """The DVC/CLI stage: read prepared data and stats, train, then write every output.

    Outputs (paths from ``cfg.train``): the model file, the dvclive directory
    (``live_dir``: numbers only) and ``run_info_path`` (JSON: hashes, paths, dates,
    runtime, versions). None of them changes before training has finished.
    """
    tc = cfg.train
    started = datetime.now(UTC).isoformat(timespec="seconds")
    mean, std = read_normalization(cfg.validate.stats_path)
    arrays = load_split(cfg.data.prepared_dir, "train", mmap=True)
    result = fit(arrays, mean, std, tc, checkpoint_dir=tc.checkpoint_dir, resume=resume)
    result.info.update(
        params_hash=cfg.params_hash(),
        profile=cfg.profile,
        train_config=to_dict(tc),
        started_at=started,
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        model_path=str(tc.model_path),
    )
    # Each output is replaced whole (an atomic file write, a journalled directory swap).
    meta = {"train": {**result.metrics, **result.info}}
    save_model_file(tc.model_path, result.model, tc.model, tc.width, mean, std, meta=meta)
    result.info["model_sha256"] = sha256_file(tc.model_path)
    with atomic_dir(Path(tc.live_dir)) as live_tmp:
        log_to_dvclive(live_tmp, result.history, result.metrics)
    write_json(tc.run_info_path, result.info)
    return result
