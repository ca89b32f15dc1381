"""Dotted keys over nested mappings: ``"train.lr"`` <-> ``tree["train"]["lr"]``.

The one walk for params trees, overrides and report data. A plain helper rather than
OmegaConf: OmegaConf turns tuples into ``ListConfig`` and refuses NumPy scalars, and these
trees carry both (schema tuples, Optuna's values) exactly as the callers must see them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_MISSING: Any = object()


def get(tree: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    """``tree["a"]["b"]`` for ``"a.b"``; ``default`` where a level is missing.

    Without a ``default`` a missing level is a :class:`KeyError` naming ``key``.
    """
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is _MISSING:
                raise KeyError(key)
            return default
        node = node[part]
    return node


def put(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree["a"]["b"] = value`` for ``"a.b"``, creating the missing sections.

    A level that holds a value rather than a section is a :class:`ValueError`.
    """
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"{key}: '{part}' is not a section")
        node = child
    node[leaf] = value


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train.lr": 0.1}`` -> ``{"train": {"lr": 0.1}}`` (keys applied in sorted order)."""
    tree: dict[str, Any] = {}
    for key, value in sorted(flat.items()):
        put(tree, key, value)
    return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}`` (leaves only)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out
