"""flows.dvc_tasks without Prefect: log streaming, DVC runs on a real (fake) project."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flows.dvc_tasks import (
    dvc_push,
    gate_rejection,
    pipeline_stages,
    repro_gate,
    repro_stage,
    stale_stages,
)
from pipeline.core.errors import GateRejected, OrchestrationError

ROOT = Path(__file__).resolve().parents[2]


def test_gate_rejection_message_lists_every_reason() -> None:
    err = gate_rejection({"passed": False, "reasons": ["accuracy 0.98 < 0.99", "parity failed"]})
    assert isinstance(err, GateRejected)
    assert str(err) == "gate rejected the candidate: accuracy 0.98 < 0.99; parity failed"
    assert err.reasons == ["accuracy 0.98 < 0.99", "parity failed"]


def test_gate_rejection_falls_back_to_failed_checks() -> None:
    err = gate_rejection(
        {
            "passed": False,
            "checks": [
                {"name": "parity", "passed": True, "message": "ok"},
                {"name": "min_accuracy", "passed": False, "message": "0.98 < 0.99"},
            ],
        }
    )
    assert str(err) == "gate rejected the candidate: min_accuracy: 0.98 < 0.99"
    assert "no reasons" in str(gate_rejection({"passed": False}))


def test_stages_through_dvc_status_and_push(fake_project: Path) -> None:
    lines: list[str] = []
    results = [
        repro_stage(fake_project, s, lines.append)
        for s in ("ingest", "validate", "train", "evaluate", "export")
    ]
    assert all(r.ran for r in results)
    assert repro_gate(fake_project, "gate", Path("reports/gate.json"), lines.append).ran
    assert repro_stage(fake_project, "promote", lines.append).ran
    # The stage's own output (stdout and stderr) reached the sink.
    assert "fake train: starting" in lines and "fake train: a line on stderr" in lines
    assert stale_stages(fake_project) == {}
    # DVC, not the flow, decides staleness: a second run skips the stage.
    assert not repro_stage(fake_project, "train", lines.append).ran
    dvc_push(fake_project, lines.append)
    remote = fake_project.parent / "remote"
    assert any(p.is_file() for p in remote.rglob("*"))


def test_status_reports_what_is_stale(fake_project: Path) -> None:
    repro_stage(fake_project, "ingest", print)
    status = stale_stages(fake_project)
    assert "validate" in status  # never ran: DVC says so


def test_rejecting_gate_raises_gate_rejected_with_reasons(fake_project: Path) -> None:
    for s in ("ingest", "validate", "train", "evaluate", "export"):
        repro_stage(fake_project, s, print)
    params = fake_project / "params.yaml"
    params.write_text(params.read_text().replace("min_accuracy: 0.99\n", "min_accuracy: 0.999\n"))
    with pytest.raises(GateRejected, match=r"candidate accuracy 0.9950 < floor 0.9990") as info:
        repro_gate(fake_project, "gate", Path("reports/gate.json"), print)
    assert info.value.reasons == ["candidate accuracy 0.9950 < floor 0.9990"]
    assert json.loads((fake_project / "reports/gate.json").read_text())["passed"] is False


def test_broken_gate_is_not_mistaken_for_a_rejection(fake_project: Path) -> None:
    # The gate fails before writing a report (its input is missing): a plain stage failure,
    # even though an old rejecting report lies around from an earlier run.
    report = fake_project / "reports/gate.json"
    report.parent.mkdir(parents=True)
    report.write_text(json.dumps({"passed": False, "reasons": ["old"]}))
    with pytest.raises(OrchestrationError, match="stage 'gate'") as info:
        repro_gate(fake_project, "gate", Path("reports/gate.json"), print)
    assert not isinstance(info.value, GateRejected)


def _paths(entries: list[object]) -> list[str]:
    """dvc.yaml ``outs``/``metrics``/``plots`` entries (a path, or ``{path: options}``)."""
    return [str(next(iter(e))) if isinstance(e, dict) else str(e) for e in entries]


def test_the_flow_runs_every_dvc_stage_each_after_what_it_needs() -> None:
    stages = pipeline_stages(ROOT)
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert stages == tuple(spec) and len(stages) >= 7
    made_by = {
        out: name
        for name, stage in spec.items()
        for kind in ("outs", "metrics", "plots")
        for out in _paths(stage.get(kind, []))
    }
    needs = [
        (name, maker)
        for name in stages
        for dep in _paths(spec[name].get("deps", []))
        for out, maker in made_by.items()
        if dep == out or dep.startswith(out.rstrip("/") + "/")
    ]
    assert {name for name, _ in needs} >= set(stages[1:])  # every stage but ingest needs one
    for name, maker in needs:
        assert stages.index(maker) < stages.index(name), f"{name} runs before {maker}"


def test_pipeline_stages_names_a_missing_or_empty_dvc_yaml(tmp_path: Path) -> None:
    with pytest.raises(OrchestrationError, match="cannot read the pipeline"):
        pipeline_stages(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(OrchestrationError, match="declares no stages"):
        pipeline_stages(tmp_path)
