"""Tests of pipeline/release/promote.py: promote only what the gate passed, atomically; rollback."""

from __future__ import annotations

import json
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch

import pipeline.core.dirswap as dirswap
from pipeline.core.atomic import sha256_file, write_json
from pipeline.core.config import Config
from pipeline.core.dirswap import exchange_dirs
from pipeline.core.errors import ArtifactError, GateRejected, PromotionError
from pipeline.data.dataset import load_split
from pipeline.handoff.export import export_onnx
from pipeline.handoff.onnx_runtime import read_metadata
from pipeline.handoff.parity import check_parity
from pipeline.release.gate import run_gate_stage
from pipeline.release.promote import (
    CARD_JSON,
    CARD_MD,
    MODEL_FILE,
    PLACEHOLDER,
    promote,
    rollback,
)
from pipeline.training.model_io import LoadedModel
from pipeline.training.models import build_model


def random_model(seed: int) -> LoadedModel:
    torch.manual_seed(seed)
    return LoadedModel(build_model("mlp").eval(), "mlp", 32, 0.1307, 0.3081)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two exported models, ``a`` and ``b``, with a model_version in their metadata."""
    root = tmp_path_factory.mktemp("models")
    return {
        name: export_onnx(
            random_model(seed), root / f"{name}.onnx", metadata={"model_version": name}
        )
        for seed, name in enumerate("ab")
    }


@pytest.fixture
def cfg(stage_cfg: Config) -> Config:
    return stage_cfg


def tree(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` (relative path -> digest)."""
    return {
        str(p.relative_to(directory)): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def candidate(cfg: Config, model: Path, passed: bool = True) -> str:
    """Put ``model`` in the candidate slot with a gate report about it; return its sha256."""
    cfg.export.onnx_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, cfg.export.onnx_path)
    sha = sha256_file(cfg.export.onnx_path)
    write_json(
        cfg.gate.report_path,
        {
            "passed": passed,
            "candidate_sha256": sha,
            "candidate_accuracy": 0.995,
            "production_sha256": None,
            "production_accuracy": None,
            "n": 100,
            "checks": [
                {"name": "min_accuracy", "passed": passed, "message": "test", "observed": 0.995}
            ],
            "reasons": [] if passed else ["candidate accuracy 0.5 < floor 0.99"],
        },
    )
    return sha


def test_promote_needs_a_gate_report(cfg: Config, models: dict[str, Path]) -> None:
    cfg.export.onnx_path.parent.mkdir(parents=True)
    shutil.copyfile(models["a"], cfg.export.onnx_path)
    with pytest.raises(ArtifactError, match="gate report missing; run the gate stage"):
        promote(cfg)
    assert not cfg.registry.production_dir.exists()


def test_first_promote_installs_model_and_card(cfg: Config, models: dict[str, Path]) -> None:
    sha = candidate(cfg, models["a"])
    test = load_split(cfg.data.prepared_dir, "test")
    parity = check_parity(random_model(0), cfg.export.onnx_path, test.images, test.labels, (1, 7))
    write_json(cfg.export.parity_path, parity.to_dict())
    write_json(cfg.evaluate.live_dir / "metrics.json", {"accuracy": 0.9951, "loss": 0.02})

    card = promote(cfg)

    prod = cfg.registry.production_dir
    assert sorted(tree(prod)) == [MODEL_FILE, CARD_JSON, CARD_MD]
    assert sha256_file(prod / MODEL_FILE) == sha
    on_disk = json.loads((prod / CARD_JSON).read_text())
    assert on_disk == json.loads(json.dumps(card))
    assert on_disk["sha256"] == sha and on_disk["version"] == "a"
    assert on_disk["metrics"]["onnx_test_accuracy"] == 0.995
    assert on_disk["metrics"]["pytorch_test_accuracy"] == 0.9951
    assert on_disk["parity"]["max_abs_diff"] == parity.max_abs_diff
    assert set(on_disk["parity"]["batch_sizes"]) == {"1", "7"}
    assert on_disk["input_contract"] == read_metadata(models["a"])["input_contract"]
    md = (prod / CARD_MD).read_text()
    assert sha in md and "batch 7" in md and "0.9950" in md
    # No earlier model: previous/ exists (a declared DVC output) but holds no model.
    assert list(tree(cfg.registry.previous_dir)) == [PLACEHOLDER]


def test_card_carries_the_quality_summary_from_the_model(
    cfg: Config, models: dict[str, Path], tmp_path: Path
) -> None:
    import onnx

    summary = {
        "robustness": {"accuracy": {"noise": [0.99, 0.98, 0.9], "rotate": [0.99, 0.97, 0.8]}},
        "severity_checked": 2,
        "temperature": 1.31,
        "ece_before": 0.011,
        "ece_after": 0.004,
        "confidence_threshold": 0.93,
        "target_precision": 0.999,
        "coverage": 0.97,
        "probes_flagged": 0.8,
    }
    proto = onnx.load(str(models["a"]))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "quality", json.dumps(summary)
    model = tmp_path / "with_quality.onnx"
    onnx.save(proto, str(model))
    candidate(cfg, model)

    card = promote(cfg)

    assert card["quality"] == summary
    md = (cfg.registry.production_dir / CARD_MD).read_text()
    assert "## Robustness, calibration and abstention" in md
    assert "severity 2: noise 0.9800, rotate 0.9700" in md and ">= 0.93" in md


