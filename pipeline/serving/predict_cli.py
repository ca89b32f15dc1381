"""``python -m pipeline predict FILE...``: classify image files locally.

Same preprocessing and model contract as ``POST /v1/predict/image``. Prints one line
per file, ``<path>\\t<digit>\\t<probability>``, in the order given. Every file is
decoded before anything is printed, so a bad file fails the whole command with a
named error (non-zero exit) instead of a half-printed answer.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import numpy as np

from pipeline.config import Config
from pipeline.errors import ImageDecodeError
from pipeline.onnx_runtime import Device
from pipeline.serving.imaging import to_mnist
from pipeline.serving.model_store import MODEL_FILE, load_model


def classify_files(
    paths: list[Path], model_path: Path, max_pixels: int, device: Device = "auto"
) -> list[tuple[Path, int, float]]:
    """``[(path, digit, probability)]`` for each file. Raises :class:`ImageDecodeError`."""
    images = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise ImageDecodeError(f"{path}: cannot read: {err.strerror or err}") from err
        try:
            images.append(to_mnist(data, max_pixels))
        except ImageDecodeError as err:
            raise ImageDecodeError(f"{path}: {err}") from err
    model = load_model(model_path, device=device)
    _, probs = model.predict(np.stack(images))
    digits = probs.argmax(axis=1)
    return [
        (p, int(d), float(probs[i, d])) for i, (p, d) in enumerate(zip(paths, digits, strict=True))
    ]


def predict_files(
    cfg: Config, paths: list[Path], model: Path | None, out: TextIO = sys.stdout
) -> None:
    """CLI entry: print ``path<TAB>digit<TAB>probability`` per file (see module doc)."""
    model_path = model or cfg.registry.production_dir / MODEL_FILE
    for path, digit, prob in classify_files(
        paths, model_path, cfg.serve.max_image_pixels, cfg.serve.device
    ):
        print(f"{path}\t{digit}\t{prob:.4f}", file=out)
