"""The training loop on tiny synthetic data: learning, determinism, resume, NaN, files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.checkpoint import checkpoint_path
from pipeline.config import AugmentConfig, TrainConfig, config_from_dict, to_dict
from pipeline.dataset import SplitArrays, images_path, labels_path
from pipeline.errors import CheckpointError, ConfigError, NonFiniteLossError
from pipeline.model_io import load_model_file
from pipeline.train import HISTORY_COLUMNS, split_train_val, train

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = 0.1, 0.3


def learnable_arrays(n: int, seed: int = 0) -> SplitArrays:
    """``(n, 28, 28) uint8``: class k is a bright 6x6 block at one of 10 fixed spots, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        r, c = 3 + 8 * (int(k) // 4), 3 + 6 * (int(k) % 4)
        images[i, r : r + 6, c : c + 6] = 230
    return SplitArrays(images=images, labels=labels)


def tiny_cfg(**kw: object) -> TrainConfig:
    base = TrainConfig(
        model="cnn",
        width=4,
        device="cpu",
        seed=0,
        epochs=2,
        batch_size=64,
        eval_batch_size=500,
        val_size=200,
        lr=0.05,
        num_threads=1,
        augment=AugmentConfig(max_shift_px=1.0, max_rotation_deg=5.0, scale_range=(0.95, 1.05)),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def data() -> SplitArrays:
    return learnable_arrays(2000)


def test_loss_falls_and_model_learns(data: SplitArrays) -> None:
    result = train(data, MEAN, STD, tiny_cfg(epochs=3), progress=False)
    first, last = result.history[0], result.history[-1]
    assert last.train_loss < first.train_loss
    assert last.val_accuracy > 0.8  # 10 classes: chance is 0.1
    assert [r.epoch for r in result.history] == [1, 2, 3]
    assert result.completed and result.metrics["epochs"] == 3
    assert result.metrics["runtime_device"] == "cpu"
    assert not any(p.is_cuda for p in result.model.parameters())


def test_same_seed_same_weights_other_seed_differs(data: SplitArrays) -> None:
    cfg = tiny_cfg(epochs=1)
    a = weights(train(data, MEAN, STD, cfg, progress=False).model)
    b = weights(train(data, MEAN, STD, cfg, progress=False).model)
    c = weights(train(data, MEAN, STD, replace(cfg, seed=1), progress=False).model)
    assert_same_weights(a, b)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_interrupt_and_resume_equals_uninterrupted(
    data: SplitArrays, tmp_path: Path, ema_decay: float
) -> None:
    cfg = tiny_cfg(epochs=2, ema_decay=ema_decay, optimizer="adamw", lr=0.01)
    full = train(data, MEAN, STD, cfg, checkpoint_dir=tmp_path / "a", progress=False)

    part = train(
        data, MEAN, STD, cfg, checkpoint_dir=tmp_path / "b", stop_after_epochs=1, progress=False
    )
    assert not part.completed and len(part.history) == 1
    resumed = train(
        data, MEAN, STD, cfg, checkpoint_dir=tmp_path / "b", resume=True, progress=False
    )

    assert resumed.completed
    assert_same_weights(weights(full.model), weights(resumed.model))
    strip = [(r.epoch, r.train_loss, r.val_loss, r.val_accuracy, r.lr) for r in full.history]
    again = [(r.epoch, r.train_loss, r.val_loss, r.val_accuracy, r.lr) for r in resumed.history]
    assert strip == again


def test_nan_loss_raises_and_keeps_last_good_checkpoint(data: SplitArrays, tmp_path: Path) -> None:
    cfg = tiny_cfg(epochs=2)
    ckpt_dir = tmp_path / "ck"

    def poison(epoch: int, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if (epoch, step) == (2, 3) else loss

    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 3"):
        # Stop after epoch 1 first so the file's bytes can be captured, then poison epoch 2.
        train(data, MEAN, STD, cfg, checkpoint_dir=ckpt_dir, stop_after_epochs=1, progress=False)
        before = checkpoint_path(ckpt_dir).read_bytes()
        train(
            data, MEAN, STD, cfg, checkpoint_dir=ckpt_dir, resume=True, loss_hook=poison,
            progress=False,
        )  # fmt: skip
    assert checkpoint_path(ckpt_dir).read_bytes() == before
    ck = torch.load(checkpoint_path(ckpt_dir), weights_only=True)
    assert ck["epoch"] == 1


def test_inf_in_first_epoch_raises_with_no_checkpoint_left_behind(
    data: SplitArrays, tmp_path: Path
) -> None:
    def inf(epoch: int, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss + float("inf") if step == 0 else loss

    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 0"):
        train(data, MEAN, STD, tiny_cfg(), checkpoint_dir=tmp_path, loss_hook=inf, progress=False)
    assert not checkpoint_path(tmp_path).exists()


def test_checkpoint_of_other_config_is_refused(data: SplitArrays, tmp_path: Path) -> None:
    cfg = tiny_cfg(epochs=2)
    train(data, MEAN, STD, cfg, checkpoint_dir=tmp_path, stop_after_epochs=1, progress=False)
    with pytest.raises(CheckpointError, match="different train config"):
        train(
            data, MEAN, STD, replace(cfg, lr=0.07), checkpoint_dir=tmp_path, resume=True,
            progress=False,
        )  # fmt: skip
    # Output paths are not part of the identity: the same run may write elsewhere.
    moved = replace(cfg, metrics_path=tmp_path / "elsewhere.json")
    out = train(data, MEAN, STD, moved, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert out.completed


def test_resume_without_checkpoint_is_an_error(data: SplitArrays, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(data, MEAN, STD, tiny_cfg(), checkpoint_dir=tmp_path, resume=True, progress=False)


def test_fresh_run_replaces_old_checkpoint(data: SplitArrays, tmp_path: Path) -> None:
    cfg = tiny_cfg(epochs=2)
    train(data, MEAN, STD, cfg, checkpoint_dir=tmp_path, stop_after_epochs=1, progress=False)

    def boom(epoch: int, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan")

    # A fresh run (no resume) discards the old checkpoint before its first step.
    with pytest.raises(NonFiniteLossError):
        train(data, MEAN, STD, cfg, checkpoint_dir=tmp_path, loss_hook=boom, progress=False)
    assert not checkpoint_path(tmp_path).exists()


def test_val_split_is_deterministic_and_disjoint() -> None:
    arrays = SplitArrays(
        images=np.arange(100 * 784, dtype=np.uint32).reshape(100, 28, 28).astype(np.uint8),
        labels=(np.arange(100) % 10).astype(np.uint8),
    )
    idx = SplitArrays(images=arrays.images, labels=np.arange(100).astype(np.uint8))
    tr1, va1 = split_train_val(idx, 20, seed=3)
    tr2, va2 = split_train_val(idx, 20, seed=3)
    _, va3 = split_train_val(idx, 20, seed=4)
    assert np.array_equal(va1.labels, va2.labels) and np.array_equal(tr1.labels, tr2.labels)
    assert not np.array_equal(va1.labels, va3.labels)
    assert len(va1) == 20 and len(tr1) == 80
    assert set(tr1.labels.tolist()).isdisjoint(va1.labels.tolist())
    with pytest.raises(ConfigError, match="val_size"):
        split_train_val(idx, 100, seed=0)


def test_batch_larger_than_train_set_is_a_config_error(data: SplitArrays) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        train(data, MEAN, STD, tiny_cfg(batch_size=5000), progress=False)


def test_cuda_request_without_gpu_is_a_config_error(data: SplitArrays) -> None:
    with pytest.raises(ConfigError, match="cuda"):
        train(
            data, MEAN, STD, tiny_cfg(device="cuda"), progress=False,
            is_cuda_available=lambda: False,
        )  # fmt: skip


@pytest.mark.parametrize("model", ["mlp", "seed_cnn", "cnn"])
def test_every_model_trains(data: SplitArrays, model: str) -> None:
    cfg = tiny_cfg(model=model, epochs=1, schedule="cosine", channels_last=model != "mlp")
    result = train(data, MEAN, STD, cfg, progress=False)
    assert result.metrics["model"] == model
    assert np.isfinite(result.history[0].train_loss)


def _write_prepared(root: Path, arrays: SplitArrays) -> Path:
    prepared = root / "prepared"
    prepared.mkdir(parents=True)
    np.save(images_path(prepared, "train"), arrays.images)
    np.save(labels_path(prepared, "train"), arrays.labels)
    stats = root / "data_stats.json"
    stats.write_text(json.dumps({"normalization": {"mean": MEAN, "std": STD}}))
    return prepared


def _params(root: Path, prepared: Path) -> dict[str, object]:
    raw: dict[str, object] = {
        "data": {"prepared_dir": str(prepared)},
        "validate": {"stats_path": str(root / "data_stats.json")},
        "train": {
            **{k: v for k, v in to_dict(tiny_cfg(epochs=1)).items() if k != "augment"},
            "checkpoint_dir": str(root / "ck"),
            "model_path": str(root / "model.pt"),
            "metrics_path": str(root / "train.json"),
            "history_path": str(root / "history.csv"),
        },
    }
    return raw


def test_run_train_stage_writes_model_metrics_history(data: SplitArrays, tmp_path: Path) -> None:
    from pipeline.train import run_train_stage

    prepared = _write_prepared(tmp_path, data)
    cfg = config_from_dict(_params(tmp_path, prepared))
    run_train_stage(cfg, resume=False)

    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    assert payload["model"] == {"name": "cnn", "width": 4}
    loaded = load_model_file(tmp_path / "model.pt")
    assert loaded.mean == MEAN and loaded.std == STD

    metrics = json.loads((tmp_path / "train.json").read_text())
    for key in ("val_accuracy", "val_loss", "epochs", "train_seconds", "images_per_s"):
        assert key in metrics
    assert metrics["params_hash"] == cfg.params_hash()
    assert metrics["seed"] == 0 and metrics["runtime_device"] == "cpu"
    assert 0 < metrics["peak_rss_mib"] < 4096
    assert payload["meta"]["train"]["val_accuracy"] == metrics["val_accuracy"]

    with open(tmp_path / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0].keys()) == HISTORY_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1]
    assert (tmp_path / "ck" / "last.pt").is_file()


def test_cli_train_and_resume(data: SplitArrays, tmp_path: Path) -> None:
    """The real CLI: a fresh run, then --resume of a finished run changes nothing."""
    import yaml

    prepared = _write_prepared(tmp_path, data)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_params(tmp_path, prepared)))
    cmd = [sys.executable, "-m", "pipeline", "--params", str(params), "train"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "epoch 1/1" in first.stderr  # the progress bar goes to stderr
    model_bytes = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]

    again = subprocess.run(
        [*cmd, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr
    resumed = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    assert_same_weights(model_bytes, resumed)
