"""IDX parsing (the MNIST file format), vectorised with numpy.

Format (big-endian): a 4-byte magic number, then one uint32 per dimension, then the
payload as uint8. MNIST uses magic 2051 (``0x00000803``: ubyte, 3 dims) for images
``(N, 28, 28)`` and 2049 (``0x00000801``: ubyte, 1 dim) for labels ``(N,)``.
"""

from __future__ import annotations

import gzip
import zlib

import numpy as np
import numpy.typing as npt

from pipeline.core.errors import IdxFormatError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
ROWS = COLS = 28


def gunzip(data: bytes, name: str) -> bytes:
    """Decompress a whole gzip member; a truncated or corrupt stream is an IdxFormatError."""
    try:
        return gzip.decompress(data)
    except EOFError as err:
        raise IdxFormatError(f"{name}: truncated gzip stream ({len(data)} bytes read)") from err
    except (gzip.BadGzipFile, zlib.error) as err:
        raise IdxFormatError(f"{name}: not a valid gzip file: {err}") from err


def _header(raw: bytes, name: str, magic: int, ndim: int) -> tuple[int, ...]:
    need = 4 * (1 + ndim)
    if len(raw) < 4:
        raise IdxFormatError(f"{name}: {len(raw)} bytes is shorter than the {need}-byte IDX header")
    found = int(np.frombuffer(raw, dtype=">u4", count=1)[0])
    if found != magic:
        raise IdxFormatError(
            f"{name}: magic number {found} (0x{found:08x}), expected {magic} (0x{magic:08x})"
        )
    if len(raw) < need:
        raise IdxFormatError(f"{name}: {len(raw)} bytes is shorter than the {need}-byte IDX header")
    return tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))


def parse_images(raw: bytes, name: str = "images") -> npt.NDArray[np.uint8]:
    """Decompressed IDX3 bytes -> ``(N, 28, 28) uint8`` in ``[0, 255]`` (a read-only view)."""
    n, rows, cols = _header(raw, name, IMAGES_MAGIC, 3)
    if (rows, cols) != (ROWS, COLS):
        raise IdxFormatError(f"{name}: images are {rows}x{cols}, expected {ROWS}x{COLS}")
    payload = len(raw) - 16
    if payload != n * rows * cols:
        raise IdxFormatError(
            f"{name}: header says {n} images ({n * rows * cols} bytes) but the payload is "
            f"{payload} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def parse_labels(raw: bytes, name: str = "labels") -> npt.NDArray[np.uint8]:
    """Decompressed IDX1 bytes -> ``(N,) uint8`` (range is checked by validation, not here)."""
    (n,) = _header(raw, name, LABELS_MAGIC, 1)
    payload = len(raw) - 8
    if payload != n:
        raise IdxFormatError(f"{name}: header says {n} labels but the payload is {payload} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=8)


def encode_images(images: npt.NDArray[np.uint8]) -> bytes:
    """Inverse of :func:`parse_images` (uncompressed); used by tests and fixtures."""
    n, rows, cols = images.shape
    header = np.array([IMAGES_MAGIC, n, rows, cols], dtype=">u4").tobytes()
    return header + np.ascontiguousarray(images, dtype=np.uint8).tobytes()


def encode_labels(labels: npt.NDArray[np.uint8]) -> bytes:
    """Inverse of :func:`parse_labels` (uncompressed)."""
    header = np.array([LABELS_MAGIC, labels.shape[0]], dtype=">u4").tobytes()
    return header + np.ascontiguousarray(labels, dtype=np.uint8).tobytes()
