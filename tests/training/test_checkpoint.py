"""Checkpoint files: atomic round trip, config identity, refusal of foreign files."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.core.config import TrainConfig
from pipeline.core.errors import CheckpointError
from pipeline.training.checkpoint import (
    checkpoint_path,
    clear_checkpoints,
    load_checkpoint,
    save_checkpoint,
    train_config_hash,
)


def test_hash_ignores_output_paths_but_not_training_settings() -> None:
    cfg = TrainConfig()
    h = train_config_hash(cfg, {"n": 10})
    assert h == train_config_hash(replace(cfg, model_path=Path("x/y.pt")), {"n": 10})
    assert h == train_config_hash(replace(cfg, checkpoint_dir=Path("elsewhere")), {"n": 10})
    assert h != train_config_hash(replace(cfg, lr=cfg.lr * 2), {"n": 10})
    assert h != train_config_hash(replace(cfg, model="mlp"), {"n": 10})
    assert h != train_config_hash(cfg, {"n": 11})  # other data


def test_round_trip_is_weights_only_loadable(tmp_path: Path) -> None:
    state = {"epoch": 3, "model": {"w": torch.arange(4.0)}, "rng": {"torch": torch.get_rng_state()}}
    path = save_checkpoint(tmp_path, "abc", state)
    assert path == checkpoint_path(tmp_path)
    assert torch.load(path, weights_only=True)["epoch"] == 3
    back = load_checkpoint(tmp_path, "abc")
    assert torch.equal(back["model"]["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp files left


def test_other_config_hash_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, "abc", {"epoch": 1})
    with pytest.raises(CheckpointError, match="different train config"):
        load_checkpoint(tmp_path, "xyz")


def test_missing_corrupt_and_foreign_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path, "abc")
    checkpoint_path(tmp_path).write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path, "abc")
    torch.save({"format": "something-else"}, checkpoint_path(tmp_path))
    with pytest.raises(CheckpointError, match="not a mnist-mlops/checkpoint-v2"):
        load_checkpoint(tmp_path, "abc")


def test_clear_checkpoints(tmp_path: Path) -> None:
    clear_checkpoints(tmp_path)  # nothing there: fine
    save_checkpoint(tmp_path, "abc", {"epoch": 1})
    clear_checkpoints(tmp_path)
    assert not checkpoint_path(tmp_path).exists()
