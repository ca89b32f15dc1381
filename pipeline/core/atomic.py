"""Atomic file and directory writes, and content hashes.

A reader (or a crash) never sees a half-written artifact: every file is written to a
temporary sibling, flushed, fsynced and renamed over the destination. Directories are
swapped in by :mod:`pipeline.core.dirswap`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def _umask() -> int:
    # mkstemp/mkdtemp create private (0600/0700) entries; artifacts get ordinary modes.
    mask = os.umask(0)
    os.umask(mask)
    return mask


# The process umask, read once: new files and directories get ordinary modes from it.
UMASK = _umask()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it over ``dest`` on success.

    On any exception the temporary file is removed and ``dest`` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~UMASK)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(dest: Path, data: bytes) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return dest


def write_text(dest: Path, text: str) -> Path:
    return write_bytes(dest, text.encode("utf-8"))


def write_json(dest: Path, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON (stable diffs, DVC metrics friendly)."""
    return write_text(dest, json.dumps(obj, indent=2, sort_keys=True) + "\n")
