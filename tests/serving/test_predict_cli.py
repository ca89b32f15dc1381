"""``python -m pipeline predict FILE...``, run for real in a subprocess."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.serving.imaging import to_mnist
from pipeline.serving.model_store import MODEL_FILE, load_model
from tests.helpers.hostile import huge_png, lying_jpeg

from .conftest import with_metadata

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def write_digits(tmp_path: Path) -> list[Path]:
    paths = []
    for i, (fmt, ext) in enumerate((("PNG", "png"), ("JPEG", "jpg"), ("PNG", "png"))):
        img = Image.new("L", (120 + 40 * i, 160), 255)
        ImageDraw.Draw(img).ellipse([30, 20, 90 + 20 * i, 140], outline=0, width=10 + 3 * i)
        buf = io.BytesIO()
        img.save(buf, fmt)
        path = tmp_path / f"digit{i}.{ext}"
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def test_predict_prints_one_line_per_file(tmp_path: Path, production_dir: Path) -> None:
    files = write_digits(tmp_path)
    result = run_cli(
        "predict", *map(str, files), "--set", f"registry.production_dir={production_dir}"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(files)
    model = load_model(production_dir / MODEL_FILE, device="cpu")
    _, probs = model.predict(np.stack([to_mnist(f.read_bytes()) for f in files]))
    for line, path, p in zip(lines, files, probs, strict=True):
        name, digit, prob, flag = line.split("\t")
        assert name == str(path)
        assert int(digit) == int(p.argmax())
        assert abs(float(prob) - float(p.max())) < 1e-4
        assert flag == "-"  # this model records no abstention threshold


def test_predict_flags_confidence_as_the_service_does(
    tmp_path: Path, onnx_models: tuple[Path, Path]
) -> None:
    files = write_digits(tmp_path)
    _, probs = load_model(onnx_models[0], device="cpu").predict(
        np.stack([to_mnist(f.read_bytes()) for f in files])
    )
    top = np.round(probs.max(axis=1).astype(np.float64), 6)
    threshold = float(np.sort(top)[len(top) // 2])  # equal to one: >= counts as confident
    model = with_metadata(onnx_models[0], tmp_path / "m.onnx", confidence_threshold=repr(threshold))
    result = run_cli("predict", *map(str, files), "--model", str(model))
    assert result.returncode == 0, result.stderr
    flags = [line.split("\t")[3] for line in result.stdout.splitlines()]
    assert flags == ["confident" if t >= threshold else "unsure" for t in top]
    assert set(flags) == {"confident", "unsure"}


def test_model_option_and_bad_files(tmp_path: Path, onnx_models: tuple[Path, Path]) -> None:
    good = write_digits(tmp_path)[0]
    ok = run_cli("predict", str(good), "--model", str(onnx_models[1]))
    assert ok.returncode == 0 and ok.stdout.startswith(f"{good}\t"), ok.stderr

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    missing = tmp_path / "nope.png"
    result = run_cli("predict", str(bad), str(good), str(missing), "--model", str(onnx_models[0]))
    assert result.returncode != 0
    # Every file is tried: the good one is answered, each bad one gets one line.
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == [str(good)]
    errors = result.stderr.strip().splitlines()
    assert any(line.startswith(f"{bad}: not an image") for line in errors), result.stderr
    assert any(line.startswith(f"{missing}: cannot read") for line in errors), result.stderr
    assert "ImageDecodeError: 2 of 3 files could not be classified" in errors[-1]


def test_reads_are_bounded(tmp_path: Path, onnx_models: tuple[Path, Path]) -> None:
    """``predict /dev/zero`` stops after serve.max_body_bytes + 1 bytes."""
    result = run_cli(
        "predict", "/dev/zero", "--model", str(onnx_models[0]), "--set", "serve.max_body_bytes=1000"
    )
    assert result.returncode != 0
    assert "/dev/zero: larger than 1000 bytes (serve.max_body_bytes)" in result.stderr


def test_hostile_files_are_refused(tmp_path: Path, onnx_models: tuple[Path, Path]) -> None:
    jpeg, png = tmp_path / "lying.jpg", tmp_path / "huge.png"
    jpeg.write_bytes(lying_jpeg())
    png.write_bytes(huge_png())
    result = run_cli("predict", str(jpeg), str(png), "--model", str(onnx_models[0]))
    assert result.returncode != 0 and result.stdout == ""
    assert f"{jpeg}: image is 6000x6000 = 36000000 pixels; the limit is 16000000" in result.stderr
    assert f"{png}: image is 6300x6300 = 39690000 pixels" in result.stderr


def test_missing_model_is_a_named_error(tmp_path: Path) -> None:
    good = write_digits(tmp_path)[0]
    result = run_cli("predict", str(good), "--set", f"registry.production_dir={tmp_path / 'x'}")
    assert result.returncode != 0
    assert "ModelFileError" in result.stderr and "not found" in result.stderr


def test_serving_needs_no_training_stack(tmp_path: Path, onnx_models: tuple[Path, Path]) -> None:
    """What ``pip install '.[serve]'`` leaves out must not be imported by serve/predict."""
    good = write_digits(tmp_path)[0]
    code = (
        "import sys\n"
        "for name in ('torch', 'torchvision', 'prefect', 'dvc', 'great_expectations', 'pandas'):\n"
        "    sys.modules[name] = None  # any import of these now raises ImportError\n"
        "import pipeline.serving.server\n"
        "from pipeline.cli import main\n"
        f"sys.exit(main(['predict', {str(good)!r}, '--model', {str(onnx_models[0])!r}]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{good}\t")
