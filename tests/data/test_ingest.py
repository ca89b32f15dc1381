"""Ingest: verified files in, data/ out; any bad input leaves data/ exactly as it was."""

import gzip
import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.core.config import DataConfig
from pipeline.core.errors import ChecksumError, IdxFormatError, MissingFileError, PipelineError
from pipeline.data.dataset import dataset_version, load_split
from pipeline.data.idx import encode_images, encode_labels
from pipeline.data.ingest import ingest
from pipeline.data.sources import FileSpec, SplitFiles


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (empty if absent)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    } | {str(p.relative_to(root)) + "/": "dir" for p in root.rglob("*") if p.is_dir()}


def data_cfg(tmp_path: Path, source: Path) -> DataConfig:
    return replace(
        DataConfig(),
        source=str(source),
        raw_dir=tmp_path / "data" / "raw",
        prepared_dir=tmp_path / "data" / "prepared",
    )


def test_ingest_writes_raw_and_prepared(tmp_path: Path, idx_source: tuple[Path, dict]) -> None:
    src, specs = idx_source
    cfg = data_cfg(tmp_path, src)
    result = ingest(cfg, specs)
    assert result.counts == {"train": 200, "test": 100}
    assert sorted(p.name for p in cfg.raw_dir.iterdir()) == sorted(
        s.name for f in specs.values() for s in (f.images, f.labels)
    )
    train = load_split(cfg.prepared_dir, "train")
    assert train.images.shape == (200, 28, 28) and train.images.dtype == np.uint8
    assert isinstance(train.images, np.memmap)
    assert result.dataset_sha256 == dataset_version(cfg.prepared_dir)
    assert not list((tmp_path / "data").glob(".*")), "no temporary leftovers"
    # Re-ingesting the same bytes gives the same dataset version.
    assert ingest(cfg, specs).dataset_sha256 == result.dataset_sha256


def _existing_data(tmp_path: Path, idx_source: tuple[Path, dict]) -> tuple[DataConfig, dict]:
    src, specs = idx_source
    cfg = data_cfg(tmp_path, src)
    ingest(cfg, specs)
    return cfg, specs


def test_missing_file_names_it(tmp_path: Path, idx_source: tuple[Path, dict]) -> None:
    cfg, specs = _existing_data(tmp_path, idx_source)
    before = snapshot(tmp_path / "data")
    (Path(cfg.source or "") / specs["test"].labels.name).unlink()
    with pytest.raises(MissingFileError, match=specs["test"].labels.name):
        ingest(cfg, specs)
    assert snapshot(tmp_path / "data") == before


def test_checksum_mismatch_names_file_and_expected(
    tmp_path: Path, idx_source: tuple[Path, dict]
) -> None:
    cfg, specs = _existing_data(tmp_path, idx_source)
    before = snapshot(tmp_path / "data")
    target = Path(cfg.source or "") / specs["train"].images.name
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as err:
        ingest(cfg, specs)
    assert specs["train"].images.name in str(err.value)
    assert specs["train"].images.sha256 in str(err.value)
    assert snapshot(tmp_path / "data") == before


def test_no_data_dir_created_on_failure(tmp_path: Path, idx_source: tuple[Path, dict]) -> None:
    src, specs = idx_source
    (src / specs["train"].labels.name).write_bytes(b"")
    with pytest.raises(ChecksumError, match="truncated"):
        ingest(data_cfg(tmp_path, src), specs)
    assert not (tmp_path / "data").exists()


def _respec(path: Path) -> FileSpec:
    data = path.read_bytes()
    return FileSpec(
        path.name, len(data), hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()
    )


