"""Calibration: ECE/NLL definitions, temperature fit on validation, the calibrated wrapper."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.quality.calibration import (
    N_BINS,
    calibrate,
    ece,
    fit_temperature,
    nll,
    reliability,
    reliability_png,
    softmax,
    with_temperature,
)


def overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a 90%-accurate classifier that is far too sure (scaled by 4)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, size=n)
    z = rng.normal(size=(n, 10))
    right = rng.random(n) < 0.9
    target = np.where(right, y, (y + 1 + rng.integers(0, 9, size=n)) % 10)
    z[np.arange(n), target] += 3.0
    return (4.0 * z).astype(np.float32), y


def test_ece_of_a_perfectly_calibrated_set_is_zero_and_of_a_wrong_one_is_large() -> None:
    probs = np.full((10, 2), 0.5)
    labels = np.array([0, 1] * 5)  # argmax picks 0: right half the time, confidence 0.5
    assert ece(probs, labels) == pytest.approx(0.0, abs=1e-12)
    sure = np.tile([1.0, 0.0], (10, 1))
    assert ece(sure, np.ones(10, dtype=int)) == pytest.approx(1.0)


def test_reliability_bins_count_every_input_once() -> None:
    z, y = overconfident(1000, 0)
    data = reliability(softmax(z), y)
    assert sum(data.count) == 1000 and len(data.count) == N_BINS
    assert data.ece == pytest.approx(ece(softmax(z), y))
    assert all(r["count"] > 0 for r in data.rows())


def test_nll_matches_torch() -> None:
    z, y = overconfident(200, 1)
    expected = float(
        torch.nn.functional.cross_entropy(torch.from_numpy(z).double(), torch.from_numpy(y))
    )
    assert nll(z, y) == pytest.approx(expected, rel=1e-9)


def test_temperature_keeps_argmax_and_lowers_validation_nll() -> None:
    val_z, val_y = overconfident(2000, 2)
    t = fit_temperature(val_z, val_y)
    assert t > 1.5  # the logits were inflated 4x
    assert np.array_equal(softmax(val_z, t).argmax(1), val_z.argmax(1))
    assert nll(val_z, val_y, t) < nll(val_z, val_y)
    # The optimum: nudging T either way does not help.
    assert nll(val_z, val_y, t) <= min(nll(val_z, val_y, t * 1.05), nll(val_z, val_y, t / 1.05))


def test_calibrate_fits_on_validation_and_reports_on_the_other_set() -> None:
    val_z, val_y = overconfident(2000, 3)
    test_z, test_y = overconfident(2000, 4)
    report = calibrate(val_z, val_y, test_z, test_y)
    assert report.temperature == pytest.approx(fit_temperature(val_z, val_y))
    assert report.ece_after < report.ece_before
    assert report.val_nll_after < report.val_nll_before
    assert report.n_fit == 2000 and report.n_eval == 2000


def test_fit_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(np.array([[np.nan, 0.0]]), np.array([0]))
    with pytest.raises(ValueError, match="logits must be"):
        fit_temperature(np.zeros((0, 10)), np.zeros(0, dtype=int))


class _RawPixel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.fc(image.flatten(1) / 255.0)
        return z, torch.softmax(z, 1)


def test_wrapper_scales_probabilities_and_leaves_logits() -> None:
    torch.manual_seed(0)
    inner = _RawPixel().eval()
    x = torch.rand(5, 1, 28, 28) * 255
    logits, probs = with_temperature(inner, 2.5)(x)
    ref_logits, _ = inner(x)
    assert torch.equal(logits, ref_logits)
    assert torch.allclose(probs, torch.softmax(ref_logits / 2.5, 1))
    assert torch.equal(probs.argmax(1), ref_logits.argmax(1))
    with pytest.raises(ValueError, match="temperature"):
        with_temperature(inner, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        with_temperature(inner, math.inf)


def test_reliability_png_is_a_png() -> None:
    z, y = overconfident(500, 5)
    png = reliability_png(reliability(softmax(z), y), reliability(softmax(z, 4.0), y), "t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_temperature_lives_inside_the_exported_onnx_graph(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """What the export does with ``with_temperature``: logits unchanged, probabilities scaled."""
    import onnxruntime as ort

    from pipeline.core.contract import INPUT_NAME, OUTPUT_NAMES
    from pipeline.handoff.export import wrap
    from pipeline.training.model_io import LoadedModel
    from pipeline.training.models import build_model

    torch.manual_seed(0)
    model = LoadedModel(build_model("cnn", 4).eval(), "cnn", 4, 0.13, 0.31)
    module = with_temperature(wrap(model), 1.7)
    path = tmp_path / "model.onnx"
    program = torch.onnx.export(
        module,
        (torch.full((2, 1, 28, 28), 127.0),),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=4096)}},
    )
    assert program is not None
    program.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = (torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 255).numpy()
    logits, probs = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
    ref_logits, _ = wrap(model)(torch.from_numpy(x))
    assert np.allclose(logits, ref_logits.detach().numpy(), atol=1e-4)
    assert np.allclose(probs, softmax(logits, 1.7), atol=1e-5)
    assert not np.allclose(probs, softmax(logits), atol=1e-3)
