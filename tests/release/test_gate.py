"""Tests of pipeline/release/gate.py: the pure decision, the stage runner and the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.atomic import sha256_file, write_json
from pipeline.core.config import Config, GateConfig
from pipeline.core.errors import ConfigError, GateRejected, ModelFileError
from pipeline.data.dataset import images_path, labels_path, load_split
from pipeline.handoff.export import export_onnx
from pipeline.handoff.parity import check_parity
from pipeline.release.gate import accuracy_checks, decide, parity_check, run_gate_stage
from pipeline.training.model_io import LoadedModel, torch_logits
from pipeline.training.models import build_model
from tests.helpers.models import constant_module

ROOT = Path(__file__).resolve().parents[2]
GATE = GateConfig(min_accuracy=0.99, max_regression=0.002)


def constant_model(cls: int) -> LoadedModel:
    """Always answers ``cls``: its accuracy is the share of ``cls`` in the labels."""
    return LoadedModel(constant_module(cls), "mlp", 32, 0.1307, 0.3081)


class ConstantOnnx(dict[int, Path]):
    """Exported constant models, made on first use (an export costs about a second)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, cls: int) -> Path:
        self[cls] = export_onnx(constant_model(cls), self.root / f"c{cls}.onnx")
        return self[cls]


@pytest.fixture(scope="module")
def constant_onnx(tmp_path_factory: pytest.TempPathFactory) -> ConstantOnnx:
    return ConstantOnnx(tmp_path_factory.mktemp("const"))


def by_frequency(prepared: Path) -> tuple[np.ndarray, list[int]]:
    labels = np.asarray(load_split(prepared, "test").labels)
    counts = np.bincount(labels, minlength=10)
    return counts / len(labels), [int(c) for c in np.argsort(-counts, kind="stable")]


# --- the pure decision -----------------------------------------------------------------


def test_floor_is_inclusive() -> None:
    floor, _ = accuracy_checks(0.99, None, GATE)
    assert floor.passed and floor.observed == 0.99 and floor.threshold == 0.99
    floor, _ = accuracy_checks(0.9899, None, GATE)
    assert not floor.passed and "< floor" in floor.message


def test_no_production_means_floor_only() -> None:
    _, reg = accuracy_checks(0.995, None, GATE)
    assert reg.passed and reg.observed is None and "not applicable" in reg.message


@pytest.mark.parametrize(
    ("candidate", "production", "ok"),
    [
        (0.992, 0.994, True),  # drop 0.002: exactly the allowance
        (0.9919, 0.994, False),  # drop 0.0021
        (0.999, 0.994, True),  # improvement
    ],
)
def test_regression_against_production(candidate: float, production: float, ok: bool) -> None:
    _, reg = accuracy_checks(candidate, production, GATE)
    assert reg.passed is ok
    assert reg.observed == pytest.approx(production - candidate)
    assert reg.threshold == GATE.max_regression


def test_parity_check_cases(tmp_path: Path) -> None:
    report = tmp_path / "parity.json"
    assert not parity_check(report, "abc").passed  # missing
    report.write_text("{not json")
    assert "not valid JSON" in parity_check(report, "abc").message
    write_json(report, {"onnx_sha256": "other", "passed": True})
    assert "another ONNX file" in parity_check(report, "abc").message
    write_json(report, {"onnx_sha256": "abc", "passed": False})
    assert not parity_check(report, "abc").passed
    write_json(report, {"onnx_sha256": "abc", "passed": True})
    assert parity_check(report, "abc").passed


# --- measured on ONNX files ------------------------------------------------------------


def test_decide_measures_onnx_accuracy(tiny_prepared: Path, constant_onnx: ConstantOnnx) -> None:
    share, order = by_frequency(tiny_prepared)
    test = load_split(tiny_prepared, "test")
    best, worst = order[0], order[-1]
    loose = GateConfig(min_accuracy=0.0, max_regression=share[best] - share[worst] - 0.001)

    alone = decide(constant_onnx[worst], None, test.images, test.labels, loose)
    assert alone.passed and alone.candidate_accuracy == pytest.approx(share[worst])
    assert alone.production_sha256 is None and alone.production_accuracy is None

    vs = decide(constant_onnx[worst], constant_onnx[best], test.images, test.labels, loose)
    assert not vs.passed
    assert vs.production_accuracy == pytest.approx(share[best])
    assert vs.production_sha256 == sha256_file(constant_onnx[best])
    assert [c.name for c in vs.checks if not c.passed] == ["max_regression"]

    with pytest.raises(ModelFileError, match="candidate ONNX missing"):
        decide(Path("nope.onnx"), None, test.images, test.labels, loose)


