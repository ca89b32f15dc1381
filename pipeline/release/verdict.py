"""The gate's verdict on a file: did the gate pass, is this the file it passed, and is a
model directory's ONNX file the one its model card describes.

One reading for promote (before installing a candidate), the registry (before recording
production) and the service's registry follower (before serving a fetched version).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.core.atomic import sha256_file
from pipeline.core.contract import MODEL_CARD_JSON, MODEL_FILE
from pipeline.core.errors import ArtifactError, ModelFileError, PromotionError
from pipeline.core.json_io import read_json


def passed_report(report_path: Path) -> dict[str, Any]:
    """The gate report at ``report_path``, which must say ``passed: true``.

    :class:`ArtifactError` when it is missing or not a JSON object,
    :class:`PromotionError` (with the gate's reasons) when the gate rejected the model.
    """
    report = read_json(report_path, "gate report", "run the gate stage first")
    if report.get("passed") is not True:
        reasons = "; ".join(report.get("reasons", [])) or "no reasons recorded"
        raise PromotionError(f"{report_path}: the gate did not pass ({reasons})")
    return report


def passed_this(report: Mapping[str, Any], sha256: str) -> bool:
    """Whether ``report`` (a passed gate's) is about the file whose sha256 is ``sha256``."""
    return report.get("candidate_sha256") == sha256


def checked_card(directory: Path) -> dict[str, Any]:
    """``directory/model_card.json``, checked to describe ``directory/model.onnx``.

    Its ``sha256`` is then the model file's. :class:`ModelFileError` when the card is
    unreadable, the model file is missing, or the file is not the one the card describes.
    """
    model = Path(directory) / MODEL_FILE
    try:
        card = read_json(Path(directory) / MODEL_CARD_JSON, "model card")
    except ArtifactError as err:
        raise ModelFileError(f"model card unreadable: {err}") from err
    if not model.is_file():
        raise ModelFileError(f"{MODEL_FILE} missing from {directory}")
    sha = sha256_file(model)
    if card.get("sha256") != sha:
        raise ModelFileError(
            f"{MODEL_FILE} sha256 {sha[:12]} differs from its model "
            f"card's {str(card.get('sha256'))[:12]}"
        )
    return card
