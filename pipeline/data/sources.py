"""The four MNIST files: pinned checksums, and fetching them from a directory or mirrors.

Files are fetched into a caller-provided staging directory and verified there; nothing
reaches ``data/`` until all four are verified (see :mod:`pipeline.data.ingest`).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import shutil
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.core.errors import ChecksumError, DownloadError, MissingFileError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileSpec:
    """One expected file: its name, size and pinned digests."""

    name: str
    size: int
    md5: str
    sha256: str


@dataclass(frozen=True)
class SplitFiles:
    images: FileSpec
    labels: FileSpec


# The canonical distribution (the md5s are those torchvision's MNIST.resources lists).
MNIST_FILES: dict[str, SplitFiles] = {
    "train": SplitFiles(
        images=FileSpec(
            "train-images-idx3-ubyte.gz",
            9912422,
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        ),
        labels=FileSpec(
            "train-labels-idx1-ubyte.gz",
            28881,
            "d53e105ee54ea40749a09fcbcd1e9432",
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        ),
    ),
    "test": SplitFiles(
        images=FileSpec(
            "t10k-images-idx3-ubyte.gz",
            1648877,
            "9fb629c4189551a2d022fa330f9573f3",
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        ),
        labels=FileSpec(
            "t10k-labels-idx1-ubyte.gz",
            4542,
            "ec29112dd5afa0611ce80d1b7f02629c",
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
    ),
}


def all_specs(files: dict[str, SplitFiles]) -> list[FileSpec]:
    return [spec for split in files.values() for spec in (split.images, split.labels)]


def verify_file(path: Path, spec: FileSpec, origin: str | None = None) -> None:
    """Check size, md5 and sha256 of ``path``; raise :class:`ChecksumError` naming the file.

    ``origin`` is where the bytes came from (source path or URL), shown in the message.
    """
    size = path.stat().st_size
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            md5.update(chunk)
            sha.update(chunk)
    problems = []
    if size != spec.size:
        hint = " (truncated)" if size < spec.size else ""
        problems.append(f"size {size} bytes{hint}, expected {spec.size}")
    if md5.hexdigest() != spec.md5:
        problems.append(f"md5 {md5.hexdigest()}, expected {spec.md5}")
    if sha.hexdigest() != spec.sha256:
        problems.append(f"sha256 {sha.hexdigest()}, expected {spec.sha256}")
    if problems:
        raise ChecksumError(f"{spec.name} (from {origin or path}): " + "; ".join(problems))


def copy_from_directory(source: Path, spec: FileSpec, staging: Path) -> Path:
    """Copy ``source/spec.name`` into ``staging``; a missing file is a MissingFileError."""
    src = Path(source) / spec.name
    if not src.is_file():
        raise MissingFileError(
            f"{spec.name}: not found in source directory {source} (looked for {src})"
        )
    dest = staging / spec.name
    shutil.copyfile(src, dest)
    return dest


def download(
    spec: FileSpec,
    mirrors: Sequence[str],
    staging: Path,
    retries: int = 3,
    timeout_s: float = 60.0,
    backoff_s: float = 1.0,
) -> Path:
    """Fetch ``spec`` from the first of ``mirrors`` (base URLs) that serves it intact.

    The pipeline's only retry layer: each mirror gets ``retries`` attempts, ``backoff_s``,
    ``2 * backoff_s``, ... apart. Each attempt downloads to ``staging`` and is verified; an
    HTTP error, a dropped connection or a corrupt download is a failed attempt (logged).
    Raises :class:`DownloadError` naming the file, the attempts and the last failure.
    """
    dest = staging / spec.name
    last = "no mirrors configured"
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + spec.name
        for attempt in range(1, retries + 1):
            try:
                _fetch(url, dest, spec, timeout_s)
                verify_file(dest, spec, origin=url)
                return dest
            except (OSError, http.client.HTTPException, ChecksumError) as err:
                last = f"{url}: {err}"
                log.warning("download attempt %d/%d failed: %s", attempt, retries, last)
                dest.unlink(missing_ok=True)
                if attempt < retries:
                    time.sleep(backoff_s * 2 ** (attempt - 1))
    raise DownloadError(
        f"{spec.name}: {len(mirrors) * retries} download attempts failed "
        f"({len(mirrors)} mirrors x {retries}); last: {last}"
    )


def _fetch(url: str, dest: Path, spec: FileSpec, timeout_s: float) -> None:
    req = urllib.request.Request(url, headers={"User-Agent": "mnist-mlops/0.1"})
    with (
        urllib.request.urlopen(req, timeout=timeout_s) as resp,
        open(dest, "wb") as out,
        tqdm(total=spec.size, unit="B", unit_scale=True, desc=spec.name, leave=False) as bar,
    ):
        for chunk in iter(lambda: resp.read(1 << 16), b""):
            out.write(chunk)
            bar.update(len(chunk))
