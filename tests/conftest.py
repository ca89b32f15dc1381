"""Shared fixtures: synthetic IDX sources, a tiny prepared dataset, and real MNIST.

``mnist_source`` / ``mnist_prepared`` use the real files in ``../shared/mnist`` (the
offline copy of the canonical distribution); tests that need them fail loudly, never
skip, when it is missing, because CI always has it.
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.config import Config, DataConfig, load_config
from pipeline.data.dataset import images_path, labels_path
from pipeline.data.idx import encode_images, encode_labels
from pipeline.data.sources import FileSpec, SplitFiles
from tests.helpers.synthetic_digits import make_images

ROOT = Path(__file__).resolve().parents[1]
SHARED_MNIST = (ROOT.parent / "shared" / "mnist").resolve()


def write_idx_source(
    directory: Path, n_train: int = 200, n_test: int = 100, seed: int = 0
) -> dict[str, SplitFiles]:
    """Write four gzipped IDX files into ``directory``; return their specs (real digests)."""
    import hashlib

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    specs: dict[str, SplitFiles] = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        made = {}
        for kind, payload in (
            ("images", encode_images(make_images(n, seed + n))),
            ("labels", encode_labels(labels)),
        ):
            ndim = 3 if kind == "images" else 1
            name = f"{prefix}-{kind}-idx{ndim}-ubyte.gz"
            data = gzip.compress(payload, mtime=0)
            (directory / name).write_bytes(data)
            made[kind] = FileSpec(
                name, len(data), hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()
            )
        specs[split] = SplitFiles(images=made["images"], labels=made["labels"])
    return specs


@pytest.fixture
def idx_source(tmp_path: Path) -> tuple[Path, dict[str, SplitFiles]]:
    """A directory with four small synthetic MNIST-format files and their specs."""
    src = tmp_path / "source"
    return src, write_idx_source(src)


@pytest.fixture
def base_config() -> Config:
    return load_config(ROOT / "params.yaml")


def outputs_under(cfg: Config, root: Path, prepared: Path) -> Config:
    """``cfg`` reading ``prepared`` and writing every stage output under ``root``."""
    return replace(
        cfg,
        data=replace(cfg.data, prepared_dir=prepared),
        train=replace(
            cfg.train,
            model_path=root / "candidate" / "model.pt",
            checkpoint_dir=root / "checkpoints",
            live_dir=root / "metrics" / "train",
            run_info_path=root / "reports" / "train" / "run.json",
            # The tiny datasets have 200 training images: hold out 50 for validation
            # (temperature and confidence threshold of the quality report).
            val_size=min(cfg.train.val_size, 50),
        ),
        evaluate=replace(
            cfg.evaluate,
            live_dir=root / "metrics" / "eval",
            run_info_path=root / "reports" / "eval" / "run.json",
            per_class_path=root / "reports" / "eval" / "per_class.json",
            confusion_png=root / "reports" / "confusion.png",
            mistakes_png=root / "reports" / "mistakes.png",
            quality_path=root / "reports" / "eval" / "quality.json",
            quality_card_path=root / "reports" / "eval" / "quality.md",
        ),
        # A small robustness suite and few non-digit probes: seconds, not minutes.
        quality=replace(cfg.quality, n_images=40, n_probes=20),
        export=replace(
            cfg.export,
            onnx_path=root / "candidate" / "model.onnx",
            int8_path=root / "candidate" / "model.int8.onnx",
            parity_path=root / "metrics" / "parity.json",
        ),
        # Models trained for seconds on 200 synthetic images cannot meet the production
        # robustness/ECE floors (whatever profile params.yaml last held): tests that are
        # about those checks set them explicitly.
        gate=replace(
            cfg.gate,
            report_path=root / "reports" / "gate.json",
            min_robust_accuracy=None,
            robust_floors={},
            max_ece=None,
        ),
        registry=replace(
            cfg.registry,
            production_dir=root / "models" / "production",
            previous_dir=root / "models" / "previous",
        ),
    )


@pytest.fixture
def stage_cfg(base_config: Config, tmp_path: Path, tiny_prepared: Path) -> Config:
    """The project's config on the tiny synthetic dataset, every output under tmp_path."""
    return outputs_under(base_config, tmp_path, tiny_prepared)


@pytest.fixture
def tiny_prepared(tmp_path: Path) -> Path:
    """A prepared dir of 200 train / 100 test synthetic images (pipeline/data/dataset.py layout)."""
    out = tmp_path / "prepared"
    out.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("train", 200), ("test", 100)):
        np.save(images_path(out, split), make_images(n, n))
        np.save(labels_path(out, split), rng.integers(0, 10, size=n).astype(np.uint8))
    (out / "manifest.json").write_text('{"format": "synthetic"}\n')
    return out


@pytest.fixture(scope="session")
def mnist_source() -> Path:
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file():
        raise FileNotFoundError(f"real MNIST expected at {SHARED_MNIST} (see README)")
    return SHARED_MNIST


@pytest.fixture(scope="session")
def mnist_prepared(tmp_path_factory: pytest.TempPathFactory, mnist_source: Path) -> Iterator[Path]:
    """The real dataset, ingested once per test session into a temporary data dir."""
    from pipeline.data.ingest import ingest

    root = tmp_path_factory.mktemp("mnist")
    cfg = replace(
        DataConfig(), source=str(mnist_source), raw_dir=root / "raw", prepared_dir=root / "prepared"
    )
    ingest(cfg)
    yield cfg.prepared_dir
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def mnist_stats(tmp_path_factory: pytest.TempPathFactory, mnist_prepared: Path) -> Path:
    """metrics/data_stats.json of the real dataset (validate stage run once per session)."""
    from pipeline.data.validate import run_validation

    root = tmp_path_factory.mktemp("validate")
    cfg = replace(
        load_config(ROOT / "params.yaml").validate,
        reference_profile=ROOT / "data" / "reference_profile.json",
        stats_path=root / "data_stats.json",
        report_dir=root / "report",
    )
    run_validation(mnist_prepared, cfg)
    return cfg.stats_path