@pytest.mark.parametrize("problem", ["failed", "changed"])
def test_rejected_or_changed_candidate_leaves_production_byte_identical(
    cfg: Config, models: dict[str, Path], problem: str
) -> None:
    candidate(cfg, models["a"])
    promote(cfg)
    before = (tree(cfg.registry.production_dir), tree(cfg.registry.previous_dir))

    if problem == "failed":
        candidate(cfg, models["b"], passed=False)
        match = "did not pass"
    else:
        candidate(cfg, models["b"])
        shutil.copyfile(models["a"], cfg.export.onnx_path)  # replaced after the gate
        match = "not the model the gate passed"
    with pytest.raises(PromotionError, match=match):
        promote(cfg)
    assert (tree(cfg.registry.production_dir), tree(cfg.registry.previous_dir)) == before


def test_gate_rejection_then_promote_changes_nothing(
    cfg: Config, models: dict[str, Path], tiny_prepared: Path
) -> None:
    """The real chain: gate rejects (random model < 99%), promote refuses."""
    candidate(cfg, models["a"])
    promote(cfg)
    before = tree(cfg.registry.production_dir)

    model_b = random_model(1)
    export_onnx(model_b, cfg.export.onnx_path)
    test = load_split(tiny_prepared, "test")
    report = check_parity(model_b, cfg.export.onnx_path, test.images, test.labels, (16,))
    write_json(cfg.export.parity_path, report.to_dict())
    with pytest.raises(GateRejected):
        run_gate_stage(cfg)
    with pytest.raises(PromotionError, match="did not pass"):
        promote(cfg)
    assert tree(cfg.registry.production_dir) == before


def test_promote_keeps_previous_and_rollback_swaps(cfg: Config, models: dict[str, Path]) -> None:
    prod, prev = cfg.registry.production_dir, cfg.registry.previous_dir
    sha_a = candidate(cfg, models["a"])
    promote(cfg)
    tree_a = tree(prod)
    sha_b = candidate(cfg, models["b"])
    promote(cfg)
    tree_b = tree(prod)

    assert sha256_file(prod / MODEL_FILE) == sha_b
    assert tree(prev) == tree_a  # the whole old directory, card included

    assert rollback(cfg) == sha_a
    assert tree(prod) == tree_a and tree(prev) == tree_b
    assert rollback(cfg) == sha_b  # a second rollback undoes the first
    assert tree(prod) == tree_b and tree(prev) == tree_a


def test_promoting_the_production_model_again_changes_nothing(
    cfg: Config, models: dict[str, Path]
) -> None:
    candidate(cfg, models["a"])
    promote(cfg)
    candidate(cfg, models["b"])
    promote(cfg)
    before = (tree(cfg.registry.production_dir), tree(cfg.registry.previous_dir))
    promote(cfg)
    assert (tree(cfg.registry.production_dir), tree(cfg.registry.previous_dir)) == before
    # previous/ deleted by hand: DVC would refuse the stage; promote puts a placeholder back.
    shutil.rmtree(cfg.registry.previous_dir)
    promote(cfg)
    assert list(tree(cfg.registry.previous_dir)) == [PLACEHOLDER]
    assert tree(cfg.registry.production_dir) == before[0]


def test_rollback_without_previous_fails(cfg: Config, models: dict[str, Path]) -> None:
    with pytest.raises(PromotionError, match="no previous model"):
        rollback(cfg)
    candidate(cfg, models["a"])
    promote(cfg)
    before = tree(cfg.registry.production_dir)
    with pytest.raises(PromotionError, match="no previous model"):
        rollback(cfg)
    assert tree(cfg.registry.production_dir) == before


def test_fallback_without_rename_exchange(
    cfg: Config, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where renameat2(RENAME_EXCHANGE) is unavailable the results are the same."""
    monkeypatch.setattr(dirswap, "exchange_dirs", lambda a, b: False)
    prod, prev = cfg.registry.production_dir, cfg.registry.previous_dir
    sha_a = candidate(cfg, models["a"])
    promote(cfg)
    tree_a = tree(prod)
    sha_b = candidate(cfg, models["b"])
    promote(cfg)
    assert sha256_file(prod / MODEL_FILE) == sha_b and tree(prev) == tree_a
    assert rollback(cfg) == sha_a
    assert tree(prod) == tree_a
    assert sha256_file(prev / MODEL_FILE) == sha_b
    leftovers = [p.name for p in prod.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux-only")
def test_exchange_dirs_swaps_atomically(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("from a")
    (b / "x").write_text("from b")
    assert exchange_dirs(a, b)
    assert (a / "x").read_text() == "from b" and (b / "x").read_text() == "from a"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux-only")
def test_reader_never_sees_a_missing_model(cfg: Config, models: dict[str, Path]) -> None:
    """A serving process polling production/model.onnx during promote/rollback cycles."""
    shas = {candidate(cfg, models["a"])}
    promote(cfg)
    shas.add(candidate(cfg, models["b"]))
    promote(cfg)
    path = cfg.registry.production_dir / MODEL_FILE
    seen: set[str] = set()
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.add(sha256_file(path))
            except OSError as err:  # a missing file here is exactly the bug
                errors.append(err)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(40):
            rollback(cfg)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert seen == shas
