"""dvc.yaml tells the truth: each stage declares the modules it imports and the keys it reads.

The truth comes from the code, by static analysis (see ``scripts/stage_deps.py`` for the
method and why it is static): the import closure of ``python -m pipeline <stage>`` and
every config field read by a function that stage can reach. Declared module deps must
equal the closure (a missing one leaves the stage stale after an edit; an extra one
re-runs it for nothing). Every read key must be covered by a declared ``params`` entry
(the key or a section above it) -- except a key that only names the location of a file
the stage already declares as a dep or out: DVC tracks that file's content, which is
what the stage consumes, and the check below that the key's value *is* that declared
path keeps the two from drifting apart.

``python scripts/stage_deps.py`` prints what each stage must declare.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.core.config import Config, load_config
from scripts.stage_deps import PACKAGE, Schema, stage_use

ROOT = Path(__file__).resolve().parents[1]


def _paths(entries: list[Any] | None) -> list[str]:
    """The paths of a deps/outs/metrics/plots list (plain strings or ``{path: opts}``)."""
    out: list[str] = []
    for entry in entries or []:
        out += [entry] if isinstance(entry, str) else list(entry)
    return out


def _declared_params(stage: dict[str, Any]) -> set[str]:
    out: set[str] = set()
    for entry in stage.get("params") or []:
        if isinstance(entry, str):
            out.add(entry)
        else:  # {params file: [keys]}
            for file, keys in entry.items():
                assert file == "params.yaml", f"params from {file}: only params.yaml is read"
                out.update(keys)
    return out


def _value(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _is_declared_path(value: Any, paths: list[str]) -> bool:
    if not isinstance(value, Path):
        return False
    v = value.as_posix().rstrip("/")
    return any(v == p or p.startswith(v + "/") or v.startswith(p + "/") for p in paths)


def problems(root: Path) -> dict[str, list[str]]:
    """Per stage, what dvc.yaml fails to declare (or declares for nothing)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    cfg = load_config(root / "params.yaml")
    schema = Schema.load()
    found: dict[str, list[str]] = {}
    for name, stage in stages.items():
        cmd = str(stage.get("cmd", ""))
        assert cmd == f"python -m {PACKAGE} {name}", f"{name}: unexpected command {cmd!r}"
        use = stage_use(root, name, schema)
        deps = _paths(stage.get("deps"))
        outs = [p for k in ("outs", "metrics", "plots") for p in _paths(stage.get(k))]
        declared_modules = {d for d in deps if d.startswith(f"{PACKAGE}/")}
        params = _declared_params(stage)
        issues = [f"dep missing: {f}" for f in sorted(use.files - declared_modules)]
        issues += [f"dep not imported: {f}" for f in sorted(declared_modules - use.files)]
        for key in sorted(use.keys):
            covered = any(key == p or key.startswith(p + ".") for p in params)
            if key and not covered and _is_declared_path(_value(cfg, key), deps + outs):
                continue
            if not covered:
                issues.append(f"param missing: {key or '<every parameter>'}")
        if issues:
            found[name] = issues
    return found


def test_every_stage_declares_what_its_code_uses() -> None:
    found = problems(ROOT)
    assert not found, "dvc.yaml out of date (python scripts/stage_deps.py):\n" + yaml.safe_dump(
        found
    )


