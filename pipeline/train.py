"""The train stage: a fast, reproducible, resumable training loop.

Data path: the training images stay ONE ``uint8`` tensor on the device; every epoch
draws a permutation from an explicit ``torch.Generator`` and batches are index slices
of it. Conversion to float, augmentation and normalisation happen per batch on the
device (:mod:`pipeline.augment`). There is no DataLoader and no per-sample Python.

A validation split (``train.val_size`` images, chosen from the seed) is carved out
of the training set for monitoring and reporting; the test set is never loaded here.

``train`` is the typed, file-free core (tests call it directly); ``run_train_stage``
wires it to params, the prepared arrays and the output files.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.atomic import write_json, write_text
from pipeline.augment import prepare_batch
from pipeline.checkpoint import (
    clear_checkpoints,
    load_checkpoint,
    save_checkpoint,
    train_config_hash,
)
from pipeline.config import Config, TrainConfig, to_dict
from pipeline.dataset import SplitArrays, load_split
from pipeline.device import configure_runtime, select_device
from pipeline.errors import ConfigError, NonFiniteLossError
from pipeline.model_io import save_model_file
from pipeline.models import build_model, count_parameters
from pipeline.stats import read_normalization

HISTORY_COLUMNS = (
    "epoch",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "lr",
    "images_per_s",
    "seconds",
)
# Steps between host syncs (progress bar refresh and the NaN/Inf check).
_SYNC_EVERY = 25

# Called with (epoch, step, loss) inside the loop; returns the loss to backpropagate.
# Tests use it to inject a NaN; production passes None.
LossHook = Callable[[int, int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EpochRecord:
    """One row of the history CSV. ``epoch`` counts from 1."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    images_per_s: float
    seconds: float


@dataclass
class TrainResult:
    """The trained model (on the CPU, eval mode) and what happened."""

    model: nn.Module
    history: list[EpochRecord]
    metrics: dict[str, Any]
    completed: bool  # False when stopped early by ``stop_after_epochs``
    extra: dict[str, Any] = field(default_factory=dict)


