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

from pipeline.atomic import sha256_bytes
from pipeline.errors import ModelFileError
from pipeline.onnx_runtime import CPU, CUDA, Device, Session, create_session, requested_providers

log = logging.getLogger("pipeline.serving")

MODEL_FILE = "model.onnx"
INPUT = "image"
OUTPUTS = ("logits", "probabilities")

SessionFactory = Callable[[Path, Device, int], Session]

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
    loaded_at: float = field(default_factory=time.time)

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
            "producer": f"{meta.producer_name} {meta.version}".strip(),
            "graph_name": meta.graph_name,
            "inputs": _io_spec(self.session.session.get_inputs()),
            "outputs": _io_spec(self.session.session.get_outputs()),
            "metadata": dict(self.metadata),
        }


def _io_spec(args: list[Any]) -> list[dict[str, Any]]:
    return [{"name": a.name, "type": a.type, "shape": [str(d) for d in a.shape]} for a in args]


def _check_contract(sess: Session, path: Path) -> None:
    """The serving contract: input ``image`` [N,1,28,28] float, outputs logits/probabilities."""
    inputs = {i.name: i for i in sess.session.get_inputs()}
    outputs = {o.name for o in sess.session.get_outputs()}
    if INPUT not in inputs or len(inputs) != 1:
        raise ModelFileError(f"{path}: expected one input named {INPUT!r}, got {sorted(inputs)}")
    spec = inputs[INPUT]
    if spec.type != "tensor(float)" or [str(d) for d in spec.shape[1:]] != ["1", "28", "28"]:
        raise ModelFileError(
            f"{path}: input {INPUT!r} must be float [N,1,28,28], got {spec.type} {spec.shape}"
        )
    missing = [o for o in OUTPUTS if o not in outputs]
    if missing:
        raise ModelFileError(f"{path}: missing outputs {missing}; has {sorted(outputs)}")


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
    return ServedModel(
        session=session,
        path=path,
        sha256=sha256_bytes(data),
        size_bytes=len(data),
        signature=sig,
        metadata=dict(meta.custom_metadata_map),
        providers_requested=wanted,
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
    last_error: str | None = None
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
                if cur is None:
                    self.state.last_error = f"{self.path}: ONNX model not found"
                return False
            if (cur is not None and sig == cur.signature) or sig == self.state.failed_signature:
                return False
            try:
                new = load_model(self.path, self.device, self.intra_op_threads, self._factory)
            except ModelFileError as err:
                self.state.failed_signature = sig
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


__all__ = ["CPU", "CUDA", "ModelStore", "ServedModel", "load_model"]
