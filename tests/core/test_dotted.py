"""pipeline/core/dotted.py: the one walk over dotted keys."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pipeline.core import dotted

TREE: dict[str, Any] = {"train": {"lr": 0.1, "augment": {"enabled": True}, "shape": (1, 2)}}


@pytest.mark.parametrize(
    ("key", "want"),
    [
        ("train.lr", 0.1),
        ("train.augment.enabled", True),
        ("train.augment", {"enabled": True}),
        ("train.shape", (1, 2)),  # tuples come back as they are
    ],
)
def test_get_walks_nested_mappings(key: str, want: Any) -> None:
    assert dotted.get(TREE, key) == want


@pytest.mark.parametrize("key", ["train.nope", "nope", "train.lr.deeper", "train.augment.x.y"])
def test_get_missing_levels(key: str) -> None:
    assert dotted.get(TREE, key, None) is None
    with pytest.raises(KeyError, match=key):
        dotted.get(TREE, key)


def test_put_creates_sections_and_refuses_to_descend_into_a_value() -> None:
    tree: dict[str, Any] = {"train": {"lr": 0.1}}
    dotted.put(tree, "train.augment.enabled", False)
    dotted.put(tree, "train.lr", 0.2)
    assert tree == {"train": {"lr": 0.2, "augment": {"enabled": False}}}
    with pytest.raises(ValueError, match="train.lr.x: 'lr' is not a section"):
        dotted.put(tree, "train.lr.x", 1)


def test_nest_and_flatten_are_inverse() -> None:
    flat = {"train.lr": np.float64(0.05), "train.augment.p": 0.3, "profile": "quick"}
    tree = dotted.nest(flat)
    assert tree == {"profile": "quick", "train": {"augment": {"p": 0.3}, "lr": 0.05}}
    assert isinstance(tree["train"]["lr"], np.float64)  # values are not converted
    assert dotted.flatten(tree) == flat