def split_train_val(
    arrays: SplitArrays, val_size: int, seed: int
) -> tuple[SplitArrays, SplitArrays]:
    """Carve ``val_size`` images out of the training split, deterministically from ``seed``.

    Returns ``(train, val)`` as in-memory copies. ``val_size`` 0 gives an empty val split.
    """
    n = len(arrays)
    if val_size >= n:
        raise ConfigError(f"train.val_size: {val_size} leaves no training images (have {n})")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).numpy()
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    images, labels = arrays.images, arrays.labels
    return (
        SplitArrays(images=images[train_idx], labels=labels[train_idx]),
        SplitArrays(images=images[val_idx], labels=labels[val_idx]),
    )


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm parameters and biases (1-D tensors).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
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


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model for parameters; buffers are copied."""
    ema_p: list[torch.Tensor] = list(ema.parameters())
    cur_p: list[torch.Tensor] = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_p, cur_p, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)


@torch.no_grad()
def evaluate_split(
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
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    return float(loss_sum) / n, int(correct) / n


def _rng_state(data_gen: torch.Generator, device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "data": data_gen.get_state(),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], data_gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    data_gen.set_state(state["data"])
    random.setstate(_as_python_state(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_python_state(obj: Any) -> Any:
    # random.setstate wants tuples; a round trip through torch.save keeps them, but be strict.
    if isinstance(obj, list):
        return tuple(_as_python_state(v) for v in obj)
    return obj


def _peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def train(
    arrays: SplitArrays,
    mean: float,
    std: float,
    cfg: TrainConfig,
    *,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    loss_hook: LossHook | None = None,
    progress: bool = True,
    is_cuda_available: Callable[[], bool] = torch.cuda.is_available,
) -> TrainResult:
    """Train ``cfg.model`` on ``arrays`` (the TRAIN split; a val split is carved out of it).

    ``arrays.images``: ``(N, 28, 28) uint8``; ``labels``: ``(N,) uint8`` in [0, 9].
    ``mean``/``std``: training-pixel statistics on the [0, 1] scale.
    ``checkpoint_dir``: where ``last.pt`` is written after every epoch (None: nowhere).
    ``resume``: continue from that checkpoint (:class:`CheckpointError` if missing or
    from another config). ``stop_after_epochs``: return after this many epochs in
    total (simulates an interruption; the checkpoint is kept). ``loss_hook``: test hook.

    Raises :class:`NonFiniteLossError` on a NaN/Inf loss (the checkpoint on disk is the
    last good epoch, untouched) and :class:`ConfigError` for impossible settings.
    """
    t_setup = time.perf_counter()
    device = select_device(cfg.device, is_cuda_available)
    runtime = configure_runtime(device, cfg.num_threads, cfg.amp, cfg.channels_last, cfg.compile)
    amp_dtype = torch.bfloat16 if runtime.amp_dtype == "bfloat16" else None

    if cfg.max_train_samples is not None and cfg.max_train_samples < len(arrays):
        arrays = SplitArrays(
            images=arrays.images[: cfg.max_train_samples],
            labels=arrays.labels[: cfg.max_train_samples],
        )
    train_np, val_np = split_train_val(arrays, cfg.val_size, cfg.seed)
    n_train = len(train_np)
    if n_train < cfg.batch_size:
        raise ConfigError(
            f"train.batch_size: {cfg.batch_size} exceeds the {n_train} training images"
        )
    steps_per_epoch = n_train // cfg.batch_size  # the ragged tail is dropped (BatchNorm)
    total_steps = steps_per_epoch * cfg.epochs

    # ONE uint8 tensor per split on the device (55000 x 784 B = 43 MB for MNIST).
    x_train = torch.from_numpy(train_np.images).to(device)
    y_train = torch.from_numpy(train_np.labels).to(device=device, dtype=torch.int64)
    x_val = torch.from_numpy(val_np.images).to(device)
    y_val = torch.from_numpy(val_np.labels).to(device=device, dtype=torch.int64)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)  # permutations + augmentation
    model = build_model(cfg.model, cfg.width).to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    ema = copy.deepcopy(model).eval() if cfg.ema_decay > 0 else None
    for p in ema.parameters() if ema is not None else ():
        p.requires_grad_(False)
    opt = _make_optimizer(model, cfg)
    sched = _make_scheduler(opt, cfg, total_steps)
    step_model: Callable[[torch.Tensor], torch.Tensor] = model
    if cfg.compile:
        step_model = torch.compile(model)

    cfg_hash = train_config_hash(
        cfg, {"n": len(arrays), "mean": round(mean, 8), "std": round(std, 8)}
    )
    history: list[EpochRecord] = []
    start_epoch = 0
    train_seconds = 0.0
    if checkpoint_dir is not None and resume:
        ck = load_checkpoint(checkpoint_dir, cfg_hash)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        _set_rng_state(ck["rng"], data_gen, device)
        start_epoch = int(ck["epoch"])
        history = [EpochRecord(**row) for row in ck["history"]]
        train_seconds = float(ck["train_seconds"])
    elif checkpoint_dir is not None:
        clear_checkpoints(checkpoint_dir)
    elif resume:
        raise ConfigError("resume requested but no checkpoint directory given")

    last_epoch = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, stop_after_epochs)
    eval_model = ema if ema is not None else model
    setup_seconds = time.perf_counter() - t_setup

    for epoch in range(start_epoch + 1, last_epoch + 1):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n_train, generator=data_gen).to(device)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        first_bad = torch.full((), -1, device=device, dtype=torch.int64)
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{cfg.epochs}",
            unit="batch",
            file=sys.stderr,
            disable=not progress,
            leave=True,
            dynamic_ncols=True,
        )
        seen = 0
        for step in range(steps_per_epoch):
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x = prepare_batch(x_train[idx], mean, std, cfg.augment, data_gen)
            x = x.contiguous(memory_format=memory_format)
            y = y_train[idx]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = step_model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            if loss_hook is not None:
                loss = loss_hook(epoch, step, loss)
            # Record the first non-finite step without a host sync; checked every few steps.
            bad_now = ~torch.isfinite(loss.detach())
            first_bad = torch.where(bad_now & (first_bad < 0), step, first_bad)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                _ema_update(ema, model, cfg.ema_decay)
            loss_sum += loss.detach().double() * y.shape[0]
            correct += (logits.detach().argmax(1) == y).sum()
            seen += int(y.shape[0])
            if (step + 1) % _SYNC_EVERY == 0 or step + 1 == steps_per_epoch:
                _raise_if_bad(int(first_bad), epoch)
                elapsed = time.perf_counter() - t0
                bar.set_postfix(
                    loss=f"{float(loss_sum) / seen:.4f}",
                    acc=f"{int(correct) / seen:.4f}",
                    img_s=f"{seen / max(elapsed, 1e-9):.0f}",
                    refresh=False,
                )
                bar.update((step + 1) - bar.n)
        bar.close()
        epoch_train_s = time.perf_counter() - t0
        val_loss, val_acc = evaluate_split(
            eval_model, x_val, y_val, mean, std, cfg.eval_batch_size, cfg.channels_last, amp_dtype
        )
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        record = EpochRecord(
            epoch=epoch,
            train_loss=float(loss_sum) / seen,
            train_accuracy=int(correct) / seen,
            val_loss=val_loss,
            val_accuracy=val_acc,
            lr=float(opt.param_groups[0]["lr"]),
            images_per_s=seen / epoch_train_s,
            seconds=seconds,
        )
        history.append(record)
        if progress:
            print(
                f"epoch {epoch}: train_loss {record.train_loss:.4f} "
                f"val_loss {val_loss:.4f} val_acc {val_acc:.4f} "
                f"{record.images_per_s:.0f} img/s {seconds:.1f} s",
                file=sys.stderr,
            )
        if checkpoint_dir is not None:
            save_checkpoint(
                checkpoint_dir,
                cfg_hash,
                {
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "rng": _rng_state(data_gen, device),
                    "history": [asdict(r) for r in history],
                    "train_seconds": train_seconds,
                },
            )

    final = (ema if ema is not None else model).to("cpu").to(memory_format=torch.contiguous_format)
    final.eval()
    n_images = sum(1 for _ in history) * steps_per_epoch * cfg.batch_size
    last = history[-1] if history else None
    metrics: dict[str, Any] = {
        "model": cfg.model,
        "width": cfg.width,
        "parameters": count_parameters(final),
        "seed": cfg.seed,
        "epochs": len(history),
        "epochs_planned": cfg.epochs,
        "train_images": n_train,
        "val_images": len(val_np),
        "val_accuracy": last.val_accuracy if last else math.nan,
        "val_loss": last.val_loss if last else math.nan,
        "train_loss": last.train_loss if last else math.nan,
        "train_seconds": round(train_seconds, 3),
        "setup_seconds": round(setup_seconds, 3),
        "images_per_s": round(n_images / train_seconds, 1) if train_seconds > 0 else 0.0,
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "ema": cfg.ema_decay > 0,
        "device": runtime.device,
        **{f"runtime_{k}": v for k, v in asdict(runtime).items()},
        "torch_version": str(torch.__version__),
    }
    return TrainResult(
        model=final, history=history, metrics=metrics, completed=len(history) == cfg.epochs
    )


def _raise_if_bad(first_bad_step: int, epoch: int) -> None:
    if first_bad_step >= 0:
        raise NonFiniteLossError(
            f"non-finite training loss at epoch {epoch}, step {first_bad_step}; "
            "the last good checkpoint is kept (lower train.lr or check the data)"
        )


def history_csv(history: list[EpochRecord]) -> str:
    """The per-epoch history as CSV text with :data:`HISTORY_COLUMNS`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for rec in history:
        writer.writerow({k: _fmt(v) for k, v in asdict(rec).items()})
    return buf.getvalue()


def _fmt(v: float | int) -> str:
    return str(v) if isinstance(v, int) else f"{v:.6g}"


def run_train_stage(cfg: Config, resume: bool) -> TrainResult:
    """The DVC/CLI stage: read prepared data and stats, train, write model/metrics/history."""
    tc = cfg.train
    mean, std = read_normalization(cfg.validate.stats_path)
    arrays = load_split(cfg.data.prepared_dir, "train", mmap=True)
    result = train(arrays, mean, std, tc, checkpoint_dir=tc.checkpoint_dir, resume=resume)
    metrics = {
        **result.metrics,
        "params_hash": cfg.params_hash(),
        "profile": cfg.profile,
        "train_config": to_dict(tc),
    }
    save_model_file(
        tc.model_path, result.model, tc.model, tc.width, mean, std, meta={"train": metrics}
    )
    write_text(tc.history_path, history_csv(result.history))
    write_json(tc.metrics_path, {k: v for k, v in metrics.items() if k != "train_config"})
    result.metrics = metrics
    return result
