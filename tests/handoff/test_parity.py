"""Tests of pipeline/handoff/parity.py, including parity on the real MNIST test set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.errors import ModelFileError
from pipeline.data.dataset import load_split
from pipeline.handoff.export import export_onnx, wrap
from pipeline.handoff.onnx_runtime import (
    accuracy,
    create_session,
    onnx_accuracy,
    onnx_logits,
)
from pipeline.handoff.parity import check_parity
from pipeline.training.model_io import LoadedModel, torch_logits
from pipeline.training.models import build_model

MEAN, STD = 0.1307, 0.3081


def random_model(name: str, seed: int) -> LoadedModel:
    torch.manual_seed(seed)
    return LoadedModel(build_model(name, 8).eval(), name, 8, MEAN, STD)


@pytest.fixture(scope="module")
def cnn_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, Path]:
    model = random_model("cnn", 0)
    return model, export_onnx(model, tmp_path_factory.mktemp("parity") / "cnn.onnx")


def images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, (n, 28, 28)).astype(np.uint8),
        rng.integers(0, 10, n).astype(np.uint8),
    )


def test_accuracy_checks_lengths() -> None:
    logits = np.eye(10, dtype=np.float32)[[1, 2, 3]]
    assert accuracy(logits, np.array([1, 2, 0])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="predictions"):
        accuracy(logits, np.array([1, 2]))


def test_same_model_passes_at_every_batch_size(cnn_export: tuple[LoadedModel, Path]) -> None:
    model, path = cnn_export
    x, y = images(61)
    report = check_parity(model, path, x, y, batch_sizes=(1, 7, 256), atol=1e-4)
    assert report.passed
    assert [b.batch_size for b in report.batches] == [1, 7, 256]
    for b in report.batches:
        assert b.argmax_agreement == 1.0
        assert b.max_abs_diff <= 1e-4
        assert b.seconds >= 0
    assert report.n == 61
    assert report.onnx_accuracy == report.torch_accuracy == accuracy(torch_logits(model, x), y)
    d = report.to_dict()
    assert d["passed"] is True and set(d["batch_sizes"]) == {"1", "7", "256"}


def test_different_weights_fail(cnn_export: tuple[LoadedModel, Path]) -> None:
    _, path = cnn_export
    other = random_model("cnn", 1)
    x, y = images(20)
    report = check_parity(other, path, x, y, batch_sizes=(1, 7), atol=1e-4)
    assert not report.passed
    assert report.max_abs_diff > 1e-4
    assert "batch 1" in report.failure_message() and "batch 7" in report.failure_message()
    assert report.to_dict()["passed"] is False


def test_bad_arguments(cnn_export: tuple[LoadedModel, Path], tmp_path: Path) -> None:
    model, path = cnn_export
    x, y = images(4)
    with pytest.raises(ValueError, match="batch size"):
        check_parity(model, path, x, y, batch_sizes=())
    with pytest.raises(ValueError, match="at least one image"):
        check_parity(model, path, x[:0], y[:0])
    with pytest.raises(ModelFileError, match="not found"):
        check_parity(model, tmp_path / "missing.onnx", x, y)


@pytest.mark.integration
@pytest.mark.slow  # 13-35 s on 2 shared cores: 10,000 images at three batch sizes
def test_parity_on_the_real_test_set(mnist_prepared: Path, tmp_path: Path) -> None:
    """A briefly fitted MLP: onnxruntime agrees with PyTorch on all 10,000 test images."""
    torch.manual_seed(0)
    train = load_split(mnist_prepared, "train")
    net = wrap(LoadedModel(build_model("mlp"), "mlp", 32, MEAN, STD)).train()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    x = torch.from_numpy(np.asarray(train.images[:20000], np.float32)[:, None])
    y = torch.from_numpy(np.asarray(train.labels[:20000]).astype(np.int64))
    for i in range(0, len(y), 128):
        loss = torch.nn.functional.cross_entropy(net(x[i : i + 128])[0], y[i : i + 128])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = LoadedModel(net.module.eval(), "mlp", 32, MEAN, STD)
    path = export_onnx(model, tmp_path / "mlp.onnx")

    test = load_split(mnist_prepared, "test")
    report = check_parity(model, path, test.images, test.labels, (1, 7, 256), atol=1e-4)
    assert report.n == 10000
    assert report.passed, report.failure_message()
    assert report.onnx_accuracy == report.torch_accuracy
    assert report.onnx_accuracy > 0.9  # a real model, not a constant one
    session = create_session(path, "cpu")
    assert onnx_accuracy(path, test.images, test.labels) == accuracy(
        onnx_logits(session, test.images, 1000), test.labels
    )