def test_the_analysis_sees_known_uses() -> None:
    """Anchors: reads and imports once found missing from dvc.yaml are found."""
    schema = Schema.load()
    export = stage_use(ROOT, "export", schema)
    assert {"train.seed", "gate.max_regression", "export.quantize"} <= export.keys
    assert {
        "pipeline/handoff/quantize.py",
        "pipeline/handoff/onnx_runtime.py",
        "pipeline/training/model_io.py",
    } <= (export.files)
    # a lazy import inside a function counts; other stages' handlers in cli.py do not
    assert "pipeline/serving/server.py" not in export.files
    train = stage_use(ROOT, "train", schema)
    assert "train" in train.keys  # to_dict(tc): the whole section
    assert "pipeline/training/train.py" not in stage_use(ROOT, "evaluate", schema).files


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """The files the check reads (dvc.yaml, params.yaml, pipeline/), copied."""
    dest = tmp_path / "repo"
    dest.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copyfile(ROOT / name, dest / name)
    shutil.copytree(ROOT / PACKAGE, dest / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    assert problems(dest) == {}
    return dest


def _append_to_function(path: Path, function: str, code: str) -> None:
    """Insert ``code`` as the first statement of ``function`` (after its docstring)."""
    import ast

    text = path.read_text()
    tree = ast.parse(text)
    func = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    first = func.body[1] if ast.get_docstring(func) else func.body[0]
    lines = text.splitlines(keepends=True)
    indent = " " * first.col_offset
    lines.insert(first.lineno - 1, textwrap.indent(code, indent))
    path.write_text("".join(lines))


def test_an_undeclared_lazy_import_fails_the_check(repo_copy: Path) -> None:
    _append_to_function(
        repo_copy / PACKAGE / "quality" / "evaluate.py",
        "run_evaluate_stage",
        "from pipeline.training.augment import prepare_batch  # noqa: F401\n",
    )
    found = problems(repo_copy)
    # augment.py and what it imports in turn: only the stage that imports it goes stale.
    assert set(found) == {"evaluate"}
    assert "dep missing: pipeline/training/augment.py" in found["evaluate"]


def test_an_import_reached_through_another_module_fails_the_check(repo_copy: Path) -> None:
    (repo_copy / PACKAGE / "data" / "helper_new.py").write_text("VALUE = 1\n")
    stats = repo_copy / PACKAGE / "data" / "stats.py"
    stats.write_text("import pipeline.data.helper_new\n" + stats.read_text())
    found = problems(repo_copy)
    # stats.py is imported by validate and train: both go stale.
    assert found == {
        "validate": ["dep missing: pipeline/data/helper_new.py"],
        "train": ["dep missing: pipeline/data/helper_new.py"],
    }


def test_an_undeclared_parameter_read_fails_the_check(repo_copy: Path) -> None:
    # Through an alias of a section, in a function the gate stage reaches.
    _append_to_function(
        repo_copy / PACKAGE / "release" / "gate.py",
        "run_gate_stage",
        "tc = cfg.train\nif tc.label_smoothing > 0.5:\n    pass\n",
    )
    assert problems(repo_copy) == {"gate": ["param missing: train.label_smoothing"]}


def test_a_config_passed_to_untyped_code_counts_as_reading_all_of_it(repo_copy: Path) -> None:
    _append_to_function(
        repo_copy / PACKAGE / "quality" / "evaluate.py",
        "run_evaluate_stage",
        "print(cfg.export)\n",
    )
    assert problems(repo_copy) == {"evaluate": ["param missing: export"]}


def test_a_removed_import_is_reported_as_an_extra_dep(repo_copy: Path) -> None:
    dvc_yaml = repo_copy / "dvc.yaml"
    stages = yaml.safe_load(dvc_yaml.read_text())
    stages["stages"]["ingest"]["deps"].append(f"{PACKAGE}/training/augment.py")
    dvc_yaml.write_text(yaml.safe_dump(stages))
    assert problems(repo_copy) == {"ingest": ["dep not imported: pipeline/training/augment.py"]}


def test_the_report_script_runs() -> None:
    out = subprocess.run(
        [sys.executable, "scripts/stage_deps.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    ).stdout
    assert "evaluate:\n  deps (modules):\n" in out and "    - pipeline/quality/evaluate.py\n" in out


def test_write_puts_the_closure_into_dvc_yaml(repo_copy: Path) -> None:
    from scripts.stage_deps import write_module_deps

    _append_to_function(
        repo_copy / PACKAGE / "quality" / "evaluate.py",
        "run_evaluate_stage",
        "from pipeline.training.augment import prepare_batch  # noqa: F401\n",
    )
    before = (repo_copy / "dvc.yaml").read_text()
    missing = problems(repo_copy)["evaluate"]  # augment.py and what it imports
    after = write_module_deps(repo_copy / "dvc.yaml", repo_copy)
    (repo_copy / "dvc.yaml").write_text(after)
    assert problems(repo_copy) == {}
    # one line per missing module added (in evaluate), comments and the rest as they were
    assert len(after.splitlines()) == len(before.splitlines()) + len(missing)
    assert [line for line in before.splitlines() if line.lstrip().startswith("#")] == [
        line for line in after.splitlines() if line.lstrip().startswith("#")
    ]
