"""``python -m pipeline``: every error a user can cause is one line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.core.errors import DownloadError
from pipeline.training.model_io import save_model_file

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(["--params", str(ROOT / "params.yaml"), *args])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, lines


def test_unknown_model_in_a_model_file_is_a_model_file_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = save_model_file(tmp_path / "model.pt", torch.nn.Linear(1, 1), "resnet", 8, 0.1, 0.3)
    sets = {
        "train.model_path": path,
        # export first removes its stale outputs: keep every one of them under tmp_path
        "export.onnx_path": tmp_path / "m.onnx",
        "export.int8_path": tmp_path / "m.int8.onnx",
        "export.parity_path": tmp_path / "parity.json",
    }
    code, lines = run_cli(["export", *(f"--set={k}={v}" for k, v in sets.items())], capsys)
    assert code == 1
    assert lines == [
        f"error: ModelFileError: {path}: unknown model 'resnet'; known: mlp, seed_cnn, cnn"
    ]


def test_missing_upstream_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stats = tmp_path / "data_stats.json"
    code, lines = run_cli(["train", "--set", f"validate.stats_path={stats}"], capsys)
    assert code == 1
    assert lines == [
        f"error: ArtifactError: {stats}: dataset statistics missing; run the validate stage first"
    ]


def test_multi_line_messages_print_on_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(*args: object) -> None:
        raise DownloadError("first line\n  second line\n")

    monkeypatch.setattr("pipeline.data.ingest.ingest", fail)
    code, lines = run_cli(["ingest"], capsys)
    assert code == 1 and lines == ["error: DownloadError: first line | second line"]


def test_bad_parameter_exits_2_without_traceback(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "pipeline", "--params", str(ROOT / "params.yaml"), "train"]
    done = subprocess.run(
        [*cmd, "--set", "train.model=resnet"], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ConfigError: ")
