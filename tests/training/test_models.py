"""The model zoo: shapes, sizes, and the notebook baselines' layer order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.core.errors import ConfigError
from pipeline.training.models import MODEL_NAMES, build_model, count_parameters


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_logits_shape_and_dtype(name: str) -> None:
    model = build_model(name, 8).eval()
    out = model(torch.zeros(3, 1, 28, 28))
    assert out.shape == (3, 10) and out.dtype == torch.float32


def test_parameter_counts() -> None:
    assert 200_000 <= count_parameters(build_model("mlp")) <= 240_000
    assert 190_000 <= count_parameters(build_model("seed_cnn")) <= 230_000
    # The default CNN is small on purpose (2-core CPU budget) and grows with width.
    assert 60_000 <= count_parameters(build_model("cnn", 24)) <= 120_000
    assert count_parameters(build_model("cnn", 32)) > count_parameters(build_model("cnn", 24))


def test_seed_cnn_is_the_notebook_model() -> None:
    layers = list(build_model("seed_cnn").modules())[1:]
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert not any(isinstance(m, nn.Dropout) for m in layers)
    kinds = [type(m).__name__ for m in layers]
    # BatchNorm comes right AFTER the activation, as in the notebook.
    for i, kind in enumerate(kinds):
        if kind.startswith("BatchNorm"):
            assert kinds[i - 1] == "ReLU"


def test_unknown_model_name() -> None:
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("resnet")
