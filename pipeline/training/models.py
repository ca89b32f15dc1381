"""Model zoo: the notebook's two baselines and the default CNN.

Every model maps ``(N, 1, 28, 28) float32`` *normalised* images (``(x/255 - mean)/std``)
to ``(N, 10) float32`` logits. Normalisation is not part of these modules; the ONNX
export wraps them with it so consumers feed raw pixels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.core.errors import ConfigError

MODEL_NAMES = ("mlp", "seed_cnn", "cnn")


def _conv_relu_bn(c_in: int, c_out: int) -> list[nn.Module]:
    # The notebook's order: activation first, then BatchNorm.
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(c_out)]


def mlp(width: int = 32) -> nn.Module:
    """The notebook's plain MLP: 784-256-128-10, about 235k parameters (``width`` unused)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 256),
        nn.ReLU(inplace=True),
        nn.Linear(256, 128),
        nn.ReLU(inplace=True),
        nn.Linear(128, 10),
    )


def seed_cnn(width: int = 32) -> nn.Module:
    """The notebook's small CNN: 3x3 convs, padding 1, BN after ReLU, no dropout (~220k)."""
    return nn.Sequential(
        *_conv_relu_bn(1, 32),
        nn.MaxPool2d(2),
        *_conv_relu_bn(32, 64),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 64),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(64),
        nn.Linear(64, 10),
    )


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    # No conv bias: the BatchNorm that follows has its own shift.
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def cnn(width: int = 24) -> nn.Module:
    """Default CNN, sized for a 2-core CPU: w, 2w, 2w, 4w channels, a linear head.

    Only one conv runs at full 28x28 resolution (the expensive one on a CPU); the
    capacity sits at 14x14 and 7x7. ``width=24``: 81,874 parameters, 8.3 M multiply-adds
    per image forward (``width=12``: 22,798 and 2.1 M); measured choices are in
    docs/bench/train.md.
    """
    w = width
    return nn.Sequential(
        *_conv_bn_relu(1, w),
        nn.MaxPool2d(2),  # 14x14
        *_conv_bn_relu(w, 2 * w),
        *_conv_bn_relu(2 * w, 2 * w),
        nn.MaxPool2d(2),  # 7x7
        *_conv_bn_relu(2 * w, 4 * w),
        nn.MaxPool2d(2),  # 3x3
        nn.Flatten(),
        nn.Linear(4 * w * 3 * 3, 10),
    )


_BUILDERS: dict[str, Callable[[int], nn.Module]] = {"mlp": mlp, "seed_cnn": seed_cnn, "cnn": cnn}


def build_model(name: str, width: int = 24) -> nn.Module:
    """Instantiate a model by name. Raises :class:`ConfigError` for an unknown name."""
    if name not in _BUILDERS:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    return _BUILDERS[name](width)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _smoke() -> None:  # pragma: no cover - manual check
    for name in MODEL_NAMES:
        m = build_model(name).eval()
        print(name, count_parameters(m), tuple(m(torch.zeros(2, 1, 28, 28)).shape))


if __name__ == "__main__":  # pragma: no cover
    _smoke()
