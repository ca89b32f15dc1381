"""Parity of the exported ONNX graph with the PyTorch model it came from.

Both sides get the same raw pixels (``(N, 1, 28, 28) float32`` in ``[0, 255]``); the
PyTorch reference is :class:`pipeline.training.model_io.RawPixelClassifier`, the very module
that was exported. onnxruntime runs the whole set at every batch size in
``export.parity_batch_sizes`` (a dynamic batch axis that breaks at 1 or at an odd size
shows up here). Passing needs ``max |logit_onnx - logit_torch| <= atol``, the same for
the ``probabilities`` output, and 100% argmax agreement at every batch size. With a
``temperature`` (fitted by evaluate, :mod:`pipeline.quality.calibration`) the reference is
:func:`pipeline.quality.calibration.with_temperature` of that module: the graph's
``probabilities`` must be ``softmax(logits / T)`` and its ``logits`` unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.atomic import sha256_file
from pipeline.core.errors import ModelFileError
from pipeline.core.model_input import as_input
from pipeline.handoff.onnx_runtime import (
    Device,
    Images,
    Labels,
    Logits,
    accuracy,
    create_session,
    onnx_outputs,
)
from pipeline.training.model_io import LoadedModel, wrap


@torch.no_grad()
def torch_outputs(
    module: torch.nn.Module, images: Images, batch_size: int = 1000
) -> tuple[Logits, Logits]:
    """``(logits, probabilities)`` ``(N, 10) float32`` of a raw-pixel module, on the CPU."""
    logits, probs = [], []
    for i in range(0, len(images), batch_size):
        z, p = module(torch.from_numpy(as_input(images[i : i + batch_size])))
        logits.append(z.numpy())
        probs.append(p.numpy())
    return (
        np.concatenate(logits).astype(np.float32, copy=False),
        np.concatenate(probs).astype(np.float32, copy=False),
    )


@dataclass(frozen=True)
class BatchParity:
    batch_size: int
    max_abs_diff: float  # logits
    argmax_agreement: float
    seconds: float
    passed: bool
    max_abs_diff_probabilities: float = float("nan")


@dataclass(frozen=True)
class ParityReport:
    onnx_sha256: str
    n: int
    atol: float
    provider: str
    torch_accuracy: float
    onnx_accuracy: float
    batches: tuple[BatchParity, ...] = field(default_factory=tuple)
    temperature: float = 1.0  # of the probabilities output (1.0: plain softmax)

    @property
    def passed(self) -> bool:
        return bool(self.batches) and all(b.passed for b in self.batches)

    @property
    def max_abs_diff(self) -> float:
        return max((b.max_abs_diff for b in self.batches), default=float("nan"))

    def failure_message(self) -> str:
        bad = [
            f"batch {b.batch_size}: max |dlogit| {b.max_abs_diff:.3g}, max |dprobability| "
            f"{b.max_abs_diff_probabilities:.3g} (atol {self.atol:g}), "
            f"argmax agreement {b.argmax_agreement:.6f}"
            for b in self.batches
            if not b.passed
        ]
        return "ONNX/PyTorch parity failed: " + ("; ".join(bad) or "no batch sizes checked")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, batch sizes as keys (``metrics/parity.json``, DVC metrics)."""
        out = asdict(self)
        out.pop("batches")
        out["passed"] = self.passed
        out["max_abs_diff"] = self.max_abs_diff
        out["batch_sizes"] = {
            str(b.batch_size): {k: v for k, v in asdict(b).items() if k != "batch_size"}
            for b in self.batches
        }
        return out


def check_parity(
    model: LoadedModel,
    onnx_path: Path,
    images: Images,
    labels: Labels,
    batch_sizes: Sequence[int] = (1, 7, 256),
    atol: float = 1e-4,
    device: Device = "cpu",
    temperature: float = 1.0,
) -> ParityReport:
    """Compare onnxruntime with PyTorch on every image, at each batch size.

    ``images``: ``(N, 28, 28) uint8``; ``labels``: ``(N,)`` in 0..9. Both outputs are
    compared, ``probabilities`` against ``softmax(logits / temperature)`` of PyTorch.
    Does not raise on a mismatch; the caller reads :attr:`ParityReport.passed`.
    """
    if len(images) == 0:
        raise ValueError("parity needs at least one image")
    if not batch_sizes:
        raise ValueError("parity needs at least one batch size")
    if not Path(onnx_path).is_file():
        raise ModelFileError(f"{onnx_path}: ONNX model not found")
    from pipeline.quality.calibration import with_temperature

    module: torch.nn.Module = wrap(model)
    if temperature != 1.0:
        module = with_temperature(module, temperature)
    reference, reference_probs = torch_outputs(module, images)
    want = reference.argmax(axis=1)
    session = create_session(Path(onnx_path), device)
    results = []
    outputs: list[Logits] = []
    for bs in batch_sizes:
        t0 = time.perf_counter()
        got, got_probs = onnx_outputs(session, images, int(bs))
        seconds = time.perf_counter() - t0
        diff = float(np.max(np.abs(got.astype(np.float64) - reference)))
        pdiff = float(np.max(np.abs(got_probs.astype(np.float64) - reference_probs)))
        if not np.isfinite(got).all():
            diff = float("inf")  # NaN would otherwise slip past the <= comparison
        if not np.isfinite(got_probs).all():
            pdiff = float("inf")
        agree = float(np.mean(got.argmax(axis=1) == want))
        ok = diff <= atol and pdiff <= atol and agree == 1.0
        results.append(
            BatchParity(
                int(bs), diff, agree, round(seconds, 4), ok, max_abs_diff_probabilities=pdiff
            )
        )
        outputs.append(got)
    return ParityReport(
        onnx_sha256=sha256_file(Path(onnx_path)),
        n=len(images),
        atol=float(atol),
        provider=session.provider,
        torch_accuracy=accuracy(reference, labels),
        onnx_accuracy=accuracy(outputs[0], labels),
        batches=tuple(results),
        temperature=float(temperature),
    )
