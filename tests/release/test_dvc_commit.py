"""Resume that DVC keeps: ``python -m pipeline resume`` records the resumed model in dvc.lock.

A real git + DVC repository in tmp_path, with the real train command on tiny synthetic
data: ``dvc repro`` trains 2 epochs; the parameters change to 3 epochs and a training
run is SIGKILLed (tests/helpers/fault_inject.py) just before its second checkpoint lands;
``train --resume`` finishes it but leaves dvc.lock describing the old model (DVC would
replace the resumed one); ``python -m pipeline resume`` commits it, and the next
``dvc repro`` keeps it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GIT_ENV = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@localhost",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@localhost",
}
MODEL = "models/candidate/model.pt"
# Only the model is declared: the stage's metrics files are not what this test is about.
DVC_YAML = f"""\
stages:
  train:
    cmd: python -m pipeline train
    deps: [data/prepared, metrics/data_stats.json]
    params: [train]
    outs: [{MODEL}]
"""


def run(argv: list[str], cwd: Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        **GIT_ENV,
        "PYTHONPATH": str(ROOT),
        # `python` in the stage command must be this interpreter (the project's venv).
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env)
    if ok and proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dvc(repo: Path, *args: str) -> str:
    proc = run([sys.executable, "-m", "dvc", *args], repo)
    return proc.stdout + proc.stderr


def set_train(repo: Path, **values: object) -> None:
    """Set ``values`` in the train section of params.yaml (the values the stage reads)."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["train"].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def locked_md5(repo: Path) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    (out,) = lock["stages"]["train"]["outs"]
    assert out["path"] == MODEL
    return str(out["md5"])


@pytest.mark.slow
def test_resume_is_kept_by_the_next_dvc_repro(tmp_path: Path, tiny_prepared: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copyfile(ROOT / "params.yaml", repo / "params.yaml")
    set_train(repo, model="mlp", epochs=2, batch_size=32, val_size=40, num_threads=1, device="cpu")
    shutil.copytree(tiny_prepared, repo / "data" / "prepared")
    (repo / "metrics").mkdir()
    stats = {"normalization": {"mean": 0.13, "std": 0.31}}
    (repo / "metrics" / "data_stats.json").write_text(json.dumps(stats))
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / ".gitignore").write_text("/models/checkpoints\n/metrics/train*\n")
    run(["git", "init", "-q"], repo)
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.analytics", "false")

    dvc(repo, "repro", "train")
    model = repo / MODEL
    first = md5(model)
    assert locked_md5(repo) == first
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "2 epochs"], repo)

    # A longer run, killed just before its second checkpoint replaces the first.
    set_train(repo, epochs=3)
    log = tmp_path / "kill.log"
    inject_script = ROOT / "tests" / "helpers" / "fault_inject.py"
    inject = [str(inject_script), "--log", str(log), "--kill-at", "2"]
    match = ["--match", "-> checkpoints/last.pt"]
    killed = run([sys.executable, *inject, *match, "--", "train"], repo, ok=False)
    assert killed.returncode == -9, killed.stderr
    assert (repo / "models" / "checkpoints" / "last.pt").is_file()
    assert md5(model) == first  # the killed run never wrote a model

    # `train --resume` alone: the model is finished, but dvc.lock still has the old one.
    resumed = run([sys.executable, "-m", "pipeline", "train", "--resume"], repo)
    assert "dvc commit --force train" in resumed.stderr  # the CLI says what is missing
    finished = md5(model)
    assert finished != first
    assert locked_md5(repo) == first
    assert "changed" in dvc(repo, "status", "train")

    # `resume` records it: dvc.lock now names the resumed model, and repro keeps it.
    # (Resuming a finished checkpoint trains no further epoch; the file is rewritten, with
    # new timings in its metadata, so its bytes differ from the previous one's.)
    run([sys.executable, "-m", "pipeline", "resume"], repo)
    finished = md5(model)
    assert locked_md5(repo) == finished
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["epochs"] == 3
    assert "up to date" in dvc(repo, "status")
    out = dvc(repo, "repro", "train")
    assert "didn't change, skipping" in out
    assert md5(model) == finished


def test_resume_refuses_overrides_and_a_missing_project(tmp_path: Path) -> None:
    """dvc.lock describes params.yaml: overrides would make it lie. One clear line each."""
    shutil.copyfile(ROOT / "params.yaml", tmp_path / "params.yaml")
    proc = run(
        [sys.executable, "-m", "pipeline", "resume", "--set", "train.epochs=3"], tmp_path, ok=False
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ConfigError: resume records")
    proc = run([sys.executable, "-m", "pipeline", "resume"], tmp_path, ok=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: DvcCommandError: no dvc.yaml")
