"""The project's modules import each other without a cycle.

The graph is read from the source with :mod:`ast` and includes imports inside
functions: a lazy import hides a cycle from Python, not from the reader.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "flows")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (anywhere in its body)."""
    modules = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_graph_sees_lazy_imports() -> None:
    graph = import_graph()
    assert "pipeline.training.train" in graph["pipeline.cli"]  # imported inside a function
    assert "pipeline.core.contract" in graph["pipeline.handoff.export"]


def test_no_import_cycles() -> None:
    graph = import_graph()
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None


def test_contract_needs_no_ml_stack() -> None:
    tree = ast.parse((ROOT / "pipeline" / "core" / "contract.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"torch", "onnx", "onnxruntime", "numpy"}


# The folders of pipeline/ and what each may import besides itself: one way, lowest first
# (the README's layout section). pipeline/cli.py and flows/ sit on top of all of them.
LAYERS: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "data": frozenset({"core"}),
    "training": frozenset({"core", "data"}),
    "quality": frozenset({"core", "data", "training"}),
    "handoff": frozenset({"core", "data", "training", "quality"}),
    "release": frozenset({"core", "data", "training", "quality", "handoff"}),
    "serving": frozenset({"core", "data", "training", "quality", "handoff", "release"}),
    "sweep": frozenset({"core", "data", "training"}),
}


def folder(module: str) -> str | None:
    """``pipeline.<folder>.x`` -> ``<folder>``; None for the top (cli, __main__, flows)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 2 else None


def test_every_folder_has_a_layer() -> None:
    found = {p.name for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").is_file()}
    assert found == set(LAYERS)
    flat = {p.name for p in (ROOT / "pipeline").glob("*.py")}
    assert flat == {"__init__.py", "__main__.py", "cli.py"}, "new code goes in a folder"


def test_folders_import_one_way() -> None:
    wrong = sorted(
        f"{name} -> {dep}"
        for name, deps in import_graph().items()
        if (src := folder(name)) is not None
        for dep in deps
        if dep.startswith("flows")
        or (dep in ("pipeline.cli", "pipeline.__main__"))
        or ((dst := folder(dep)) is not None and dst != src and dst not in LAYERS[src])
    )
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)
