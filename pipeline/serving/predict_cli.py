"""``python -m pipeline predict FILE...``: classify image files locally.

Same preprocessing, size limits and model contract as ``POST /v1/predict/image``.
Prints one line per good file on stdout, ``<path>\\t<digit>\\t<probability>\\t<flag>``,
in the order given (``flag``: ``confident`` or ``unsure`` against the abstention threshold
recorded in the model, exactly as the service's ``confident``; ``-`` if it records none),
and one line per bad file on stderr (``<path>: <reason>``); every file is tried, and the
command exits non-zero at the end if any failed. A file is read up to
``serve.max_body_bytes`` (+1 byte to notice more), so ``predict /dev/zero`` stops at once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from pipeline.core.config import Config
from pipeline.core.errors import ImageDecodeError
from pipeline.handoff.onnx_runtime import Device
from pipeline.serving.imaging import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, to_mnist
from pipeline.serving.model_store import MODEL_FILE, is_confident, load_model


@dataclass(frozen=True)
class Classified:
    """One file's answer: ``digit``/``probability``/``confident``, or ``error`` (then None)."""

    path: Path
    digit: int | None = None
    probability: float | None = None
    confident: bool | None = None
    error: str | None = None


def read_bounded(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of ``path``. Raises :class:`ImageDecodeError` if it has more."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as err:
        raise ImageDecodeError(f"cannot read: {err.strerror or err}") from err
    if len(data) > limit:
        raise ImageDecodeError(f"larger than {limit} bytes (serve.max_body_bytes)")
    return data


def classify_files(
    paths: list[Path],
    model_path: Path,
    max_bytes: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
    device: Device = "auto",
) -> list[Classified]:
    """A :class:`Classified` per path, in order. Raises :class:`ModelFileError` only."""
    model = load_model(model_path, device=device)
    images: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    for i, path in enumerate(paths):
        try:
            images[i] = to_mnist(read_bounded(Path(path), max_bytes), max_pixels, max_side)
        except ImageDecodeError as err:
            errors[i] = str(err)
    answers: dict[int, tuple[int, float, bool | None]] = {}
    if images:
        _, probs = model.predict(np.stack(list(images.values())))
        for i, p in zip(images, probs, strict=True):
            digit = int(p.argmax())
            top = float(p[digit])
            answers[i] = (digit, top, is_confident(top, model.confidence_threshold))
    return [
        Classified(path, *answers[i]) if i in answers else Classified(path, error=errors[i])
        for i, path in enumerate(paths)
    ]


def predict_files(
    cfg: Config,
    paths: list[Path],
    model: Path | None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> None:
    """CLI entry (see module doc). Raises :class:`ImageDecodeError` if any file failed."""
    model_path = model or cfg.registry.production_dir / MODEL_FILE
    serve = cfg.serve
    results = classify_files(
        paths,
        model_path,
        serve.max_body_bytes,
        serve.max_image_pixels,
        serve.max_image_side,
        serve.device,
    )
    for r in results:
        if r.error is None:
            flag = {True: "confident", False: "unsure", None: "-"}[r.confident]
            print(f"{r.path}\t{r.digit}\t{r.probability:.4f}\t{flag}", file=out)
        else:
            print(f"{r.path}: {r.error}", file=err)
    failed = sum(r.error is not None for r in results)
    if failed:
        raise ImageDecodeError(f"{failed} of {len(results)} files could not be classified")
