"""Quality report and its gate checks, on tiny synthetic models and data."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.core.config import GateConfig, QualityConfig
from pipeline.core.errors import ConfigError
from pipeline.quality.report import assess, quality_checks
from pipeline.quality.robustness import FAMILY_NAMES, torch_predictor
from tests.helpers.synthetic_digits import make_images

SMALL = QualityConfig(n_images=None, n_probes=20, target_precision=0.99)


class InkCounter(nn.Module):
    """A raw-pixel 'classifier' that counts lit pixels: perfect on its own labels for clean
    images, and confused by anything that lights up background pixels (noise)."""

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lit = (image[:, 0] > 30).flatten(1).sum(1).float()
        cls = torch.clamp((lit - 60) / 3, 0, 9).floor().long()
        logits = nn.functional.one_hot(cls, 10).float() * 6.0
        return logits, torch.softmax(logits, 1)


def data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x = make_images(n, seed)
    y = InkCounter()(torch.from_numpy(x).float().unsqueeze(1))[0].argmax(1).numpy()
    return x, y


def test_assess_reports_every_part_and_only_reads_its_inputs() -> None:
    val_x, val_y = data(150, 1)
    test_x, test_y = data(150, 2)
    before = test_x.copy()
    report = assess(torch_predictor(InkCounter()), val_x, val_y, test_x, test_y, SMALL)
    assert np.array_equal(test_x, before)
    assert report.suite.clean_accuracy == 1.0
    assert set(report.suite.accuracy) == set(FAMILY_NAMES)
    # Always right on validation: the threshold accepts everything.
    assert report.threshold.achievable and report.test.coverage == 1.0
    assert report.calibration.val_nll_after <= report.calibration.val_nll_before
    m = report.metrics()
    assert set(m) == {"robustness", "robustness_min_at_severity", "calibration", "abstention"}
    compact = json.loads(report.compact_json())
    assert compact["confidence_threshold"] == round(report.threshold.threshold, 6)
    assert len(report.compact_json()) < 1500
    json.dumps(report.to_dict())  # JSON-able


def test_a_model_that_passes_clean_accuracy_fails_the_noise_floor_by_name() -> None:
    val_x, val_y = data(150, 3)
    test_x, test_y = data(150, 4)
    report = assess(torch_predictor(InkCounter()), val_x, val_y, test_x, test_y, SMALL)
    gate = GateConfig(
        min_robust_accuracy=None, robust_floors={"noise": 0.99, "brightness": 0.99}, max_ece=0.005
    )
    checks = {c.name: c for c in quality_checks(report, gate)}
    assert report.suite.clean_accuracy >= 0.99
    assert not checks["robust_noise"].passed
    assert "noise" in checks["robust_noise"].message and "<" in checks["robust_noise"].message
    assert checks["robust_noise"].threshold == 0.99
    assert checks["robust_brightness"].passed  # dimming keeps the ink count above 30
    assert set(checks) == {"robust_noise", "robust_brightness", "max_ece"}


def test_floors_default_to_every_family_and_can_be_switched_off() -> None:
    val_x, val_y = data(60, 5)
    test_x, test_y = data(60, 6)
    report = assess(torch_predictor(InkCounter()), val_x, val_y, test_x, test_y, SMALL)
    all_checks = quality_checks(report, GateConfig(min_robust_accuracy=0.5, max_ece=None))
    assert [c.name for c in all_checks] == [f"robust_{f}" for f in FAMILY_NAMES]
    assert quality_checks(report, GateConfig(min_robust_accuracy=None, max_ece=None)) == []
    ece = quality_checks(report, GateConfig(min_robust_accuracy=None, max_ece=0.0))
    assert len(ece) == 1 and ece[0].name == "max_ece"
    assert ece[0].passed == (report.calibration.ece_after <= 0.0)


def test_unknown_family_in_floors_is_a_config_error() -> None:
    val_x, val_y = data(30, 7)
    report = assess(
        torch_predictor(InkCounter()), val_x, val_y, val_x, val_y, replace(SMALL, n_images=10)
    )
    with pytest.raises(ConfigError, match="fog"):
        quality_checks(report, GateConfig(robust_floors={"fog": 0.9}))


def test_outputs_for_dvclive_and_the_model_card(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from dvclive import Live

    from pipeline.quality.report import model_card_section, robustness_png

    val_x, val_y = data(60, 8)
    report = assess(
        torch_predictor(InkCounter()), val_x, val_y, val_x, val_y, replace(SMALL, n_images=30)
    )
    live = Live(dir=str(tmp_path / "eval"), dvcyaml=False, save_dvc_exp=False)
    from pipeline.quality.report import log_to_live

    log_to_live(live, report, "synthetic")
    live.make_summary()
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["robustness"]["noise"]["s2"] == report.metrics()["robustness"]["noise"]["s2"]
    assert "ece_after" in metrics["calibration"] and "threshold" in metrics["abstention"]
    rows = json.loads((tmp_path / "eval" / "plots" / "custom" / "robustness.json").read_text())
    assert len(rows) == 4 * len(FAMILY_NAMES)
    assert (tmp_path / "eval" / "plots" / "images" / "robustness.png").is_file()
    assert (tmp_path / "eval" / "plots" / "images" / "reliability.png").is_file()
    card = model_card_section(report)
    assert all(f"| {f} (" in card for f in FAMILY_NAMES) and "temperature" in card
    assert robustness_png(report.suite, "t")[:4] == b"\x89PNG"
