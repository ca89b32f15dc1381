"""onnxruntime sessions with honest provider selection, and batched inference.

``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` as available even on machines
without a GPU, so the CUDA provider is only requested when a CUDA device is actually
present, and the provider a session *got* is read back from ``session.get_providers()``.
Models follow :mod:`pipeline.core.contract`; export, parity, quantize and the gate all feed
them through :func:`onnx_logits`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from pipeline.core.contract import INPUT_NAME, LOGITS, PROBABILITIES
from pipeline.core.errors import ModelFileError
from pipeline.core.model_input import as_input

Images = npt.NDArray[np.uint8]
Labels = npt.NDArray[np.uint8]
Logits = npt.NDArray[np.float32]

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


def onnx_logits(session: Session, images: Images, batch_size: int) -> Logits:
    """onnxruntime logits ``(N, 10) float32``, feeding ``batch_size`` images per run."""
    out = [
        session.session.run([LOGITS], {INPUT_NAME: as_input(images[i : i + batch_size])})[0]
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out).astype(np.float32, copy=False)


def onnx_outputs(session: Session, images: Images, batch_size: int) -> tuple[Logits, Logits]:
    """onnxruntime ``(logits, probabilities)``, each ``(N, 10) float32``, ``batch_size`` a run."""
    logits, probs = [], []
    for i in range(0, len(images), batch_size):
        z, p = session.session.run(
            [LOGITS, PROBABILITIES], {INPUT_NAME: as_input(images[i : i + batch_size])}
        )
        logits.append(z)
        probs.append(p)
    return (
        np.concatenate(logits).astype(np.float32, copy=False),
        np.concatenate(probs).astype(np.float32, copy=False),
    )


def accuracy(logits: Logits, labels: Labels) -> float:
    """Share of rows whose argmax is the label; ``logits`` ``(N, 10)``, ``labels`` ``(N,)``."""
    if len(logits) != len(labels):
        raise ValueError(f"{len(logits)} predictions for {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float(np.mean(logits.argmax(axis=1) == np.asarray(labels)))


def onnx_accuracy(
    path: Path, images: Images, labels: Labels, batch_size: int = 1000, device: Device = "cpu"
) -> float:
    """Test accuracy of the ONNX file at ``path`` through onnxruntime."""
    return accuracy(onnx_logits(create_session(path, device), images, batch_size), labels)


def read_metadata(path: Path) -> dict[str, str]:
    """``metadata_props`` of an ONNX file as a dict (the graph is not loaded into a session)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
