"""Models with a known answer, for tests that need a predictable accuracy."""

from __future__ import annotations

import torch

from pipeline.training.models import build_model


def constant_module(cls: int) -> torch.nn.Module:
    """An MLP that always answers ``cls``: zero weights, one-hot final bias.

    Its accuracy on any labels is the share of ``cls`` among them.
    """
    module = build_model("mlp")
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
        head = list(module.children())[-1]
        assert isinstance(head, torch.nn.Linear)
        head.bias[cls] = 1.0
    return module.eval()
