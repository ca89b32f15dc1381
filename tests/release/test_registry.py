"""pipeline/release/registry.py: record, version bumps, concurrent workers, rollback, lineage.

Real git (a bare repository as origin), real DVC (a local directory remote), real GTO;
the pipeline stages are a tiny script (see tests/helpers/registry_repo.py).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.config import load_config
from pipeline.core.errors import PromotionError, RegistryError, RemoteUnreachable
from pipeline.release.registry import lineage, record, rollback_to
from tests.helpers.registry_repo import (
    ARTIFACT,
    DVC,
    World,
    env,
    gto_show,
    make_pool,
    pipeline_cli,
    remote_tags,
    repro,
    set_params,
    sh,
)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pool")
    make_pool(directory)
    return directory


@pytest.fixture
def world(tmp_path: Path, pool: Path) -> World:
    w = World(tmp_path, pool)
    w.create()
    return w


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def head(checkout: Path) -> str:
    return sh(["git", "rev-parse", "HEAD"], checkout).stdout.strip()


def promote_seed(checkout: Path, seed: int) -> str:
    """Run the fake pipeline with ``train.seed``; return the production model's sha256."""
    set_params(checkout, train__seed=seed)
    repro(checkout)
    return sha(checkout / "models" / "production" / "model.onnx")


def test_record_commits_registers_bumps_and_pushes(world: World) -> None:
    a = world.clone("a")
    cfg = load_config(a / "params.yaml")
    model0 = promote_seed(a, 0)
    first = record(cfg, a)
    assert first.version == "v1.0.0" and first.pushed, first
    assert remote_tags(world.origin) == [f"{ARTIFACT}#production#1", f"{ARTIFACT}@v1.0.0"]
    # The commit is on origin's main, and names version, accuracy, dataset, params hash.
    assert sh(["git", "rev-parse", "main"], world.origin).stdout.strip() == first.commit
    message = sh(["git", "log", "-1", "--format=%B", first.commit], a).stdout
    assert message.startswith("Register model v1.0.0: test accuracy 0.9910, dataset dddd")
    assert "params pppp" in message.splitlines()[0] and f"model_sha256: {model0}" in message
    committed = sh(["git", "show", "--name-only", "--format=", first.commit], a).stdout.split()
    assert {"dvc.lock", "metrics/eval/metrics.json", "reports/gate.json"} <= set(committed)
    # params.yaml is committed when the run changed it; either way the commit holds the
    # parameters the run used (nothing of them is left uncommitted).
    assert sh(["git", "status", "--porcelain", "params.yaml"], a).stdout == ""
    assert sh([*DVC, "status", "--json"], a).stdout.strip() in ("{}", "")
    # The DVC remote has the model before anyone can see the tag.
    assert any(world.remote.rglob("*")), "dvc push did not run"

    model1 = promote_seed(a, 1)
    second = record(cfg, a)
    assert second.version == "v1.1.0" and model1 != model0
    shown = gto_show(world.origin)[ARTIFACT]
    assert shown["version"] == "v1.1.0" and shown["stage"] == {"production": "v1.1.0"}, shown

    again = record(cfg, a)
    assert again.version is None and "registered already as v1.1.0" in again.reason
    assert len(remote_tags(world.origin)) == 4


def test_rejected_gate_records_nothing(world: World) -> None:
    a = world.clone("a")
    promote_seed(a, 0)
    record(load_config(a / "params.yaml"), a)
    before_tags, before_head = remote_tags(world.origin), head(a)

    set_params(a, train__seed=1, gate__min_accuracy=0.9999)
    assert repro(a, check=False).returncode != 0
    with pytest.raises(PromotionError, match="gate did not pass"):
        record(load_config(a / "params.yaml"), a)
    failed = pipeline_cli(a, "record", check=False)
    assert failed.returncode == 1 and "gate did not pass" in failed.stderr
    assert remote_tags(world.origin) == before_tags and head(a) == before_head


def test_no_git_remote_records_locally_and_says_so(world: World, tmp_path: Path) -> None:
    a = world.clone("a")
    sh(["git", "remote", "remove", "origin"], a)
    promote_seed(a, 0)
    cfg = load_config(a / "params.yaml")
    said: list[str] = []
    local = record(cfg, a, say=said.append)
    assert local.version == "v1.0.0" and not local.pushed
    assert any(
        "recording locally only: no git remote named 'origin'" in line
        and "git remote add origin <url>" in line
        for line in said
    ), said
    assert f"{ARTIFACT}@v1.0.0" in sh(["git", "tag"], a).stdout
    assert any(world.remote.rglob("*")), "the DVC remote is still pushed to"
    assert remote_tags(world.origin) == []
    # A remote that exists but does not answer is an error, and publishes nothing.
    sh(["git", "remote", "add", "origin", str(world.root / "gone.git")], a)
    promote_seed(a, 1)
    with pytest.raises(RemoteUnreachable, match="gone.git.*is unreachable"):
        record(cfg, a)


