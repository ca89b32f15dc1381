"""onnxruntime sessions with honest provider selection.

``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` as available even on machines
without a GPU, so the CUDA provider is only requested when a CUDA device is actually
present, and the provider a session *got* is read back from ``session.get_providers()``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnxruntime as ort

from pipeline.errors import ModelFileError

Device = Literal["auto", "cpu", "cuda"]
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@functools.cache
def cuda_device_present() -> bool:
    """True when a CUDA GPU is usable (checked through torch, which ships the driver API)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def requested_providers(device: Device) -> list[str]:
    """Providers to ask for, in priority order. ``cuda`` without a GPU is an error."""
    has_cuda = CUDA in ort.get_available_providers() and cuda_device_present()
    if device == "cuda":
        if not has_cuda:
            raise ModelFileError("device 'cuda' requested but no CUDA GPU/provider is available")
        return [CUDA, CPU]
    if device == "auto" and has_cuda:
        return [CUDA, CPU]
    return [CPU]


@dataclass(frozen=True)
class Session:
    session: ort.InferenceSession
    provider: str  # the provider actually in use (first of get_providers())


def create_session(path: Path, device: Device = "auto", intra_op_threads: int = 0) -> Session:
    """Open ``path`` with onnxruntime. Raises :class:`ModelFileError` if it cannot load."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: ONNX model not found")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
    try:
        sess = ort.InferenceSession(str(path), opts, providers=requested_providers(device))
    except (RuntimeError, ort.capi.onnxruntime_pybind11_state.Fail) as err:
        raise ModelFileError(f"{path}: onnxruntime cannot load it: {err}") from err
    return Session(session=sess, provider=sess.get_providers()[0])
