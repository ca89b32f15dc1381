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
        name, digit, prob = line.split("\t")
        assert name == str(path)
        assert int(digit) == int(p.argmax())
        assert abs(float(prob) - float(p.max())) < 1e-4


def test_model_option_and_bad_files(tmp_path: Path, onnx_models: tuple[Path, Path]) -> None:
    good = write_digits(tmp_path)[0]
    ok = run_cli("predict", str(good), "--model", str(onnx_models[1]))
    assert ok.returncode == 0 and ok.stdout.startswith(f"{good}\t"), ok.stderr

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    result = run_cli("predict", str(good), str(bad), "--model", str(onnx_models[0]))
    assert result.returncode != 0
    assert result.stdout == ""  # nothing half-printed
    assert "ImageDecodeError" in result.stderr and "notes.png" in result.stderr

    missing = run_cli("predict", str(tmp_path / "nope.png"), "--model", str(onnx_models[0]))
    assert missing.returncode != 0
    assert "ImageDecodeError" in missing.stderr and "nope.png: cannot read" in missing.stderr


def test_missing_model_is_a_named_error(tmp_path: Path) -> None:
    good = write_digits(tmp_path)[0]
    result = run_cli("predict", str(good), "--set", f"registry.production_dir={tmp_path / 'x'}")
    assert result.returncode != 0
    assert "ModelFileError" in result.stderr and "not found" in result.stderr
