"""The served ONNX model, and its hot swap when the production directory changes.

A :class:`ServedModel` is immutable: one onnxruntime session plus what was read from
the file (sha256, metadata_props, provider). :class:`ModelStore` holds a reference to
the current one. Promotion and rollback replace ``production_dir`` with an atomic
rename of the whole directory, so :meth:`ModelStore.poll` notices a new inode (or
size/mtime), hashes the file, builds the new session *completely*, and only then
swaps the reference. A request takes ``store.current`` once and keeps using that
object, so requests in flight finish on the old session while new ones get the new.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from pipeline.core.atomic import sha256_bytes
from pipeline.core.contract import INPUT_NAME, MODEL_FILE, OUTPUT_NAMES, check_io
from pipeline.core.errors import ModelFileError
from pipeline.handoff.onnx_runtime import (
    CPU,
    CUDA,
    Device,
    Session,
    create_session,
    requested_providers,
)

log = logging.getLogger("pipeline.serving")

INPUT = INPUT_NAME
OUTPUTS = OUTPUT_NAMES

SessionFactory = Callable[[Path, Device, int], Session]
# metadata_props key of the abstention threshold (written by the export stage): a
# prediction is confident when its top probability, as reported, is >= this value.
CONFIDENCE_KEY = "confidence_threshold"

_ORT_ERRORS: tuple[type[Exception], ...] = tuple(
    cls
    for cls in vars(ort.capi.onnxruntime_pybind11_state).values()
    if isinstance(cls, type) and issubclass(cls, Exception)
)


@dataclass(frozen=True)
class FileSignature:
    """Cheap identity of a file: a directory swap always changes the inode."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileSignature:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class ServedModel:
    """One loaded model. ``predict`` takes ``(N, 28, 28)`` raw pixels in ``[0, 255]``."""

    session: Session
    path: Path
    sha256: str
    size_bytes: int
    signature: FileSignature
    metadata: dict[str, str]
    providers_requested: tuple[str, ...]
    producer: str = ""
    loaded_at: float = field(default_factory=time.time)
    # From metadata_props (:func:`confidence_threshold`); None: the model records none.
    confidence_threshold: float | None = None

    @property
    def provider(self) -> str:
        """The execution provider the session actually runs on."""
        return self.session.provider

    @property
    def version(self) -> str | None:
        return self.metadata.get("model_version") or self.metadata.get("version")

    def predict(
        self, images: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """``(N, 28, 28)`` float32 0..255 -> ``(logits, probabilities)``, each ``(N, 10)``."""
        batch = np.ascontiguousarray(images, dtype=np.float32).reshape(-1, 1, 28, 28)
        logits, probs = self.session.session.run(list(OUTPUTS), {INPUT: batch})
        return np.asarray(logits, np.float32), np.asarray(probs, np.float32)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for ``GET /v1/model``."""
        meta = self.session.session.get_modelmeta()
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "version": self.version,
            "provider": self.provider,
            "providers_requested": list(self.providers_requested),
            "loaded_at": self.loaded_at,
            "producer": self.producer or meta.producer_name,
            "graph_name": meta.graph_name,
            "inputs": _io_spec(self.session.session.get_inputs()),
            "outputs": _io_spec(self.session.session.get_outputs()),
            "metadata": dict(self.metadata),
        }


def _io_spec(args: list[Any]) -> list[dict[str, Any]]:
    return [{"name": a.name, "type": a.type, "shape": [str(d) for d in a.shape]} for a in args]


def _check_contract(sess: Session, path: Path) -> None:
    """Refuse a model whose inputs/outputs differ from :mod:`pipeline.core.contract`."""

    def spec(args: list[Any]) -> dict[str, tuple[str, list[str]]]:
        return {a.name: (a.type, [str(d) for d in a.shape]) for a in args}

    reasons = check_io(spec(sess.session.get_inputs()), spec(sess.session.get_outputs()))
    if reasons:
        raise ModelFileError(f"{path}: breaks the model contract: {'; '.join(reasons)}")


def _producer(data: bytes, producer_name: str) -> str:
    """``"<producer_name> <producer_version>"`` from the ONNX header, e.g. ``pytorch 2.5.1``.

    onnxruntime's ``ModelMetadata.version`` is the ONNX ``model_version`` field (INT64_MAX
    when unset, as torch.onnx leaves it), not the producer's version: read that from the
    proto instead.
    """
    import onnx

    try:
        proto = onnx.ModelProto.FromString(data)
    except Exception:  # noqa: BLE001 - cosmetic only; onnxruntime already parsed the file
        return producer_name
    return f"{proto.producer_name or producer_name} {proto.producer_version}".strip()


def confidence_threshold(metadata: dict[str, str], path: Path) -> float | None:
    """The model's abstention threshold from its ``metadata_props``, in ``[0, 1]``.

    None when the file records none (a model exported before calibration). A value that is
    not a number in ``[0, 1]`` refuses the model (:class:`ModelFileError`): the service
    must not flag answers confident against a threshold it cannot read.
    """
    raw = metadata.get(CONFIDENCE_KEY)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ModelFileError(f"{path}: metadata {CONFIDENCE_KEY}={raw!r} is not a number in [0, 1]")
    return value


REPORTED_DECIMALS = 6  # probabilities as the service reports them


def is_confident(probability: float, threshold: float | None) -> bool | None:
    """Whether a top ``probability`` (in [0, 1]) clears the model's abstention threshold.

    Compares the probability as reported (rounded to :data:`REPORTED_DECIMALS`), so a
    client can check ``probability >= threshold`` itself; None when the model records no
    threshold (see :func:`confidence_threshold`).
    """
    if threshold is None:
        return None
    # numpy's rounding, the one the service's response uses (Python's round() can differ
    # from it in the last decimal).
    return bool(np.round(np.float64(probability), REPORTED_DECIMALS) >= threshold)


def load_model(
    path: Path,
    device: Device = "auto",
    intra_op_threads: int = 0,
    session_factory: SessionFactory = create_session,
) -> ServedModel:
    """Hash, open and check ``path``. Raises :class:`ModelFileError`.

    The bytes are hashed from one open file descriptor, and the session is accepted
    only if the path still names that same inode afterwards, so the sha256 we report
    is the sha256 of the model we run even if the directory is swapped meanwhile.
    """
    path = Path(path)
    for _ in range(5):
        try:
            with open(path, "rb") as fh:
                sig = FileSignature.of(os.fstat(fh.fileno()))
                data = fh.read()
        except FileNotFoundError as err:
            raise ModelFileError(f"{path}: ONNX model not found") from err
        except OSError as err:
            raise ModelFileError(f"{path}: cannot read the model: {err}") from err
        wanted = tuple(requested_providers(device))
        try:
            session = session_factory(path, device, intra_op_threads)
        except _ORT_ERRORS as err:
            # create_session maps RuntimeError/Fail only; a non-protobuf file raises
            # InvalidProtobuf, a bad graph InvalidGraph: all mean "cannot load".
            raise ModelFileError(f"{path}: onnxruntime cannot load it: {err}") from err
        if current_signature(path) == sig:
            break
        log.info("%s changed while loading; loading again", path)
    else:
        raise ModelFileError(f"{path}: keeps changing while being loaded")
    _check_contract(session, path)
    if CUDA in wanted and session.provider != CUDA:
        log.warning("CUDA provider requested but the session runs on %s", session.provider)
    meta = session.session.get_modelmeta()
    metadata = dict(meta.custom_metadata_map)
    return ServedModel(
        session=session,
        path=path,
        sha256=sha256_bytes(data),
        size_bytes=len(data),
        signature=sig,
        metadata=metadata,
        providers_requested=wanted,
        producer=_producer(data, meta.producer_name),
        confidence_threshold=confidence_threshold(metadata, path),
    )


def current_signature(path: Path) -> FileSignature | None:
    try:
        return FileSignature.of(os.stat(path))
    except FileNotFoundError:
        return None


@dataclass
class ReloadState:
    """What the poller last saw; exposed on ``/v1/model`` for operators."""

    reloads: int = 0
    failed_reloads: int = 0
    last_error: str | None = None
    # Set while the model file is gone (e.g. models/production deleted): the loaded model
    # keeps answering, but readiness fails with this reason.
    missing: str | None = None
    last_check: float | None = None
    failed_signature: FileSignature | None = None


class ModelStore:
    """Holds the current :class:`ServedModel` and swaps it when the file changes.

    ``current`` is a plain attribute read (atomic under the GIL); :meth:`poll` is
    serialised by a lock so two pollers never load the same file twice.
    """

    def __init__(
        self,
        path: Path,
        device: Device = "auto",
        intra_op_threads: int = 0,
        session_factory: SessionFactory = create_session,
    ) -> None:
        self.path = Path(path)
        self.device: Device = device
        self.intra_op_threads = intra_op_threads
        self._factory = session_factory
        self._lock = threading.Lock()
        self.current: ServedModel | None = None
        self.state = ReloadState()

    def poll(self) -> bool:
        """Load the model if the file is new or changed. Returns True when it swapped.

        A file that fails to load is remembered by signature and not retried until it
        changes again; the previous model keeps serving. Never raises for a bad file.
        """
        with self._lock:
            self.state.last_check = time.time()
            sig = current_signature(self.path)
            cur = self.current
            if sig is None:
                reason = f"{self.path}: ONNX model not found"
                if self.state.missing is None and cur is not None:
                    log.error("%s; still serving %s", reason, _short(cur))
                self.state.missing = reason
                if cur is None:
                    self.state.last_error = reason
                return False
            if self.state.missing is not None:
                log.info("%s is back", self.path)
                self.state.missing = None
            if (cur is not None and sig == cur.signature) or sig == self.state.failed_signature:
                return False
            try:
                new = load_model(self.path, self.device, self.intra_op_threads, self._factory)
            except ModelFileError as err:
                self.state.failed_signature = sig
                self.state.failed_reloads += 1
                self.state.last_error = str(err)
                log.error("model reload failed, still serving %s: %s", _short(cur), err)
                return False
            self.state.failed_signature = None
            self.state.last_error = None
            if cur is not None and new.sha256 == cur.sha256:
                # Same bytes under a new inode (e.g. a re-promotion): keep the warm session.
                self.current = _replace_signature(cur, new.signature)
                return False
            self.current = new  # the swap: one reference assignment
            self.state.reloads += 1
            log.info(
                "serving %s sha256=%s version=%s on %s (requested %s; previously %s)",
                new.path,
                new.sha256[:12],
                new.version,
                new.provider,
                ",".join(new.providers_requested),
                _short(cur),
            )
            return True


def _replace_signature(model: ServedModel, sig: FileSignature) -> ServedModel:
    from dataclasses import replace

    return replace(model, signature=sig)


def _short(model: ServedModel | None) -> str:
    return "no model" if model is None else f"sha256={model.sha256[:12]}"


__all__ = ["CPU", "CUDA", "MODEL_FILE", "ModelStore", "ServedModel", "load_model"]