def test_format_errors_behind_valid_checksums(
    tmp_path: Path, idx_source: tuple[Path, dict]
) -> None:
    """Files whose digests are pinned but whose content is bad still fail by name."""
    cfg, specs = _existing_data(tmp_path, idx_source)
    before = snapshot(tmp_path / "data")
    src = Path(cfg.source or "")
    # Label count differs from image count.
    labels = src / specs["test"].labels.name
    original_labels = labels.read_bytes()
    labels.write_bytes(gzip.compress(encode_labels(np.zeros(99, np.uint8)), mtime=0))
    specs_bad = {**specs, "test": SplitFiles(specs["test"].images, _respec(labels))}
    with pytest.raises(IdxFormatError, match="100 images but .* has 99 labels"):
        ingest(cfg, specs_bad)
    labels.write_bytes(original_labels)
    # Wrong magic (labels where images belong).
    images = src / specs["test"].images.name
    images.write_bytes(gzip.compress(encode_labels(np.zeros(100, np.uint8)), mtime=0))
    specs_bad = {**specs, "test": SplitFiles(_respec(images), specs["test"].labels)}
    with pytest.raises(IdxFormatError, match=f"{images.name}: magic number 2049"):
        ingest(cfg, specs_bad)
    # Truncated gzip stream.
    whole = gzip.compress(encode_images(np.zeros((100, 28, 28), np.uint8)), mtime=0)
    images.write_bytes(whole[: len(whole) // 2])
    specs_bad = {**specs, "test": SplitFiles(_respec(images), specs["test"].labels)}
    with pytest.raises(IdxFormatError, match=f"{images.name}: truncated gzip"):
        ingest(cfg, specs_bad)
    assert snapshot(tmp_path / "data") == before


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_corruption_always_fails_cleanly(
    tmp_path: Path, idx_source: tuple[Path, dict], data: st.DataObject
) -> None:
    """Random truncations and byte flips: always a named error, data/ unchanged.

    The corrupted file's digests are re-pinned half the time, so that the parser (not
    only the checksum) is exercised on the damaged bytes.
    """
    src, specs = idx_source
    cfg = data_cfg(tmp_path, src)
    if not cfg.prepared_dir.exists():
        ingest(cfg, specs)
    before = snapshot(tmp_path / "data")
    split = data.draw(st.sampled_from(["train", "test"]))
    kind = data.draw(st.sampled_from(["images", "labels"]))
    spec: FileSpec = getattr(specs[split], kind)
    original = (src / spec.name).read_bytes()
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(original) - 1))
        damaged = original[:cut]
    else:
        pos = data.draw(st.integers(0, len(original) - 1))
        flip = data.draw(st.integers(1, 255))
        damaged = original[:pos] + bytes([original[pos] ^ flip]) + original[pos + 1 :]
    (src / spec.name).write_bytes(damaged)
    try:
        run_specs = specs
        if data.draw(st.booleans()):
            run_specs = {**specs, split: replace(specs[split], **{kind: _respec(src / spec.name)})}
        try:
            ingest(cfg, run_specs)
        except PipelineError as err:
            assert spec.name in str(err) or split in str(err)
        else:
            # A flip inside the gzip header's mtime/OS bytes is harmless and may pass: then
            # the parsed data must equal the original.
            assert run_specs is not specs
        if run_specs is specs:
            assert snapshot(tmp_path / "data") == before
    finally:
        (src / spec.name).write_bytes(original)


@pytest.mark.integration
def test_real_mnist_ingests(mnist_prepared: Path) -> None:
    train, test = load_split(mnist_prepared, "train"), load_split(mnist_prepared, "test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert int(train.labels.max()) == 9 and int(test.labels.min()) == 0


@pytest.mark.integration
def test_real_mnist_corrupt_copy_is_rejected(tmp_path: Path, mnist_source: Path) -> None:
    import shutil

    src = tmp_path / "copy"
    shutil.copytree(mnist_source, src)
    target = src / "t10k-labels-idx1-ubyte.gz"
    target.write_bytes(target.read_bytes()[:-10])
    cfg = data_cfg(tmp_path, src)
    with pytest.raises(ChecksumError, match="t10k-labels-idx1-ubyte.gz.*truncated"):
        ingest(cfg)
    assert not (tmp_path / "data").exists()
