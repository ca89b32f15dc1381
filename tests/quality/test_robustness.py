"""The robustness suite: deterministic per seed, labels kept, inputs untouched, any predictor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.quality.robustness import (
    CHUNK,
    DEFAULT_SEVERITY,
    FAMILIES,
    FAMILY_NAMES,
    onnx_predictor,
    perturb,
    run_suite,
    torch_predictor,
)
from tests.helpers.synthetic_digits import make_images


def images(n: int = 64) -> torch.Tensor:
    return torch.from_numpy(make_images(n, seed=3))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_each_family_is_deterministic_for_a_seed_and_changes_pixels(family: str) -> None:
    x = images()
    before = x.clone()
    a = perturb(x, family, 2, seed=0)
    b = perturb(x, family, 2, seed=0)
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b)
    assert torch.equal(x, before), "the input must not be modified"
    assert not torch.equal(a, x)


@pytest.mark.parametrize("family", ["translate", "noise", "occlusion", "elastic"])
def test_random_families_differ_between_seeds(family: str) -> None:
    x = images()
    assert not torch.equal(perturb(x, family, 2, seed=0), perturb(x, family, 2, seed=1))


def test_severity_grows_the_change() -> None:
    x = images()
    for fam in FAMILIES:
        diffs = [
            float((perturb(x, fam.name, s, 0).float() - x.float()).abs().mean()) for s in (1, 2, 3)
        ]
        assert diffs[0] < diffs[2], f"{fam.name}: severity 3 changes less than severity 1"


def test_chunks_are_independent_of_how_many_images_follow() -> None:
    x = torch.from_numpy(make_images(CHUNK + 10, seed=5))
    whole = perturb(x, "noise", 3, seed=7)
    first = perturb(x[:CHUNK], "noise", 3, seed=7)
    assert torch.equal(whole[:CHUNK], first)


def test_unknown_family_and_severity_are_errors() -> None:
    with pytest.raises(KeyError, match="unknown perturbation family"):
        perturb(images(), "fog", 2, 0)
    with pytest.raises(ValueError, match="severity"):
        perturb(images(), "noise", 4, 0)


class _Oracle(nn.Module):
    """Raw-pixel 'model': class = row of the brightest stroke // 3 (the synthetic labels)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        rows = image[:, 0].sum(dim=2)
        centre = (rows * torch.arange(28.0)).sum(1) / rows.sum(1).clamp_min(1e-6)
        cls = (centre / 3).floor().clamp(0, 9).long()
        return nn.functional.one_hot(cls, 10).float() * 5


def test_suite_keeps_labels_and_reports_every_family_and_severity() -> None:
    x = make_images(200, seed=11)
    module = _Oracle()
    labels = module(torch.from_numpy(x).float().unsqueeze(1)).argmax(1).numpy()
    before = x.copy()
    result = run_suite(torch_predictor(module), x, labels, seed=0)
    assert np.array_equal(x, before)
    assert result.clean_accuracy == 1.0  # the labels are the oracle's own answers
    assert set(result.accuracy) == set(FAMILY_NAMES)
    assert all(len(v) == 3 and all(0 <= a <= 1 for a in v) for v in result.accuracy.values())
    # Photometric changes leave the stroke's row: the oracle keeps most answers.
    assert result.at("brightness") == 1.0
    # Shifting by 3-4 px moves the centroid across a class boundary for some images.
    assert result.at("translate", 3) < 1.0
    name, acc = result.worst(DEFAULT_SEVERITY)
    assert acc == min(v[DEFAULT_SEVERITY - 1] for v in result.accuracy.values())
    payload = json.loads(result.compact_json())
    assert len(result.compact_json()) < 1200
    assert payload["accuracy"][name][DEFAULT_SEVERITY - 1] == round(acc, 4)
    assert len(result.rows()) == 3 * len(FAMILY_NAMES)


def test_onnx_predictor_gives_the_same_suite_as_torch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()

    class Raw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = module

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            z = self.m(image / 255.0)
            return z, torch.softmax(z, 1)

    path = tmp_path / "m.onnx"
    torch.onnx.export(
        Raw(),
        (torch.zeros(2, 1, 28, 28),),
        str(path),
        input_names=["image"],
        output_names=["logits", "probabilities"],
        dynamic_axes={"image": {0: "n"}},
        dynamo=False,
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = make_images(100, seed=2)
    y = np.arange(100) % 10
    fams = ["noise", "rotate"]
    a = run_suite(torch_predictor(Raw()), x, y, seed=0, families=fams)
    b = run_suite(onnx_predictor(sess), x, y, seed=0, families=fams)
    assert a.accuracy == b.accuracy and a.clean_accuracy == b.clean_accuracy
