"""pipeline/release/verdict.py: the gate's verdict and the model card check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.atomic import sha256_file
from pipeline.core.contract import MODEL_CARD_JSON, MODEL_FILE
from pipeline.core.errors import ArtifactError, ModelFileError, PromotionError
from pipeline.release.verdict import checked_card, passed_report, passed_this


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_a_passed_report_is_returned(tmp_path: Path) -> None:
    report = {"passed": True, "candidate_sha256": "ab" * 32}
    assert passed_report(_write(tmp_path / "gate.json", report)) == report
    assert passed_this(report, "ab" * 32) and not passed_this(report, "cd" * 32)


@pytest.mark.parametrize(
    ("report", "match"),
    [
        ({"passed": False, "reasons": ["accuracy 0.9 < 0.99", "ece"]}, r"accuracy 0.9 < 0.99; ece"),
        ({"passed": False}, "no reasons recorded"),
        ({"passed": "yes"}, "did not pass"),  # only a JSON true passes
    ],
)
def test_a_rejected_report_names_the_reasons(tmp_path: Path, report: dict, match: str) -> None:
    with pytest.raises(PromotionError, match=match):
        passed_report(_write(tmp_path / "gate.json", report))


def test_a_missing_report_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="gate report missing; run the gate stage first"):
        passed_report(tmp_path / "gate.json")


def _model_dir(tmp_path: Path, card_sha: str | None = None) -> Path:
    (tmp_path / MODEL_FILE).write_bytes(b"onnx bytes")
    sha = card_sha or sha256_file(tmp_path / MODEL_FILE)
    _write(tmp_path / MODEL_CARD_JSON, {"sha256": sha, "version": "v1"})
    return tmp_path


def test_checked_card_is_the_card_of_this_file(tmp_path: Path) -> None:
    card = checked_card(_model_dir(tmp_path))
    assert card["sha256"] == sha256_file(tmp_path / MODEL_FILE) and card["version"] == "v1"


def test_checked_card_refuses_another_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"sha256 \w{12} differs from its model card's 000000"):
        checked_card(_model_dir(tmp_path, card_sha="0" * 64))


def test_checked_card_refuses_a_missing_card_or_model(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="model card unreadable"):
        checked_card(tmp_path)
    _write(tmp_path / MODEL_CARD_JSON, {"sha256": "0" * 64})
    with pytest.raises(ModelFileError, match=f"{MODEL_FILE} missing"):
        checked_card(tmp_path)
