"""Great Expectations validation: real MNIST passes; MNIST-unlike datasets fail by name."""

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.config import ValidateConfig, load_config
from pipeline.core.errors import DataValidationError
from pipeline.data.dataset import images_path, labels_path
from pipeline.data.validate import run_validation

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def vcfg(tmp_path: Path) -> ValidateConfig:
    return replace(
        load_config(ROOT / "params.yaml").validate,
        reference_profile=ROOT / "data" / "reference_profile.json",
        stats_path=tmp_path / "stats.json",
        report_dir=tmp_path / "report",
    )


def test_real_mnist_passes_and_writes_reports(mnist_stats: Path) -> None:
    report = mnist_stats.parent / "report"
    result = json.loads((report / "result.json").read_text())
    assert result["success"] is True and result["failed"] == []
    kinds = {c["expectation"] for c in result["checks"]}
    assert {
        "expect_table_row_count_to_equal",
        "expect_column_values_to_be_in_set",
        "expect_column_values_to_not_be_null",
        "expect_column_kl_divergence_to_be_less_than",
        "expect_column_values_to_be_between",
    } <= kinds
    assert (report / "data_docs" / "index.html").is_file()
    assert (report / "image_summary.csv.gz").stat().st_size > 0


def _variant(src: Path, dest: Path, change: Callable[[np.ndarray, np.ndarray], tuple]) -> Path:
    shutil.copytree(src, dest)
    for split in ("train", "test"):
        images = np.load(images_path(dest, split))
        labels = np.load(labels_path(dest, split))
        images, labels = change(images, labels)
        np.save(images_path(dest, split), images)
        np.save(labels_path(dest, split), labels)
    return dest


def _failed(err: pytest.ExceptionInfo[DataValidationError]) -> set[tuple[str, str | None]]:
    return {(f["expectation"], f["column"]) for f in err.value.failures}


def test_other_intensity_statistics_fail(tmp_path: Path, mnist_prepared: Path) -> None:
    """A 28x28, 10-class dataset with other intensities (inverted MNIST) is rejected."""
    data = _variant(mnist_prepared, tmp_path / "inv", lambda x, y: (255 - x, y))
    cfg = vcfg(tmp_path)
    with pytest.raises(DataValidationError) as err:
        run_validation(data, cfg)
    assert ("expect_column_kl_divergence_to_be_less_than", "mean") in _failed(err)
    assert ("expect_column_values_to_be_between", "pixel_mean") in _failed(err)
    assert "pixel_mean" in str(err.value) and "observed" in str(err.value)
    report = json.loads((cfg.report_dir / "result.json").read_text())
    assert report["success"] is False and len(report["failed"]) == len(err.value.failures)
    kl = next(f for f in err.value.failures if f["column"] == "mean")
    assert float(kl["observed_value"]) > cfg.max_intensity_kl


def test_labels_out_of_range_and_missing_class_fail(tmp_path: Path, mnist_prepared: Path) -> None:
    def bad_labels(x: np.ndarray, y: np.ndarray) -> tuple:
        y = y.copy()
        y[y == 7] = 3  # class 7 disappears
        y[:5] = 11  # and out-of-range labels appear
        return x, y

    data = _variant(mnist_prepared, tmp_path / "labels", bad_labels)
    with pytest.raises(DataValidationError) as err:
        run_validation(data, vcfg(tmp_path))
    failed = _failed(err)
    assert ("expect_column_values_to_be_in_set", "label") in failed
    assert ("expect_column_distinct_values_to_equal_set", "label") in failed
    assert ("expect_column_values_to_be_between", "fraction") in failed
    assert "11" in str(err.value)


def test_missing_reference_profile_is_named(tmp_path: Path, mnist_prepared: Path) -> None:
    from pipeline.core.errors import ArtifactError

    cfg = replace(vcfg(tmp_path), reference_profile=tmp_path / "nope.json")
    with pytest.raises(ArtifactError, match="nope.json"):
        run_validation(mnist_prepared, cfg)