def with_gate(cfg: Config, **gate: float) -> Config:
    return replace(cfg, gate=replace(cfg.gate, **gate))


def install_candidate(cfg: Config, model: LoadedModel, prepared: Path) -> Path:
    """What the export stage leaves behind: the ONNX file and its parity report."""
    path = export_onnx(model, cfg.export.onnx_path)
    test = load_split(prepared, "test")
    report = check_parity(model, path, test.images, test.labels, batch_sizes=(1, 64))
    write_json(cfg.export.parity_path, report.to_dict())
    return path


def test_stage_rejects_below_floor_and_writes_report(
    stage_cfg: Config, tiny_prepared: Path
) -> None:
    share, order = by_frequency(tiny_prepared)
    cfg = stage_cfg  # floor 0.99
    cand = install_candidate(cfg, constant_model(order[0]), tiny_prepared)

    with pytest.raises(GateRejected) as info:
        run_gate_stage(cfg)
    assert len(info.value.reasons) == 1 and "floor" in info.value.reasons[0]

    report = json.loads(cfg.gate.report_path.read_text())
    assert report["passed"] is False and report["decision"] == "rejected"
    assert report["candidate_sha256"] == sha256_file(cand)
    assert report["candidate_accuracy"] == pytest.approx(share[order[0]])
    assert report["production_sha256"] is None
    assert report["reasons"] == info.value.reasons
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == {"parity", "min_accuracy", "max_regression"}
    assert checks["min_accuracy"]["threshold"] == 0.99
    assert checks["parity"]["passed"] is True


def test_stage_compares_with_production(
    stage_cfg: Config, tiny_prepared: Path, constant_onnx: ConstantOnnx
) -> None:
    share, order = by_frequency(tiny_prepared)
    best, worst = order[0], order[-1]
    cfg = with_gate(stage_cfg, min_accuracy=0.0)
    cfg.registry.production_dir.mkdir(parents=True)
    (cfg.registry.production_dir / "model.onnx").write_bytes(constant_onnx[best].read_bytes())

    install_candidate(cfg, constant_model(worst), tiny_prepared)
    with pytest.raises(GateRejected, match="drop vs production"):
        run_gate_stage(cfg)
    report = json.loads(cfg.gate.report_path.read_text())
    assert report["production_sha256"] == sha256_file(constant_onnx[best])
    assert report["production_accuracy"] == pytest.approx(share[best])

    install_candidate(cfg, constant_model(best), tiny_prepared)  # ties production
    decision = run_gate_stage(cfg)
    assert decision.passed
    assert json.loads(cfg.gate.report_path.read_text())["passed"] is True


def relabel_by(model: LoadedModel, prepared: Path) -> None:
    """Make ``model``'s clean answers the labels: clean accuracy 1.0 by construction."""
    for split in ("train", "test"):
        images = np.load(images_path(prepared, split))
        np.save(
            labels_path(prepared, split), torch_logits(model, images).argmax(1).astype(np.uint8)
        )


def with_quality(cfg: Config, **gate: object) -> Config:
    return replace(cfg, gate=replace(cfg.gate, **gate))  # type: ignore[arg-type]


