"""Crash consistency of ingest, promote and rollback: a SIGKILL at every kill point.

For each scenario a clean run (in a forked child with the fault injector of
``tests/helpers/fault_inject.py`` counting) lists the kill points: every rename, replace,
``renameat2`` exchange, unlink, rmdir and file write the stage makes. Then, for every
k, a fresh copy of the starting workspace, a child that SIGKILLs itself at point k, and:

1. right after the kill, every directory of the swap is its complete old or complete
   new version (sha256 of every file), never missing or partial (with the exchange
   fallback, "absent" is allowed too: three renames cannot avoid it);
2. after recovery (what the next run does first) the directories form the old or the
   new state *as a set* (no raw of one version beside prepared of another, no previous
   pointing at the wrong model), and no staging directory or journal is left;
3. the stage run again succeeds (rollback: swaps again) and leaves no leftovers.

``pytest tests/test_crash.py -rP`` prints the kill points of each scenario.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

import pipeline.core.dirswap as dirswap
import tests.helpers.fault_inject as fault_inject
from pipeline.core.config import Config, DataConfig
from pipeline.data.ingest import ingest, recover_data
from pipeline.release.promote import CARD_JSON, CARD_MD, promote, recover_registry, rollback

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="renameat2 and fork: Linux only"
)


def _tests_conftest() -> object:
    # Imported by path: several conftest.py files share the module name "conftest".
    path = Path(__file__).with_name("conftest.py")
    spec = importlib.util.spec_from_file_location("_crash_conftest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_conftest = _tests_conftest()
outputs_under = _conftest.outputs_under  # type: ignore[attr-defined]
write_idx_source = _conftest.write_idx_source  # type: ignore[attr-defined]

Tree = dict[str, str] | None  # relative path -> sha256; None: the directory is absent


def tree(directory: Path) -> Tree:
    """sha256 of every file under ``directory``; model cards without their timestamp."""
    if not directory.exists():
        return None
    out: dict[str, str] = {}
    for p in sorted(directory.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if p.name == CARD_JSON:
            card = json.loads(data)
            card.pop("promoted_at", None)
            data = json.dumps(card, sort_keys=True).encode()
        elif p.name == CARD_MD:
            data = b"\n".join(ln for ln in data.split(b"\n") if b"promoted at" not in ln)
        out[str(p.relative_to(directory))] = hashlib.sha256(data).hexdigest()
    return out


def leftovers(*parents: Path) -> list[str]:
    return sorted(p.name for d in parents if d.exists() for p in d.iterdir() if p.name[0] == ".")


def run_child(action: Callable[[], object], log: Path, kill_at: int | None, fallback: bool) -> int:
    """Run ``action`` in a forked child with the injector; its wait status as exit code."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            if fallback:
                dirswap.exchange_dirs = lambda a, b: False
            fault_inject.install(log, kill_at)
            action()
            code = 0
        except BaseException:  # noqa: BLE001 - reported, and the exit code says it failed
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@dataclass
class Scenario:
    name: str
    template: Path  # the starting workspace, copied for every kill point
    dirs: list[str]  # the swapped directories, relative to the workspace
    action: Callable[[Path], object]  # the stage, on a workspace
    recover: Callable[[Path], object]
    rerun_swaps: bool = False  # rollback: running it again exchanges again
    fallback: bool = False  # as on a filesystem without RENAME_EXCHANGE


