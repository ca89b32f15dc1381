"""The ingest stage: verified MNIST files in, ``data/raw`` and ``data/prepared`` out.

Everything is fetched into a staging directory beside ``data/raw``, checksummed and
parsed in memory first; only when all four files pass is the prepared directory built
(beside ``data/prepared``) and are the two swapped in together by
:mod:`pipeline.core.dirswap`: each with one atomic exchange, under a journal, so a kill at
any moment leaves each directory complete, and the next run (or
``python -m pipeline recover``) completes the pair and removes leftovers. A failure at
any step leaves ``data/`` exactly as it was.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.atomic import sha256_bytes, sha256_file
from pipeline.core.config import DataConfig
from pipeline.core.dirswap import recover, replacing
from pipeline.core.errors import IdxFormatError
from pipeline.data.dataset import MANIFEST, SPLITS, SplitArrays, images_path, labels_path
from pipeline.data.idx import gunzip, parse_images, parse_labels
from pipeline.data.sources import (
    MNIST_FILES,
    FileSpec,
    SplitFiles,
    all_specs,
    copy_from_directory,
    verify_file,
)
from pipeline.data.sources import download as download_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    raw_dir: Path
    prepared_dir: Path
    counts: dict[str, int]
    dataset_sha256: str  # sha256 of the prepared manifest

    def summary(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.counts.items())
        return f"{counts}; dataset sha256 {self.dataset_sha256[:12]} -> {self.prepared_dir}"


def fetch_verified(cfg: DataConfig, files: dict[str, SplitFiles], staging: Path) -> dict[str, Path]:
    """Bring every file into ``staging`` and verify it; return name -> staged path."""
    staged: dict[str, Path] = {}
    for spec in all_specs(files):
        if cfg.source is not None:
            path = copy_from_directory(Path(cfg.source), spec, staging)
            verify_file(path, spec, origin=str(Path(cfg.source) / spec.name))
        else:
            path = download_file(
                spec, cfg.mirrors, staging, cfg.download_retries, cfg.download_timeout_s
            )
        staged[spec.name] = path
        log.info("verified %s (sha256 %s)", spec.name, spec.sha256[:12])
    return staged


def parse_split(images_gz: Path, labels_gz: Path, split: str) -> SplitArrays:
    """Decompress and parse one split; image and label counts must agree."""
    images = parse_images(gunzip(images_gz.read_bytes(), images_gz.name), images_gz.name)
    labels = parse_labels(gunzip(labels_gz.read_bytes(), labels_gz.name), labels_gz.name)
    if images.shape[0] != labels.shape[0]:
        raise IdxFormatError(
            f"{split}: {images_gz.name} has {images.shape[0]} images but {labels_gz.name} has "
            f"{labels.shape[0]} labels"
        )
    return SplitArrays(images=images, labels=labels)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def ingest(cfg: DataConfig, files: dict[str, SplitFiles] = MNIST_FILES) -> IngestResult:
    """Fetch, verify, parse and store the dataset described by ``files``.

    Raises :class:`MissingFileError`, :class:`ChecksumError`, :class:`DownloadError` or
    :class:`IdxFormatError` naming the offending file; ``data/`` is then untouched.
    """
    where = cfg.source if cfg.source is not None else "the public mirrors"
    log.info("ingesting MNIST from %s", where)
    # The raw staging directory is the download directory: verified files are not copied
    # again, and a killed run's partial download is a leftover the next run removes.
    with replacing([cfg.raw_dir, cfg.prepared_dir]) as (raw_tmp, prep_tmp):
        staged = fetch_verified(cfg, files, raw_tmp)
        arrays = {
            split: parse_split(staged[f.images.name], staged[f.labels.name], split)
            for split, f in files.items()
        }
        blobs: dict[str, bytes] = {}
        for split in SPLITS:
            blobs[images_path(Path(), split).name] = _npy_bytes(arrays[split].images)
            blobs[labels_path(Path(), split).name] = _npy_bytes(arrays[split].labels)
        manifest = _manifest(files, arrays, blobs)
        for name, blob in blobs.items():
            (prep_tmp / name).write_bytes(blob)
        (prep_tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        # All checks passed: leaving the block swaps both directories in.
    result = IngestResult(
        raw_dir=cfg.raw_dir,
        prepared_dir=cfg.prepared_dir,
        counts={split: len(a) for split, a in arrays.items()},
        dataset_sha256=sha256_file(cfg.prepared_dir / MANIFEST),
    )
    log.info("ingest done: %s", result.summary())
    return result


def _manifest(
    files: dict[str, SplitFiles], arrays: dict[str, SplitArrays], blobs: dict[str, bytes]
) -> dict[str, object]:
    """Provenance of the prepared arrays. Deliberately source-independent, so the same
    bytes from a mirror or a local copy give the same dataset version."""

    def spec_dict(spec: FileSpec) -> dict[str, object]:
        return {"bytes": spec.size, "md5": spec.md5, "sha256": spec.sha256}

    return {
        "format": "mnist-mlops/prepared-v1",
        "raw": {spec.name: spec_dict(spec) for spec in all_specs(files)},
        "prepared": {name: sha256_bytes(blob) for name, blob in sorted(blobs.items())},
        "counts": {split: len(a) for split, a in arrays.items()},
        "image_shape": [28, 28],
        "dtype": "uint8",
    }


def recover_data(cfg: DataConfig) -> list[str]:
    """Finish an interrupted ingest swap and remove leftover staging directories."""
    return recover(cfg.raw_dir, [cfg.raw_dir, cfg.prepared_dir])