def test_stage_rejects_a_clean_pass_that_fails_a_robustness_floor_by_name(
    stage_cfg: Config, tiny_prepared: Path
) -> None:
    """Perfect on clean test images, but noise changes its answers: the floor rejects it,
    naming the family; with every quality threshold off (null) nothing new rejects it."""
    torch.manual_seed(0)
    model = LoadedModel(build_model("mlp", 8).eval(), "mlp", 8, 0.1307, 0.3081)
    relabel_by(model, tiny_prepared)
    cand = install_candidate(stage_cfg, model, tiny_prepared)
    before = {p.name: p.read_bytes() for p in tiny_prepared.iterdir()}

    off = stage_cfg  # outputs_under turns every quality threshold off
    assert off.gate.min_robust_accuracy is None and off.gate.max_ece is None
    assert not off.gate.robust_floors
    assert run_gate_stage(off).passed  # no quality threshold: the suite is not even run
    report = json.loads(off.gate.report_path.read_text())
    assert report["quality"] is None
    assert {c["name"] for c in report["checks"]} == {"parity", "min_accuracy", "max_regression"}

    cfg = with_quality(off, robust_floors={"noise": 1.0}, max_ece=1.0)
    with pytest.raises(GateRejected, match=r"noise \(severity 2\) accuracy") as info:
        run_gate_stage(cfg)
    assert len(info.value.reasons) == 1 and "noise" in info.value.reasons[0]
    report = json.loads(cfg.gate.report_path.read_text())
    assert report["decision"] == "rejected" and report["candidate_sha256"] == sha256_file(cand)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["min_accuracy"]["passed"] is True and checks["min_accuracy"]["observed"] == 1.0
    noise = checks["robust_noise"]
    assert noise["passed"] is False and noise["threshold"] == 1.0 and noise["observed"] < 1.0
    assert round(noise["observed"], 4) == report["quality"]["robustness"]["accuracy"]["noise"][1]
    assert checks["max_ece"]["passed"] is True and checks["max_ece"]["threshold"] == 1.0
    assert report["quality"]["severity_checked"] == cfg.quality.severity
    # Every family at the default severity when the global floor is set; nothing written
    # under the data directory.
    cfg = with_quality(off, min_robust_accuracy=0.0)
    assert run_gate_stage(cfg).passed
    names = {c["name"] for c in json.loads(cfg.gate.report_path.read_text())["checks"]}
    assert {"robust_noise", "robust_rotate", "robust_occlusion"} <= names
    assert {p.name: p.read_bytes() for p in tiny_prepared.iterdir()} == before

    with pytest.raises(ConfigError, match="fog"):
        run_gate_stage(with_quality(stage_cfg, robust_floors={"fog": 0.5}))


def test_stage_rejects_a_candidate_without_its_parity_report(
    stage_cfg: Config, tiny_prepared: Path
) -> None:
    cfg = with_gate(stage_cfg, min_accuracy=0.0)
    install_candidate(cfg, constant_model(0), tiny_prepared)
    export_onnx(constant_model(1), cfg.export.onnx_path)  # replaced after the parity check
    with pytest.raises(GateRejected, match="another ONNX file"):
        run_gate_stage(cfg)


def test_stage_error_leaves_no_stale_report(stage_cfg: Config, tiny_prepared: Path) -> None:
    cfg = with_gate(stage_cfg, min_accuracy=0.0)
    install_candidate(cfg, constant_model(0), tiny_prepared)
    run_gate_stage(cfg)
    assert json.loads(cfg.gate.report_path.read_text())["passed"] is True
    cfg.export.onnx_path.unlink()
    with pytest.raises(ModelFileError, match="candidate ONNX missing"):
        run_gate_stage(cfg)
    assert not cfg.gate.report_path.exists()


def test_cli_exit_code_is_the_ci_signal(
    stage_cfg: Config, tiny_prepared: Path, tmp_path: Path
) -> None:
    """``python -m pipeline gate`` for real: non-zero on rejection, zero on acceptance."""
    cfg = stage_cfg
    install_candidate(cfg, constant_model(0), tiny_prepared)
    sets = {
        "data.prepared_dir": tiny_prepared,
        "export.onnx_path": cfg.export.onnx_path,
        "export.parity_path": cfg.export.parity_path,
        "gate.report_path": cfg.gate.report_path,
        "registry.production_dir": cfg.registry.production_dir,
    }
    cmd = [sys.executable, "-m", "pipeline", "--params", str(ROOT / "params.yaml"), "gate"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    # The clean-accuracy checks only: params.yaml may hold the default profile's
    # robustness floors, which a constant model fails too.
    for key in ("gate.min_robust_accuracy", "gate.max_ece"):
        cmd += ["--set", f"{key}=null"]
    cmd += ["--set", "gate.robust_floors={}"]

    rejected = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, check=False)
    assert rejected.returncode != 0
    assert "GateRejected" in rejected.stderr and "floor" in rejected.stderr
    errors = [line for line in rejected.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in rejected.stderr  # one clear line
    assert json.loads(cfg.gate.report_path.read_text())["passed"] is False

    accepted = subprocess.run(
        [*cmd, "--set", "gate.min_accuracy=0.0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(cfg.gate.report_path.read_text())["decision"] == "accepted"
