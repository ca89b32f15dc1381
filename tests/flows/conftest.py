"""Fixtures of the flow tests: one Prefect test server, and a tiny real DVC project.

The fake project is a real git + DVC repository whose ``dvc.yaml`` has the pipeline's
stage names, parameter sections and output paths, but whose commands are a small
script (``stage.py``) that writes plausible JSON reports in milliseconds. It exercises
the flow's DVC wiring for real (``dvc repro --single-item``, ``dvc.lock``,
``dvc status``, ``dvc push``) without torch or MNIST. Its ``params.yaml`` is the
project's own, so the flow validates it with the real schema.

This directory has no ``__init__.py`` on purpose: as a package, ``tests/flows`` would be
imported as ``flows`` and shadow the package under test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

STAGE_SCRIPT = textwrap.dedent(
    '''
    """Fake pipeline stages: `python stage.py <stage>` (reads params.yaml like the real CLI)."""
    import json, shutil, sys
    from pathlib import Path

    import yaml


    def params():
        raw = yaml.safe_load(Path("params.yaml").read_text())
        profile = raw.get("profile", "default")
        for section, values in (raw.get("profiles") or {}).get(profile, {}).items():
            raw[section].update(values)
        return raw


    def dump(path, obj):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\\n")


    stage, p = sys.argv[1], params()
    print(f"fake {stage}: starting")
    print(f"fake {stage}: a line on stderr", file=sys.stderr)
    if stage == "ingest":
        counter = Path("ingest_failures_left")
        left = int(counter.read_text()) if counter.exists() else 0
        if left > 0:
            counter.write_text(str(left - 1))
            print("fake ingest: mirror unreachable", file=sys.stderr)
            sys.exit(1)
        Path("data/prepared").mkdir(parents=True, exist_ok=True)
        Path("data/prepared/train.txt").write_text("digits\\n")
    elif stage == "validate":
        dump("metrics/data_stats.json", {
            "train": {"count": 200, "pixel_mean": 0.13, "pixel_std": 0.31,
                      "class_counts": {"0": 19, "1": 21}},
            "test": {"count": 100, "pixel_mean": 0.13, "pixel_std": 0.31},
            "normalization": {"mean": 0.1307, "std": 0.3081},
        })
        dump("reports/validation/result.json",
             {"success": True, "failed": [], "checks": [{"success": True}]})
    elif stage == "train":
        epochs = p["train"]["epochs"]
        Path("models/candidate").mkdir(parents=True, exist_ok=True)
        Path("models/candidate/model.pt").write_text(f"weights after {epochs} epochs\\n")
        dump("metrics/train/metrics.json", {"epochs": epochs, "val_accuracy": 0.99,
                                            "train_seconds": 1.5})
    elif stage == "evaluate":
        dump("metrics/eval.json", {"accuracy": 0.995, "loss": 0.02, "n": 100, "errors": 1})
        dump("metrics/eval_per_class.json", {
            str(c): {"precision": 0.99, "recall": 0.98, "f1": 0.985, "support": 10}
            for c in range(10)
        })
    elif stage == "export":
        text = Path("models/candidate/model.pt").read_text()
        Path("models/candidate/model.onnx").write_text("onnx " + text)
        dump("metrics/parity.json", {"passed": True})
    elif stage == "gate":
        floor = p["gate"]["min_accuracy"]
        ok = 0.995 >= floor
        reasons = [] if ok else [f"candidate accuracy 0.9950 < floor {floor:.4f}"]
        dump("reports/gate.json", {"passed": ok, "reasons": reasons, "candidate_accuracy": 0.995,
             "checks": [{"name": "min_accuracy", "passed": ok, "message": "floor"}]})
        if not ok:
            print("error: GateRejected: candidate rejected", file=sys.stderr)
            sys.exit(1)
    elif stage == "promote":
        if not json.loads(Path("reports/gate.json").read_text())["passed"]:
            sys.exit("promote: gate did not pass")
        prod = Path("models/production")
        prod.mkdir(parents=True, exist_ok=True)
        shutil.copyfile("models/candidate/model.onnx", prod / "model.onnx")
        dump(prod / "model_card.json", {"version": "v-test", "sha256": "abc123",
                                        "metrics": {"onnx_test_accuracy": 0.995}})
    print(f"fake {stage}: done")
    '''
)

DVC_YAML = textwrap.dedent(
    """
    stages:
      ingest:
        cmd: python stage.py ingest
        deps: [stage.py]
        params: [data.raw_dir, data.prepared_dir]
        outs:
          - data/prepared:
              persist: true
      validate:
        cmd: python stage.py validate
        deps: [stage.py, data/prepared]
        params: [validate]
        outs: [reports/validation]
        metrics:
          - metrics/data_stats.json:
              cache: false
      train:
        cmd: python stage.py train
        deps: [stage.py, data/prepared, metrics/data_stats.json]
        params: [profile, profiles, train]
        outs: [models/candidate/model.pt]
        metrics:
          - metrics/train/metrics.json:
              cache: false
      evaluate:
        cmd: python stage.py evaluate
        deps: [stage.py, models/candidate/model.pt]
        params: [evaluate]
        metrics:
          - metrics/eval.json:
              cache: false
          - metrics/eval_per_class.json:
              cache: false
      export:
        cmd: python stage.py export
        deps: [stage.py, models/candidate/model.pt]
        params: [export]
        outs: [models/candidate/model.onnx]
        metrics:
          - metrics/parity.json:
              cache: false
      gate:
        cmd: python stage.py gate
        deps: [stage.py, models/candidate/model.onnx]
        params: [gate]
        metrics:
          - reports/gate.json:
              cache: false
      promote:
        cmd: python stage.py promote
        deps: [stage.py, reports/gate.json, models/candidate/model.onnx]
        outs:
          - models/production:
              persist: true
    """
)

GIT_ENV = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@localhost",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@localhost",
}


def run(argv: list[str], cwd: Path) -> str:
    """Run a setup command; fail the test with its output if it fails."""
    proc = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, env={**os.environ, **GIT_ENV}
    )
    if proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def dvc(cwd: Path, *args: str) -> str:
    return run([sys.executable, "-m", "dvc", *args], cwd)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server (SQLite) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def fake_project_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake DVC project, built once; tests get their own copy (``fake_project``)."""
    root = tmp_path_factory.mktemp("fake-dvc") / "repo"
    root.mkdir()
    shutil.copyfile(ROOT / "params.yaml", root / "params.yaml")
    (root / "stage.py").write_text(STAGE_SCRIPT)
    (root / "dvc.yaml").write_text(DVC_YAML)
    run(["git", "init", "-q"], root)
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    (root.parent / "remote").mkdir()
    # Given relative to the working directory, DVC stores it relative to .dvc/ (as
    # "../../remote"), like the project's own remote: copies of the repo keep working.
    dvc(root, "remote", "add", "-d", "local", "../remote")
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "fake project"], root)
    return root


@pytest.fixture
def fake_project(fake_project_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the fake project (with its own empty remote beside it)."""
    dest = tmp_path / "repo"
    shutil.copytree(fake_project_template, dest, symlinks=True)
    (tmp_path / "remote").mkdir()
    return dest