def check_scenario(sc: Scenario, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Kill at every point; return the report lines (printed by the caller)."""
    if sc.fallback:
        monkeypatch.setattr(dirswap, "exchange_dirs", lambda a, b: False)

    def fresh(tag: str) -> Path:
        ws = tmp_path / tag
        shutil.copytree(sc.template, ws, symlinks=True)
        return ws

    def state(ws: Path) -> tuple[Tree, ...]:
        return tuple(tree(ws / d) for d in sc.dirs)

    parents = sorted({(sc.template / d).parent.relative_to(sc.template) for d in sc.dirs})
    clean = fresh("clean")
    old = state(clean)
    log = tmp_path / "clean.log"
    assert run_child(lambda: sc.action(clean), log, None, sc.fallback) == 0
    new = state(clean)
    assert new != old
    assert leftovers(*(clean / p for p in parents)) == []
    points = log.read_text().splitlines()
    assert any(p.startswith(("exchange(", "rename(")) for p in points)

    lines = [
        f"{sc.name}: {len(points)} kill points (SIGKILL just before call k; "
        f"{' + '.join(sc.dirs)} right after the kill, then after recovery)"
    ]
    for k, point in enumerate(points, start=1):
        ws = fresh(f"k{k}")
        klog = tmp_path / f"k{k}.log"
        code = run_child(lambda ws=ws: sc.action(ws), klog, k, sc.fallback)  # type: ignore[misc]
        assert code == -9, f"k={k} ({point}): expected SIGKILL, got exit {code}"
        assert klog.read_text().splitlines()[-1] == point, "kill points differ between runs"

        after_kill = state(ws)
        for d, got, o, n in zip(sc.dirs, after_kill, old, new, strict=True):
            allowed = [o, n] + ([None] if sc.fallback else [])
            assert got in allowed, f"k={k} ({point}): {d} is neither old nor new: {got}"
        kind = "+".join(
            "absent" if got is None else "old" if got == o else "new"
            for got, o in zip(after_kill, old, strict=True)
        )

        sc.recover(ws)
        recovered = state(ws)
        assert recovered in (old, new), f"k={k} ({point}): after recovery {recovered}"
        assert leftovers(*(ws / p for p in parents)) == [], f"k={k} ({point})"
        rec = "old" if recovered == old else "new"

        sc.action(ws)
        final = state(ws)
        if sc.rerun_swaps:  # rollback again: the recovered state's two dirs exchanged
            assert final == (recovered[1], recovered[0]), f"k={k} ({point})"
        else:
            assert final == new, f"k={k} ({point}): re-run gave {final}"
        assert leftovers(*(ws / p for p in parents)) == [], f"k={k} ({point})"
        lines.append(f"  k={k:2d} {point:64s} killed: {kind:14s} recovered: {rec}")
        shutil.rmtree(ws)
    return lines


# -- ingest ---------------------------------------------------------------------------


def data_cfg(ws: Path, source: Path) -> DataConfig:
    return replace(
        DataConfig(),
        source=str(source),
        raw_dir=ws / "data" / "raw",
        prepared_dir=ws / "data" / "prepared",
    )


def ingest_scenario(tmp_path: Path, first: bool, fallback: bool) -> Scenario:
    template = tmp_path / "template"
    spec_a = write_idx_source(tmp_path / "src_a", n_train=60, n_test=30, seed=0)
    spec_b = write_idx_source(template / "src_b", n_train=60, n_test=30, seed=1)
    if not first:
        ingest(data_cfg(template, tmp_path / "src_a"), spec_a)

    def action(ws: Path) -> object:
        return ingest(data_cfg(ws, ws / "src_b"), spec_b)

    return Scenario(
        name="ingest ("
        + ("first" if first else "replace")
        + (", no RENAME_EXCHANGE)" if fallback else ")"),
        template=template,
        dirs=["data/raw", "data/prepared"],
        action=action,
        recover=lambda ws: recover_data(data_cfg(ws, ws / "src_b")),
        fallback=fallback,
    )


@pytest.mark.parametrize(
    ("first", "fallback"),
    [(True, False), (False, False), (False, True)],
    ids=["first", "replace", "fallback"],
)
def test_ingest_survives_a_kill_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: bool, fallback: bool
) -> None:
    sc = ingest_scenario(tmp_path, first, fallback)
    print("\n".join(check_scenario(sc, tmp_path, monkeypatch)))


# -- promote and rollback -------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three distinct tiny ONNX files ``a``, ``b``, ``c`` (model_version in their metadata).

    Promote copies and hashes the file and reads its metadata; it does not run it, so an
    Identity graph built with onnx.helper serves (no torch export: seconds saved per test).
    """
    import onnx
    from onnx import TensorProto, helper

    # promote reads the metadata through pipeline.handoff.export, which imports torch: import it
    # once here rather than in every forked child.
    import pipeline.handoff.export  # noqa: F401

    root = tmp_path_factory.mktemp("crash-models")
    out = {}
    for name in "abc":
        x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 1, 28, 28])
        y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 1, 28, 28])
        graph = helper.make_graph(
            [helper.make_node("Identity", ["input"], ["output"])], name, [x], [y]
        )
        model = helper.make_model(graph)
        helper.set_model_props(model, {"model_version": name})
        out[name] = root / f"{name}.onnx"
        onnx.save(model, str(out[name]))
    return out


def candidate_with_gate(cfg: Config, model: Path) -> None:
    """``model`` in the candidate slot with a passed gate report naming its sha256."""
    cfg.export.onnx_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, cfg.export.onnx_path)
    sha = hashlib.sha256(cfg.export.onnx_path.read_bytes()).hexdigest()
    cfg.gate.report_path.parent.mkdir(parents=True, exist_ok=True)
    report = {"passed": True, "candidate_sha256": sha, "candidate_accuracy": 0.995, "n": 100}
    cfg.gate.report_path.write_text(json.dumps(report))


def relocated(cfg: Config, ws: Path, template: Path) -> Config:
    """``cfg`` (whose stage paths are under ``template``) with those paths under ``ws``."""

    def move(p: Path) -> Path:
        return ws / Path(p).relative_to(template)

    return replace(
        cfg,
        export=replace(cfg.export, onnx_path=move(cfg.export.onnx_path)),
        gate=replace(cfg.gate, report_path=move(cfg.gate.report_path)),
        registry=replace(
            cfg.registry,
            production_dir=move(cfg.registry.production_dir),
            previous_dir=move(cfg.registry.previous_dir),
        ),
    )


@pytest.mark.parametrize(
    ("stage", "fallback"),
    [
        ("promote-first", False),
        ("promote", False),
        ("rollback", False),
        ("promote", True),
        ("rollback", True),
    ],
    ids=["promote-first", "promote", "rollback", "promote-fallback", "rollback-fallback"],
)
def test_registry_survives_a_kill_anywhere(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    base_config: Config,
    onnx_models: dict[str, Path],
    stage: str,
    fallback: bool,
) -> None:
    template = tmp_path / "template"
    cfg = outputs_under(base_config, template, tmp_path / "unused-prepared")
    if stage != "promote-first":
        candidate_with_gate(cfg, onnx_models["a"])
        promote(cfg)
        candidate_with_gate(cfg, onnx_models["b"])
        promote(cfg)  # production b, previous a
    if stage != "rollback":
        candidate_with_gate(cfg, onnx_models["c"])

    def cfg_in(ws: Path) -> Config:
        return relocated(cfg, ws, template)

    act = rollback if stage == "rollback" else promote
    sc = Scenario(
        name=f"{stage}{' (no RENAME_EXCHANGE)' if fallback else ''}",
        template=template,
        dirs=["models/production", "models/previous"],
        action=lambda ws: act(cfg_in(ws)),
        recover=lambda ws: recover_registry(cfg_in(ws)),
        rerun_swaps=stage == "rollback",
        fallback=fallback,
    )
    print("\n".join(check_scenario(sc, tmp_path, monkeypatch)))
