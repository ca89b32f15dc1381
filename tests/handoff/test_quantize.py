"""Tests of pipeline/handoff/quantize.py (optional INT8 static quantisation)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.config import Config
from pipeline.core.errors import ModelFileError
from pipeline.data.dataset import load_split
from pipeline.handoff.export import export_onnx, run_export_stage
from pipeline.handoff.onnx_runtime import create_session
from pipeline.handoff.quantize import calibration_sample, compare_int8, quantize_int8
from pipeline.quality.evaluate import run_evaluate_stage
from pipeline.training.model_io import LoadedModel, save_model_file
from pipeline.training.models import build_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = LoadedModel(build_model("seed_cnn", 8).eval(), "seed_cnn", 8, 0.1307, 0.3081)
    return export_onnx(model, tmp_path_factory.mktemp("q") / "fp32.onnx")


def test_calibration_sample_is_seeded_and_bounded() -> None:
    images = np.arange(50 * 28 * 28, dtype=np.int64).astype(np.uint8).reshape(50, 28, 28)
    a = calibration_sample(images, 10, seed=3)
    assert a.shape == (10, 28, 28)
    np.testing.assert_array_equal(a, calibration_sample(images, 10, seed=3))
    assert len(calibration_sample(images, 500, seed=0)) == 50


def test_int8_keeps_the_contract_and_mostly_agrees(fp32: Path, tiny_prepared: Path) -> None:
    train = load_split(tiny_prepared, "train")
    test = load_split(tiny_prepared, "test")
    int8 = quantize_int8(
        fp32, fp32.with_name("int8.onnx"), calibration_sample(train.images, 100, 0)
    )
    session = create_session(int8, "cpu").session
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["logits", "probabilities"]

    report = compare_int8(
        fp32, int8, test.images, test.labels, max_drop=0.5, calibration_samples=100
    )
    assert report.int8_size_bytes < report.fp32_size_bytes
    assert report.argmax_agreement > 0.8
    assert report.passed == (report.int8_accuracy >= report.fp32_accuracy - 0.5)
    strict = compare_int8(fp32, int8, test.images, test.labels, max_drop=0.0, calibration_samples=1)
    assert strict.passed == (strict.int8_accuracy >= strict.fp32_accuracy)


def test_quantize_needs_calibration_images(fp32: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="calibration"):
        quantize_int8(fp32, tmp_path / "x.onnx", np.zeros((0, 28, 28), np.uint8))


def test_export_stage_with_quantize(stage_cfg: Config) -> None:
    cfg = replace(
        stage_cfg, export=replace(stage_cfg.export, quantize=True, calibration_samples=64)
    )
    torch.manual_seed(1)
    save_model_file(cfg.train.model_path, build_model("mlp").eval(), "mlp", 32, 0.1307, 0.3081)
    run_evaluate_stage(cfg)
    run_export_stage(cfg, cwd=ROOT)
    report = json.loads(cfg.export.parity_path.read_text())
    int8 = report["int8"]
    assert int8["calibration_samples"] == 64
    assert int8["max_drop"] == cfg.gate.max_regression
    assert cfg.export.int8_path.exists() == int8["passed"]
    assert cfg.export.onnx_path.exists()
