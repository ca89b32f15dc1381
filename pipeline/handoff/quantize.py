"""Optional INT8 static quantisation of the exported graph (onnxruntime.quantization).

Calibrated on training images (raw ``(N, 28, 28) uint8`` pixels, fed exactly as a
consumer would: ``[n, 1, 28, 28] float32`` 0..255), QDQ format, per-channel int8
weights and int8 activations. Logit parity to 1e-4 is not achievable for int8, so the
INT8 model is gated on accuracy instead: its test accuracy through onnxruntime may be
at most ``max_drop`` below the fp32 model's, and the report records the argmax
agreement, size and speed of both. Runs only when ``export.quantize`` is true.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from pipeline.core.atomic import write_bytes
from pipeline.core.contract import INPUT_NAME
from pipeline.core.errors import ModelFileError
from pipeline.core.model_input import as_input
from pipeline.handoff.onnx_runtime import accuracy, create_session, onnx_logits


class PixelReader(CalibrationDataReader):
    """Feeds ``(N, 28, 28) uint8`` calibration images to the model input in batches."""

    def __init__(self, images: npt.NDArray[np.uint8], batch_size: int = 64) -> None:
        self._batches = iter(
            [as_input(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        )

    def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def calibration_sample(images: npt.NDArray[np.uint8], n: int, seed: int) -> npt.NDArray[np.uint8]:
    """``n`` training images chosen without replacement with ``seed`` (all if fewer)."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(images), size=min(n, len(images)), replace=False))
    return np.asarray(images[idx])


def quantize_int8(fp32_path: Path, dest: Path, calibration: npt.NDArray[np.uint8]) -> Path:
    """Write a QDQ int8 model of ``fp32_path`` to ``dest`` (atomically); return ``dest``."""
    if len(calibration) == 0:
        raise ModelFileError("INT8 calibration needs at least one image")
    with tempfile.TemporaryDirectory(prefix=".quantize.") as tmp:
        pre = Path(tmp) / "pre.onnx"
        out = Path(tmp) / "int8.onnx"
        # Shape inference + graph cleanup first, as onnxruntime recommends for static QDQ.
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
        quantize_static(
            pre,
            out,
            PixelReader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        return write_bytes(Path(dest), out.read_bytes())


@dataclass(frozen=True)
class Int8Report:
    passed: bool
    max_drop: float
    fp32_accuracy: float
    int8_accuracy: float
    argmax_agreement: float
    fp32_size_bytes: int
    int8_size_bytes: int
    fp32_seconds_batch256: float
    int8_seconds_batch256: float
    fp32_seconds_batch1: float
    int8_seconds_batch1: float
    calibration_samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_int8(
    fp32_path: Path,
    int8_path: Path,
    images: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.uint8],
    max_drop: float,
    calibration_samples: int,
) -> Int8Report:
    """Accuracy, argmax agreement, size and onnxruntime CPU time of both models."""
    results: dict[str, Any] = {}
    for tag, path in (("fp32", fp32_path), ("int8", int8_path)):
        session = create_session(Path(path), "cpu")
        t0 = time.perf_counter()
        logits = onnx_logits(session, images, 256)
        results[f"{tag}_seconds_batch256"] = round(time.perf_counter() - t0, 4)
        t0 = time.perf_counter()
        onnx_logits(session, images[:1000], 1)  # batch-1 latency on a 1,000-image slice
        results[f"{tag}_seconds_batch1"] = round(time.perf_counter() - t0, 4)
        results[f"{tag}_accuracy"] = accuracy(logits, labels)
        results[f"{tag}_size_bytes"] = Path(path).stat().st_size
        results[f"{tag}_pred"] = logits.argmax(axis=1)
    agreement = float(np.mean(results.pop("fp32_pred") == results.pop("int8_pred")))
    passed = results["int8_accuracy"] >= results["fp32_accuracy"] - max_drop
    return Int8Report(
        passed=bool(passed),
        max_drop=max_drop,
        argmax_agreement=agreement,
        calibration_samples=calibration_samples,
        **results,
    )
