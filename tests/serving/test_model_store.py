"""Loading, contract checks, provider reporting and hot swap of the served model."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.handoff.onnx_runtime as onnx_runtime
from pipeline.core.atomic import sha256_file
from pipeline.core.errors import ModelFileError
from pipeline.serving.model_store import MODEL_FILE, ModelStore, load_model
from tests.helpers.hostile import three_class_onnx


def test_load_reads_hash_metadata_and_predicts(onnx_models: tuple[Path, Path]) -> None:
    model = load_model(onnx_models[0], device="cpu")
    assert model.sha256 == sha256_file(onnx_models[0])
    assert model.metadata["model_version"] == "test-a"
    assert model.version == "test-a"
    assert model.provider == "CPUExecutionProvider"
    logits, probs = model.predict(
        np.random.default_rng(0).uniform(0, 255, (5, 28, 28)).astype(np.float32)
    )
    assert logits.shape == probs.shape == (5, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    info = model.describe()
    assert info["inputs"][0]["name"] == "image"
    assert {o["name"] for o in info["outputs"]} == {"logits", "probabilities"}


def test_cuda_requested_when_gpu_reported_and_actual_provider_read_back(
    onnx_models: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Inject 'a GPU is present': CUDA is requested first; without a real GPU onnxruntime
    falls back, and the store reports the provider it actually got, with a warning."""
    monkeypatch.setattr(onnx_runtime, "cuda_device_present", lambda: True)
    monkeypatch.setattr(
        onnx_runtime.ort,
        "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.serving"):
        model = load_model(onnx_models[0], device="auto")
    assert model.providers_requested == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert model.provider == model.session.session.get_providers()[0]
    if model.provider != "CUDAExecutionProvider":
        assert "CUDA provider requested but the session runs on" in caplog.text


def test_no_gpu_means_cpu_only(
    onnx_models: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_runtime, "cuda_device_present", lambda: False)
    model = load_model(onnx_models[0], device="auto")
    assert model.providers_requested == ("CPUExecutionProvider",)
    assert model.provider == "CPUExecutionProvider"
    with pytest.raises(ModelFileError, match="device 'cuda' requested"):
        load_model(onnx_models[0], device="cuda")


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"definitely not protobuf")
    with pytest.raises(ModelFileError, match="cannot load"):
        load_model(bad)


def test_contract_violation_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wrong.onnx"
    torch.onnx.export(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)),
        (torch.zeros(1, 1, 28, 28),),
        str(path),
        input_names=["x"],
        output_names=["logits"],
        dynamo=False,
    )
    with pytest.raises(ModelFileError, match="expected one input named 'image'"):
        load_model(path)


def test_poll_swaps_on_directory_replacement_and_keeps_old_on_bad_file(
    tmp_path: Path, onnx_models: tuple[Path, Path], install_model: Callable[[Path, Path], None]
) -> None:
    install = install_model
    prod = tmp_path / "production"
    store = ModelStore(prod / MODEL_FILE, device="cpu")
    assert store.poll() is False and store.current is None
    assert "not found" in (store.state.last_error or "")

    install(onnx_models[0], prod)
    assert store.poll() is True
    first = store.current
    assert first is not None and first.sha256 == sha256_file(onnx_models[0])
    assert store.poll() is False and store.current is first  # unchanged file: no reload

    install(onnx_models[1], prod)
    assert store.poll() is True
    assert store.current is not None and store.current.sha256 == sha256_file(onnx_models[1])
    assert store.state.reloads == 2
    # The old object still works for requests that took it before the swap.
    assert first.predict(np.zeros((1, 28, 28), np.float32))[1].shape == (1, 10)

    second = store.current
    with_bad = tmp_path / "bad.onnx"
    with_bad.write_bytes(b"garbage")
    install(with_bad, prod)
    assert store.poll() is False
    assert store.current is second
    assert "cannot load" in (store.state.last_error or "")
    assert store.poll() is False  # the failed file is not retried until it changes

    install(onnx_models[1], prod)  # same bytes, new inode: no reload, error cleared
    assert store.poll() is False
    assert store.current is not None and store.current.sha256 == second.sha256
    assert store.state.last_error is None


def test_three_class_model_is_refused_at_start_and_on_swap(
    tmp_path: Path, onnx_models: tuple[Path, Path], install_model: Callable[[Path, Path], None]
) -> None:
    """Right input/output names, 3 classes: never served; the old model stays."""
    wrong = tmp_path / "three.onnx"
    wrong.write_bytes(three_class_onnx())
    with pytest.raises(ModelFileError, match=r"output 'logits' must be float32 \[N,10\]"):
        load_model(wrong, device="cpu")

    prod = tmp_path / "production"
    install_model(wrong, prod)
    store = ModelStore(prod / MODEL_FILE, device="cpu")
    assert store.poll() is False and store.current is None  # at start: nothing served
    assert "breaks the model contract" in (store.state.last_error or "")

    install_model(onnx_models[0], prod)
    assert store.poll() is True
    good = store.current
    install_model(wrong, prod)
    assert store.poll() is False and store.current is good  # on swap: the old one stays
    assert "got tensor(float) ['N', '3']" in (store.state.last_error or "")
    assert store.state.failed_reloads == 2 and store.state.reloads == 1


def test_producer_is_the_exporting_library(onnx_models: tuple[Path, Path]) -> None:
    """Not onnxruntime's ``version`` (the unset ONNX model_version, INT64_MAX)."""
    producer = load_model(onnx_models[0], device="cpu").describe()["producer"]
    assert producer == f"pytorch {torch.__version__}"
