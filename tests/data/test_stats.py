import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import ArtifactError, SourceError
from pipeline.data.dataset import SplitArrays, load_split
from pipeline.data.stats import (
    build_reference_profile,
    compute_stats,
    image_summary,
    moments,
    pixel_histogram,
    read_normalization,
)


def test_moments_match_numpy(tiny_prepared: Path) -> None:
    images = load_split(tiny_prepared, "train").images
    mean, std = moments(pixel_histogram(images))
    x = np.asarray(images, dtype=np.float64) / 255
    assert mean == pytest.approx(x.mean(), abs=1e-12)
    assert std == pytest.approx(x.std(), abs=1e-12)


def test_image_summary_columns_and_ranges(tiny_prepared: Path) -> None:
    arrays = load_split(tiny_prepared, "test")
    table = image_summary(arrays, "test")
    assert list(table.columns) == ["split", "label", "mean", "std", "min", "max", "ink"]
    assert len(table) == 100
    assert table[["mean", "std", "min", "max", "ink"]].to_numpy().min() >= 0
    assert table[["mean", "std", "min", "max", "ink"]].to_numpy().max() <= 1
    first = np.asarray(arrays.images[0], dtype=np.float64) / 255
    assert table["mean"][0] == pytest.approx(first.mean())
    assert table["ink"][0] == pytest.approx((first > 0.5).mean())


def test_stats_and_profile_shape(tiny_prepared: Path) -> None:
    stats, table = compute_stats(tiny_prepared)
    assert stats["train"]["count"] == 200
    assert sum(stats["test"]["class_counts"].values()) == 100
    assert stats["normalization"]["mean"] == stats["train"]["pixel_mean"]
    profile = build_reference_profile(table)
    for split in ("train", "test"):
        weights = profile["splits"][split]["image_mean"]["weights"]
        assert sum(weights) == pytest.approx(1.0) and min(weights) > 0
        bins = profile["splits"][split]["image_mean"]["bins"]
        assert len(bins) == len(weights) + 1 and bins[0] == 0.0 and bins[-1] == 1.0


def test_labels_out_of_range_are_counted() -> None:
    arrays = SplitArrays(np.zeros((3, 28, 28), np.uint8), np.array([1, 10, 12], np.uint8))
    from pipeline.data.stats import split_stats

    assert split_stats(arrays)["labels_out_of_range"] == 2


def test_read_normalization_errors(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="run the validate stage"):
        read_normalization(tmp_path / "missing.json")
    bad = tmp_path / "stats.json"
    bad.write_text(json.dumps({"train": {}}))
    with pytest.raises(SourceError, match="normalization"):
        read_normalization(bad)


@pytest.mark.integration
def test_real_mnist_normalisation_constants(mnist_stats: Path) -> None:
    mean, std = read_normalization(mnist_stats)
    assert round(mean, 4) == 0.1307
    assert round(std, 4) == 0.3081
    stats = json.loads(mnist_stats.read_text())
    assert stats["train"]["count"] == 60000 and stats["test"]["count"] == 10000
    assert stats["validation"]["success"] is True
