"""The candidate model file: ``models/candidate/model.pt``.

A plain dict saved with ``torch.save`` and loadable with ``torch.load(weights_only=True)``::

    {
      "format": "mnist-mlops/model-v1",
      "model": {"name": "cnn", "width": 32},
      "normalization": {"mean": 0.1307, "std": 0.3081},   # from the validate stage
      "state_dict": {...},                                # float32 tensors, CPU
      "meta": {...},                                      # JSON-able provenance/metrics
    }

:func:`wrap` gives the module that takes raw pixels (:mod:`pipeline.core.contract`): what
export writes to ONNX and what parity and evaluation compare with.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from pipeline.core.atomic import write_bytes
from pipeline.core.contract import PIXEL_MAX
from pipeline.core.errors import ConfigError, ModelFileError
from pipeline.core.model_input import as_input
from pipeline.training.models import build_model

FORMAT = "mnist-mlops/model-v1"


@dataclass(frozen=True)
class LoadedModel:
    module: nn.Module
    name: str
    width: int
    mean: float
    std: float
    meta: dict[str, Any] = field(default_factory=dict)


def save_model_file(
    path: Path,
    model: nn.Module,
    name: str,
    width: int,
    mean: float,
    std: float,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write the model file atomically; tensors are copied to the CPU as float32."""
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "model": {"name": name, "width": int(width)},
        "normalization": {"mean": float(mean), "std": float(std)},
        "state_dict": state,
        "meta": meta or {},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return write_bytes(Path(path), buf.getvalue())


def load_model_file(path: Path, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Load and rebuild the model in eval mode. Raises :class:`ModelFileError`."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found; run the train stage first")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ModelFileError(f"{path}: not a readable model file: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a {FORMAT} file")
    spec, norm = payload["model"], payload["normalization"]
    try:
        module = build_model(spec["name"], spec["width"])
        module.load_state_dict(payload["state_dict"])
    except ConfigError as err:
        raise ModelFileError(f"{path}: {err}") from err
    except RuntimeError as err:
        raise ModelFileError(f"{path}: weights do not fit model {spec}: {err}") from err
    module.eval()
    return LoadedModel(
        module=module,
        name=spec["name"],
        width=int(spec["width"]),
        mean=float(norm["mean"]),
        std=float(norm["std"]),
        meta=dict(payload.get("meta", {})),
    )


class RawPixelClassifier(nn.Module):
    """``(N, 1, 28, 28)`` float32 pixels in ``[0, 255]`` -> ``(logits, probabilities)``.

    Wraps a zoo model (which expects normalised input) with the normalisation, so the
    same module is both what is exported and the PyTorch reference for parity.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, module: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        if not std > 0:
            raise ModelFileError(f"normalisation std must be > 0, got {std}")
        self.module = module
        # Buffers (not Python floats) so the constants live in the graph as float32.
        self.register_buffer("mean", torch.tensor(float(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(float(std), dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.module((image / PIXEL_MAX - self.mean) / self.std)
        return logits, torch.softmax(logits, dim=1)


def wrap(model: LoadedModel) -> RawPixelClassifier:
    """The eval-mode, CPU raw-pixel module of ``model`` (a copy: ``model`` is untouched)."""
    return RawPixelClassifier(copy.deepcopy(model.module).to("cpu"), model.mean, model.std).eval()


@torch.no_grad()
def torch_logits(
    model: LoadedModel, images: npt.NDArray[Any], batch_size: int = 1000
) -> npt.NDArray[np.float32]:
    """PyTorch logits ``(N, 10) float32`` of raw ``(N, 28, 28)`` pixels (0..255), on the CPU."""
    module = wrap(model)
    out = [
        module(torch.from_numpy(as_input(images[i : i + batch_size])))[0].numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out).astype(np.float32, copy=False)
