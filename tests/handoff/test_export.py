"""Tests of pipeline/handoff/export.py and of the example in docs/model-handoff.md."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import pipeline.handoff.export as export_mod
from pipeline.core.atomic import sha256_file
from pipeline.core.config import Config
from pipeline.core.errors import ModelFileError, ParityError
from pipeline.data.dataset import dataset_version, load_split
from pipeline.handoff.export import (
    METADATA_KEYS,
    export_onnx,
    git_commit,
    run_export_stage,
    wrap,
)
from pipeline.handoff.onnx_runtime import read_metadata
from pipeline.quality.evaluate import run_evaluate_stage
from pipeline.training.model_io import LoadedModel, load_model_file, save_model_file
from pipeline.training.models import build_model

ROOT = Path(__file__).resolve().parents[2]
MEAN, STD = 0.1307, 0.3081


def random_model(name: str = "mlp", seed: int = 0, mean: float = MEAN) -> LoadedModel:
    torch.manual_seed(seed)
    return LoadedModel(build_model(name, 8).eval(), name, 8, mean, STD)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, Path]:
    model = random_model("seed_cnn")
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    export_onnx(model, path, opset=18, metadata={"model_version": "v-test", "opset": "override"})
    return model, path


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28)).astype(np.float32)


def test_graph_contract(exported: tuple[LoadedModel, Path]) -> None:
    _, path = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # dynamic batch
    assert [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    for out in proto.graph.output:
        assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert out.type.tensor_type.shape.dim[1].dim_value == 10
    default = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    assert default and default[0] >= 18


def test_metadata_contract_and_extras(exported: tuple[LoadedModel, Path]) -> None:
    model, path = exported
    meta = read_metadata(path)
    assert meta["model_version"] == "v-test"
    assert meta["opset"] == "override"  # caller metadata wins over the defaults
    assert meta["model_name"] == "seed_cnn" and meta["model_width"] == "8"
    assert float(meta["normalization_mean"]) == model.mean
    assert meta["torch_version"] == torch.__version__
    assert meta["onnxruntime_version"] == ort.__version__
    assert "0..255" in meta["input_contract"]
    assert meta["class_labels"].split(",") == [str(i) for i in range(10)]


@pytest.mark.parametrize("n", [1, 5, 33])
def test_onnxruntime_matches_torch_any_batch(exported: tuple[LoadedModel, Path], n: int) -> None:
    model, path = exported
    x = pixels(n, seed=n)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, probs = sess.run(["logits", "probabilities"], {"image": x})
    assert logits.shape == probs.shape == (n, 10)
    assert logits.dtype == probs.dtype == np.float32
    with torch.no_grad():
        want = wrap(model)(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_normalisation_is_inside_the_graph(tmp_path: Path) -> None:
    """Raw pixels in: the graph applies (x/255 - mean)/std with the stored constants."""
    model = random_model("mlp", seed=1, mean=0.5)
    path = export_onnx(model, tmp_path / "m.onnx")
    x = pixels(4)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"image": x})
    with torch.no_grad():
        want = model.module(torch.from_numpy((x / 255.0 - 0.5) / STD).float()).numpy()
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)


def test_temperature_calibrates_probabilities_and_leaves_logits(tmp_path: Path) -> None:
    """``probabilities`` = softmax(logits / T) in the graph; logits and argmax unchanged."""
    model = random_model("mlp", seed=5)
    plain, scaled = tmp_path / "plain.onnx", tmp_path / "scaled.onnx"
    export_onnx(model, plain)
    export_onnx(model, scaled, temperature=2.5)
    x = pixels(17, seed=3)
    outs = {}
    for name, path in (("plain", plain), ("scaled", scaled)):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs[name] = sess.run(["logits", "probabilities"], {"image": x})
    np.testing.assert_allclose(outs["scaled"][0], outs["plain"][0], atol=1e-5, rtol=0)
    want = torch.softmax(torch.from_numpy(outs["plain"][0]) / 2.5, dim=1).numpy()
    np.testing.assert_allclose(outs["scaled"][1], want, atol=1e-6, rtol=0)
    assert (outs["scaled"][1].argmax(1) == outs["plain"][1].argmax(1)).all()
    assert outs["scaled"][1].max(1).mean() < outs["plain"][1].max(1).mean()  # T > 1 softens
    with pytest.raises(ModelFileError, match="temperature"):
        export_onnx(model, tmp_path / "bad.onnx", temperature=0.0)


def test_rejects_old_opset_and_non_string_metadata(tmp_path: Path) -> None:
    model = random_model()
    with pytest.raises(ModelFileError, match="opset 17"):
        export_onnx(model, tmp_path / "a.onnx", opset=17)
    with pytest.raises(ModelFileError, match="strings"):
        export_onnx(model, tmp_path / "b.onnx", metadata={"n": 3})  # type: ignore[dict-item]
    assert not list(tmp_path.iterdir())


def test_git_commit_inside_and_outside_a_repository(tmp_path: Path) -> None:
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if head.returncode == 0:
        assert git_commit(ROOT) == head.stdout.strip()
    assert git_commit(tmp_path) == "unknown"


@pytest.fixture
def evaluated(stage_cfg: Config) -> Config:
    """A config whose model.pt exists and has been through the evaluate stage."""
    cfg = replace(stage_cfg, evaluate=replace(stage_cfg.evaluate, batch_size=64))
    model = random_model("mlp", seed=2)
    save_model_file(cfg.train.model_path, model.module, "mlp", 8, MEAN, STD)
    run_evaluate_stage(cfg)
    return cfg


def test_run_export_stage_metadata_and_parity(evaluated: Config, tiny_prepared: Path) -> None:
    cfg = evaluated
    report = run_export_stage(cfg, cwd=ROOT)

    onnx_path = cfg.export.onnx_path
    meta = read_metadata(onnx_path)
    assert set(METADATA_KEYS) <= set(meta)
    evaluation = {
        **json.loads(cfg.evaluate.run_info_path.read_text()),
        **json.loads((cfg.evaluate.live_dir / "metrics.json").read_text()),
    }
    assert json.loads(meta["test_metrics"]) == {k: evaluation[k] for k in ("accuracy", "loss", "n")}
    assert meta["dataset_sha256"] == dataset_version(tiny_prepared)
    assert meta["params_hash"] == cfg.params_hash()
    assert meta["source_model_sha256"] == sha256_file(cfg.train.model_path)
    assert meta["git_commit"] == git_commit(ROOT)
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{12}", meta["model_version"])

    parity = json.loads(cfg.export.parity_path.read_text())
    assert parity == json.loads(json.dumps(report))
    assert parity["passed"] is True
    assert parity["onnx_sha256"] == sha256_file(onnx_path)
    assert set(parity["batch_sizes"]) == {str(b) for b in cfg.export.parity_batch_sizes}
    assert parity["onnx_accuracy"] == pytest.approx(evaluation["accuracy"])
    assert not [p for p in onnx_path.parent.iterdir() if p.name.startswith(".")]

    # Calibration and abstention from evaluate's quality report, exactly.
    quality = json.loads(cfg.evaluate.quality_path.read_text())
    assert float(meta["temperature"]) == quality["temperature"]
    assert float(meta["confidence_threshold"]) == quality["confidence_threshold"]
    assert json.loads(meta["quality"]) == quality["compact"]
    assert parity["temperature"] == quality["temperature"]
    for row in parity["batch_sizes"].values():
        assert row["max_abs_diff_probabilities"] <= cfg.export.parity_atol
    # The served probabilities are the calibrated ones; the logits are the model's.
    test = load_split(tiny_prepared, "test")
    x = np.asarray(test.images, np.float32)[:, None]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits, probs = sess.run(["logits", "probabilities"], {"image": x})
    with torch.no_grad():
        want = wrap(load_model_file(cfg.train.model_path))(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)
    calibrated = torch.softmax(torch.from_numpy(want) / quality["temperature"], dim=1).numpy()
    np.testing.assert_allclose(probs, calibrated, atol=1e-5, rtol=0)


def test_export_refuses_a_quality_report_of_another_model(evaluated: Config) -> None:
    cfg = evaluated
    quality = json.loads(cfg.evaluate.quality_path.read_text())
    quality["model_sha256"] = "0" * 64
    cfg.evaluate.quality_path.write_text(json.dumps(quality))
    with pytest.raises(ModelFileError, match="another model"):
        run_export_stage(cfg, cwd=ROOT)
    assert not cfg.export.onnx_path.exists()


def test_parity_failure_leaves_no_onnx(evaluated: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph that does not compute what the model computes is never installed."""
    cfg = evaluated
    cfg.export.onnx_path.write_bytes(b"stale model from an earlier run")
    real_export = export_mod.export_onnx

    def wrong_export(model: LoadedModel, dest: Path, **kw: object) -> Path:
        other = replace(model, module=build_model("mlp", 8).eval())  # fresh random weights
        return real_export(other, dest, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(export_mod, "export_onnx", wrong_export)
    with pytest.raises(ParityError, match="parity failed"):
        run_export_stage(cfg, cwd=ROOT)
    assert not cfg.export.onnx_path.exists()
    parity = json.loads(cfg.export.parity_path.read_text())
    assert parity["passed"] is False
    assert parity["max_abs_diff"] > cfg.export.parity_atol


def test_export_refuses_metrics_of_another_model(evaluated: Config) -> None:
    cfg = evaluated
    run_info = json.loads(cfg.evaluate.run_info_path.read_text())
    run_info["model_sha256"] = "0" * 64
    cfg.evaluate.run_info_path.write_text(json.dumps(run_info))
    cfg.export.onnx_path.write_bytes(b"an earlier export")
    cfg.export.parity_path.write_text('{"passed": true}')
    with pytest.raises(ModelFileError, match="another model"):
        run_export_stage(cfg, cwd=ROOT)
    assert not cfg.export.onnx_path.exists()
    assert not cfg.export.parity_path.exists()


def handoff_example() -> str:
    text = (ROOT / "docs" / "model-handoff.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    # The consuming service (the other python block fetches from the registry).
    services = [b for b in blocks if "InferenceSession" in b and "__main__" in b]
    assert len(services) == 1, "docs/model-handoff.md should hold one example service"
    return services[0]


def test_handoff_doc_example_runs(exported: tuple[LoadedModel, Path], tmp_path: Path) -> None:
    """The documented consumer code classifies PNGs with the exported model, as written."""
    _, model_path = exported
    script = tmp_path / "classify.py"
    script.write_text(handoff_example())

    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255  # a white "1" on black
    dark_on_light = Image.fromarray(255 - digit).resize((84, 84), Image.Resampling.NEAREST)
    light_png, dark_png = tmp_path / "ink.png", tmp_path / "mnist.png"
    dark_on_light.save(light_png)
    Image.fromarray(digit).save(dark_png)

    out = subprocess.run(
        [sys.executable, str(script), str(model_path), str(light_png), str(dark_png)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "provider: CPUExecutionProvider" in out.stdout
    assert "model version: v-test" in out.stdout
    results = re.findall(r"\.png: (\d) \(p=([0-9.]+)\)", out.stdout)
    assert len(results) == 2
    # Inverted and rescaled, the light-background scan must look like the MNIST-style
    # original to the model: the same class and (nearly) the same probability.
    assert results[0][0] == results[1][0]
    assert float(results[0][1]) == pytest.approx(float(results[1][1]), abs=0.05)

    namespace: dict[str, object] = {"__name__": "handoff_example"}
    exec(compile(handoff_example(), "handoff_example", "exec"), namespace)
    load_digit = namespace["load_digit"]
    arr = load_digit(str(light_png))  # type: ignore[operator]
    assert arr.shape == (1, 28, 28) and arr.dtype == np.float32
    assert arr.min() >= 0 and arr.max() <= 255
    assert np.abs(arr[0] - digit.astype(np.float32)).mean() < 10  # polarity and scale restored
