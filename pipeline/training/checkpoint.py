"""Per-epoch training checkpoints: written atomically, refused if from another config.

One file, ``<checkpoint_dir>/last.pt``, replaced atomically after every epoch, so a
crash at any moment leaves the previous complete checkpoint. It holds everything to
continue bit-identically: model, optimizer, scheduler and EMA state, the torch RNG
states (global CPU, CUDA, and the data generator), the epoch and the history so far,
plus ``config_hash`` (see :func:`train_config_hash`). Python's and NumPy's global RNGs
are not used by training, so they are not stored.

Loadable with ``torch.load(weights_only=True)``: only tensors and plain containers.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from pipeline.core.atomic import write_bytes
from pipeline.core.config import TrainConfig, to_dict
from pipeline.core.errors import CheckpointError

FORMAT = "mnist-mlops/checkpoint-v2"  # v2: history has images_per_second, no Python RNG
FILENAME = "last.pt"

# Output locations do not change what is trained; everything else does.
_NOT_HASHED = ("checkpoint_dir", "model_path", "live_dir", "run_info_path")


def train_config_hash(cfg: TrainConfig, data: dict[str, Any] | None = None) -> str:
    """sha256 of the training-relevant config plus a data fingerprint (e.g. counts, mean)."""
    fields = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_HASHED}
    blob = json.dumps({"train": fields, "data": data or {}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def checkpoint_path(checkpoint_dir: Path) -> Path:
    return Path(checkpoint_dir) / FILENAME


def save_checkpoint(checkpoint_dir: Path, config_hash: str, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (plus format and hash) to ``checkpoint_dir/last.pt``."""
    payload = {"format": FORMAT, "config_hash": config_hash, **state}
    buf = io.BytesIO()
    torch.save(payload, buf)
    return write_bytes(checkpoint_path(checkpoint_dir), buf.getvalue())


def load_checkpoint(checkpoint_dir: Path, config_hash: str) -> dict[str, Any]:
    """Read the checkpoint and check it belongs to this config.

    Raises :class:`CheckpointError` when it is missing, unreadable, of another format,
    or was written by a run with a different training config or data.
    """
    path = checkpoint_path(checkpoint_dir)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from; run without --resume")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"{path}: unreadable checkpoint: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    found = payload.get("config_hash")
    if found != config_hash:
        raise CheckpointError(
            f"{path}: checkpoint was written with a different train config or dataset "
            f"(hash {str(found)[:12]} != {config_hash[:12]}); run without --resume to start fresh"
        )
    return payload


def clear_checkpoints(checkpoint_dir: Path) -> None:
    """Remove the checkpoint of a previous run (a fresh run must never resume it)."""
    checkpoint_path(checkpoint_dir).unlink(missing_ok=True)