def test_missing_dvc_remote_directory_is_explained(world: World) -> None:
    a = world.clone("a")
    promote_seed(a, 0)
    sh([*DVC, "remote", "modify", "--local", "shared", "url", str(world.root / "absent")], a)
    failed = pipeline_cli(a, "record", check=False)
    assert failed.returncode == 1
    assert "does not exist: create it (`mkdir -p" in failed.stderr, failed.stderr
    assert remote_tags(world.origin) == [], "a tag was published without the data"


def test_concurrent_promotions_get_distinct_versions(world: World) -> None:
    """Two checkouts record at the same moment: both versions survive, none overwritten."""
    a, b = world.clone("a"), world.clone("b")
    shas = {promote_seed(a, 2), promote_seed(b, 3)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline", "record"],
            cwd=c,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in (a, b)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, f"{out}\n{err}"
    tags = remote_tags(world.origin)
    assert [t for t in tags if "@" in t] == [f"{ARTIFACT}@v1.0.0", f"{ARTIFACT}@v1.1.0"], tags
    assert [t for t in tags if "#" in t] == [f"{ARTIFACT}#production#1", f"{ARTIFACT}#production#2"]
    # Each version's message names one of the two models: two distinct models, no loss.
    clone = world.clone("check")
    registered = set()
    for version in ("v1.0.0", "v1.1.0"):
        text = sh(["git", "tag", "-l", "--format=%(contents)", f"{ARTIFACT}@{version}"], clone)
        registered.add(
            next(
                line.split(": ")[1]
                for line in text.stdout.splitlines()
                if line.startswith("model_sha256")
            )
        )
    assert registered == shas
    # origin's main holds both runs' history (the loser merged the winner's commit).
    log_text = sh(["git", "log", "--format=%s", "main"], world.origin).stdout
    assert "Register model v1.0.0" in log_text and "Register model v1.1.0" in log_text
    assert gto_show(world.origin)[ARTIFACT]["stage"] == {"production": "v1.1.0"}


def test_rollback_to_any_version_and_lineage(world: World) -> None:
    a = world.clone("a")
    cfg = load_config(a / "params.yaml")
    models = {}
    for seed in (0, 1, 2):
        models[seed] = promote_seed(a, seed)
        record(cfg, a)
    prod = a / "models" / "production" / "model.onnx"

    result = rollback_to(cfg, a, "v1.0.0")
    assert result.tags == (f"{ARTIFACT}#production#4",) and result.pushed
    assert sha(prod) == models[0]
    assert gto_show(world.origin)[ARTIFACT]["stage"] == {"production": "v1.0.0"}
    assert sh([*DVC, "status", "--json"], a).stdout.strip() in ("{}", ""), "dvc.lock not recorded"
    # The next repro does not re-promote the newer candidate over the rollback.
    repro(a)
    assert sha(prod) == models[0]

    out = pipeline_cli(a, "rollback", "--to", "v1.1.0").stderr
    assert "production is now v1.1.0 (was v1.0.0)" in out, out
    assert sha(prod) == models[1]
    with pytest.raises(RegistryError, match=r"v9.0.0 is not registered \(registered: v1.0.0"):
        rollback_to(cfg, a, "v9.0.0")

    history = sh(["gto", "history", ARTIFACT, "-r", str(world.origin), "--plain"], a).stdout
    for event in ("registration", "assignment"):
        assert event in history, history
    assert history.count("assignment") == 5, history

    story = lineage(cfg, a, "v1.0.0")
    assert story["model_card"]["sha256"] == models[0]
    assert story["test_metrics"] == {"accuracy": 0.991, "loss": 0.03}
    assert story["gate"]["passed"] is True and story["params_hash"] == "p" * 64
    assert story["stage_tags"] == [f"{ARTIFACT}#production#1", f"{ARTIFACT}#production#4"]
    printed = json.loads(pipeline_cli(a, "lineage", "v1.1.0").stdout)
    assert printed["commit"] != story["commit"] and printed["test_metrics"]["accuracy"] == 0.992
    assert printed["version"] == "v1.1.0" and printed["in_production_now"] is True
