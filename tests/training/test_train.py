"""The training loop on tiny synthetic data: learning, determinism, resume, NaN, files."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.training.train as train_mod
from pipeline.core.atomic import sha256_file
from pipeline.core.config import AugmentConfig, TrainConfig, config_from_dict, to_dict
from pipeline.core.errors import CheckpointError, ConfigError, NonFiniteLossError
from pipeline.data.dataset import SplitArrays, images_path, labels_path
from pipeline.training.checkpoint import checkpoint_path
from pipeline.training.model_io import load_model_file
from pipeline.training.train import EpochRecord, build_trainer, fit, run_train_stage

ROOT = Path(__file__).resolve().parents[2]
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


def poison_forward(monkeypatch: pytest.MonkeyPatch, at: int | None, value: float) -> None:
    """Models built by ``fit`` return ``logits * value`` from training-mode call ``at``.

    ``at`` counts training forwards of this run from 0 (None: every one). A forward hook
    is not part of the state dict, so checkpoints stay compatible.
    """
    calls = itertools.count()
    real = train_mod.build_model

    def build(name: str, width: int) -> torch.nn.Module:
        model = real(name, width)

        def hook(mod: torch.nn.Module, args: object, out: torch.Tensor) -> torch.Tensor | None:
            if mod.training and (at is None or next(calls) == at):
                return out * value
            return None

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train_mod, "build_model", build)


def stop_after(epochs: int) -> Callable[[EpochRecord], bool]:
    return lambda record: record.epoch >= epochs


def test_loss_falls_and_model_learns(data: SplitArrays) -> None:
    result = fit(data, MEAN, STD, tiny_cfg(epochs=3), progress=False)
    first, last = result.history[0], result.history[-1]
    assert last.train_loss < first.train_loss
    assert last.val_accuracy > 0.8  # 10 classes: chance is 0.1
    assert [r.epoch for r in result.history] == [1, 2, 3]
    assert result.completed and result.metrics["epochs"] == 3
    assert result.metrics["val_accuracy"] == last.val_accuracy
    assert result.info["runtime"]["device"] == "cpu"
    assert not any(p.is_cuda for p in result.model.parameters())


def test_same_seed_same_weights_other_seed_differs(data: SplitArrays) -> None:
    cfg = tiny_cfg(epochs=1)
    a = weights(fit(data, MEAN, STD, cfg, progress=False).model)
    b = weights(fit(data, MEAN, STD, cfg, progress=False).model)
    c = weights(fit(data, MEAN, STD, replace(cfg, seed=1), progress=False).model)
    assert_same_weights(a, b)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_callback_sees_every_epoch_and_can_stop(data: SplitArrays) -> None:
    seen: list[tuple[int, float]] = []

    def prune(record: EpochRecord) -> bool:
        seen.append((record.epoch, record.val_accuracy))
        return record.epoch == 2

    result = fit(data, MEAN, STD, tiny_cfg(epochs=4), on_epoch=prune, progress=False)
    assert [e for e, _ in seen] == [1, 2]
    assert [acc for _, acc in seen] == [r.val_accuracy for r in result.history]
    assert not result.completed and not result.info["completed"]
    assert result.metrics["epochs"] == 2


def test_ema_averages_parameters_and_batchnorm_buffers() -> None:
    cfg = tiny_cfg(ema_decay=0.9)
    t = build_trainer(cfg, torch.device("cpu"), None, total_steps=10)
    assert t.ema is not None
    t.ema.update_parameters(t.model)  # the first update copies the model
    before = weights(t.ema.module)
    with torch.no_grad():
        for tensor in [*t.model.parameters(), *t.model.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(1.0)
    t.ema.update_parameters(t.model)
    after = weights(t.ema.module)
    bn_mean = next(k for k in after if k.endswith("running_mean"))
    for key in ("0.weight", bn_mean):
        assert torch.allclose(after[key], before[key] + 0.1), key
    assert t.eval_model is t.ema.module


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_interrupt_and_resume_equals_uninterrupted(
    data: SplitArrays, tmp_path: Path, ema_decay: float
) -> None:
    cfg = tiny_cfg(epochs=2, ema_decay=ema_decay, optimizer="adamw", lr=0.01)
    full = fit(data, MEAN, STD, cfg, checkpoint_dir=tmp_path / "a", progress=False)

    part = fit(
        data, MEAN, STD, cfg, checkpoint_dir=tmp_path / "b", on_epoch=stop_after(1),
        progress=False,
    )  # fmt: skip
    assert not part.completed and len(part.history) == 1
    resumed = fit(data, MEAN, STD, cfg, checkpoint_dir=tmp_path / "b", resume=True, progress=False)

    assert resumed.completed
    assert_same_weights(weights(full.model), weights(resumed.model))
    strip = [(r.epoch, r.train_loss, r.val_loss, r.val_accuracy, r.lr) for r in full.history]
    again = [(r.epoch, r.train_loss, r.val_loss, r.val_accuracy, r.lr) for r in resumed.history]
    assert strip == again


def test_nan_loss_raises_and_keeps_last_good_checkpoint(
    data: SplitArrays, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_cfg(epochs=2)
    ckpt_dir = tmp_path / "ck"
    fit(data, MEAN, STD, cfg, checkpoint_dir=ckpt_dir, on_epoch=stop_after(1), progress=False)
    before = checkpoint_path(ckpt_dir).read_bytes()
    poison_forward(monkeypatch, at=3, value=float("nan"))  # epoch 2, step 3 after resuming
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 3"):
        fit(data, MEAN, STD, cfg, checkpoint_dir=ckpt_dir, resume=True, progress=False)
    assert checkpoint_path(ckpt_dir).read_bytes() == before
    ck = torch.load(checkpoint_path(ckpt_dir), weights_only=True)
    assert ck["epoch"] == 1


def test_inf_in_first_epoch_raises_with_no_checkpoint_left_behind(
    data: SplitArrays, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison_forward(monkeypatch, at=0, value=float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 0"):
        fit(data, MEAN, STD, tiny_cfg(), checkpoint_dir=tmp_path, progress=False)
    assert not checkpoint_path(tmp_path).exists()


def test_checkpoint_of_other_config_is_refused(data: SplitArrays, tmp_path: Path) -> None:
    cfg = tiny_cfg(epochs=2)
    fit(data, MEAN, STD, cfg, checkpoint_dir=tmp_path, on_epoch=stop_after(1), progress=False)
    with pytest.raises(CheckpointError, match="different train config"):
        fit(
            data, MEAN, STD, replace(cfg, lr=0.07), checkpoint_dir=tmp_path, resume=True,
            progress=False,
        )  # fmt: skip
    # Output paths are not part of the identity: the same run may write elsewhere.
    moved = replace(cfg, live_dir=tmp_path / "elsewhere", run_info_path=tmp_path / "run.json")
    out = fit(data, MEAN, STD, moved, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert out.completed


def test_resume_without_checkpoint_is_an_error(data: SplitArrays, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        fit(data, MEAN, STD, tiny_cfg(), checkpoint_dir=tmp_path, resume=True, progress=False)


def test_fresh_run_replaces_old_checkpoint(
    data: SplitArrays, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_cfg(epochs=2)
    fit(data, MEAN, STD, cfg, checkpoint_dir=tmp_path, on_epoch=stop_after(1), progress=False)
    poison_forward(monkeypatch, at=None, value=float("nan"))
    # A fresh run (no resume) discards the old checkpoint before its first step.
    with pytest.raises(NonFiniteLossError):
        fit(data, MEAN, STD, cfg, checkpoint_dir=tmp_path, progress=False)
    assert not checkpoint_path(tmp_path).exists()


def test_batch_larger_than_train_set_is_a_config_error(data: SplitArrays) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        fit(data, MEAN, STD, tiny_cfg(batch_size=5000), progress=False)


def test_cuda_request_without_gpu_is_a_config_error(
    data: SplitArrays, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="cuda"):
        fit(data, MEAN, STD, tiny_cfg(device="cuda"), progress=False)


@pytest.mark.parametrize("model", ["mlp", "seed_cnn", "cnn"])
def test_every_model_trains(data: SplitArrays, model: str) -> None:
    cfg = tiny_cfg(model=model, epochs=1, schedule="cosine", channels_last=model != "mlp")
    result = fit(data, MEAN, STD, cfg, progress=False)
    assert result.info["model"] == model
    assert np.isfinite(result.history[0].train_loss)


def _write_prepared(root: Path, arrays: SplitArrays) -> Path:
    prepared = root / "prepared"
    prepared.mkdir(parents=True)
    np.save(images_path(prepared, "train"), arrays.images)
    np.save(labels_path(prepared, "train"), arrays.labels)
    stats = root / "data_stats.json"
    stats.write_text(json.dumps({"normalization": {"mean": MEAN, "std": STD}}))
    return prepared


def _params(root: Path, prepared: Path, **train: object) -> dict[str, object]:
    return {
        "data": {"prepared_dir": str(prepared)},
        "validate": {"stats_path": str(root / "data_stats.json")},
        "train": {
            **{k: v for k, v in to_dict(tiny_cfg(epochs=1)).items() if k != "augment"},
            "checkpoint_dir": str(root / "ck"),
            "model_path": str(root / "model.pt"),
            "live_dir": str(root / "metrics" / "train"),
            "run_info_path": str(root / "reports" / "train" / "run.json"),
            **train,
        },
    }


def outputs(root: Path) -> dict[str, bytes]:
    """Every file the train stage writes (checkpoints excluded), by relative path."""
    found = [root / "model.pt", *(root / "metrics").rglob("*"), *(root / "reports").rglob("*")]
    return {str(p.relative_to(root)): p.read_bytes() for p in found if p.is_file()}


def test_run_train_stage_writes_model_dvclive_and_run_info(
    data: SplitArrays, tmp_path: Path
) -> None:
    prepared = _write_prepared(tmp_path, data)
    cfg = config_from_dict(_params(tmp_path, prepared, epochs=2))
    run_train_stage(cfg, resume=False)

    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    assert payload["model"] == {"name": "cnn", "width": 4}
    loaded = load_model_file(tmp_path / "model.pt")
    assert loaded.mean == MEAN and loaded.std == STD

    live = tmp_path / "metrics" / "train"
    metrics = json.loads((live / "metrics.json").read_text())
    assert set(metrics) == {
        "val_accuracy", "val_loss", "train_loss", "train_seconds", "images_per_second",
        "parameters", "epochs", "peak_rss_mib", "step",
    }  # fmt: skip
    assert all(isinstance(v, int | float) for v in metrics.values())
    assert metrics["epochs"] == metrics["step"] == 2 and 0 < metrics["peak_rss_mib"] < 4096
    assert payload["meta"]["train"]["val_accuracy"] == metrics["val_accuracy"]
    for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
        rows = (live / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()
        assert rows[0] == f"step\t{name}" and [r.split("\t")[0] for r in rows[1:]] == ["1", "2"]

    info = json.loads((tmp_path / "reports" / "train" / "run.json").read_text())
    assert info["params_hash"] == cfg.params_hash() and info["seed"] == 0
    assert info["model_sha256"] == sha256_file(tmp_path / "model.pt")
    assert info["runtime"]["device"] == "cpu" and info["completed"] is True
    assert (tmp_path / "ck" / "last.pt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_failed_run_leaves_previous_outputs(
    data: SplitArrays, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepared = _write_prepared(tmp_path, data)
    run_train_stage(config_from_dict(_params(tmp_path, prepared)), resume=False)
    before = outputs(tmp_path)
    poison_forward(monkeypatch, at=20, value=float("nan"))
    with pytest.raises(NonFiniteLossError):
        run_train_stage(config_from_dict(_params(tmp_path, prepared, seed=1)), resume=False)
    assert outputs(tmp_path) == before


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_killed_cli_run_leaves_previous_outputs(
    data: SplitArrays, tmp_path: Path, sig: signal.Signals
) -> None:
    """A real ``python -m pipeline train`` killed mid-training changes none of its outputs.

    SIGKILL is ``kill -9``, SIGINT is Ctrl-C, SIGTERM is what a Prefect cancel sends.
    """
    import yaml

    prepared = _write_prepared(tmp_path, data)
    run_train_stage(config_from_dict(_params(tmp_path, prepared)), resume=False)
    before = outputs(tmp_path)
    assert {"model.pt", "metrics/train/metrics.json", "reports/train/run.json"} <= before.keys()

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_params(tmp_path, prepared, epochs=500, seed=1)))
    cmd = [sys.executable, "-m", "pipeline", "--params", str(params), "train"]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        # A shell's background job inherits SIGINT ignored, and then Python installs no
        # KeyboardInterrupt handler: give the child Ctrl-C's default, as in a terminal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # tqdm's carriage returns count as line ends in text mode
        if line.startswith("epoch 2:"):
            break
    proc.send_signal(sig)
    proc.stderr.read()
    rc = proc.wait(timeout=60)
    assert rc == (130 if sig == signal.SIGINT else -sig)
    assert outputs(tmp_path) == before
    assert torch.load(tmp_path / "ck" / "last.pt", weights_only=True)["epoch"] >= 1


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
