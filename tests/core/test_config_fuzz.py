"""Config fuzzing: every params document is either read exactly as DVC reads it, or refused.

Documents are the real params.yaml with random edits (a value replaced by a tricky YAML
token, a line duplicated or dropped, a section repeated) plus arbitrary small documents.
For each: ``load_config`` raises :class:`ConfigError` (never another exception), or the
configuration it returns has, for every key DVC's own parser reads from the text, the
same value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.core.config import load_config, to_dict
from pipeline.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
BASE = (ROOT / "params.yaml").read_text()
LINES = BASE.splitlines()

TOKENS = [
    ".inf", "-.inf", ".nan", ".NaN", "1e3", "1.0e-3", "yes", "no", "on", "off", "null", "~",
    "010", "0o10", "0x1F", "1_000", "'5'", '"x"', "[]", "{}", "[1, 2]", "true", "False",
    "2026-11-25", "!!str 3", "!!float 1", "&a 1", "*a", "0", "-1", "1.5", "''", "|", ">",
]  # fmt: skip


def _edit(lines: list[str], op: str, i: int, token: str) -> str:
    out = list(lines)
    i %= len(out)
    line = out[i]
    if op == "replace" and ":" in line and not line.lstrip().startswith("#"):
        key = line.split(":", 1)[0]
        out[i] = f"{key}: {token}"
    elif op == "duplicate":
        out.insert(i, line)
    elif op == "drop":
        del out[i]
    elif op == "section":
        out.append(line.split(":", 1)[0].strip() + ":")
        out.append(f"  min_accuracy: {token}")
    return "\n".join(out) + "\n"


def _normalise(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    return value


def dvc_reads(text: str) -> Any:
    from dvc.utils.serialize import parse_yaml

    return parse_yaml(text, "params.yaml")


def check(tmp_path: Path, text: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    try:
        cfg = load_config(path)
    except ConfigError:
        return
    loaded, read = _normalise(to_dict(cfg)), _normalise(dvc_reads(text))
    # Every parameter DVC reads has the same value in the config (keys DVC does not
    # find keep their defaults, and DVC fails any stage that declares them).
    flat = _leaves(loaded)
    for key, value in _leaves(read).items():
        assert key in flat, key
        # Equal, and a boolean stays a boolean (True == 1 in Python).
        assert flat[key] == value and isinstance(flat[key], bool) == isinstance(value, bool), key


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


edits = st.lists(
    st.tuples(
        st.sampled_from(["replace", "duplicate", "drop", "section"]),
        st.integers(min_value=0, max_value=10_000),
        st.sampled_from(TOKENS),
    ),
    min_size=1,
    max_size=3,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(edits=edits)
def test_edited_params_are_read_like_dvc_or_refused(tmp_path: Path, edits: list) -> None:
    lines = LINES
    text = BASE
    for op, i, token in edits:
        text = _edit(lines, op, i, token)
        lines = text.splitlines()
    check(tmp_path, text)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.text(alphabet=st.sampled_from(list("ab:- \n[]{}#&*!|>'\".0123456789~")), max_size=60)
)
def test_arbitrary_documents_never_raise_anything_but_config_error(
    tmp_path: Path, text: str
) -> None:
    check(tmp_path, text)
