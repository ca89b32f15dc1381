"""flows/sweep.py on a real Prefect server and a real embedded Dask LocalCluster; the
``sweep-apply`` command on a real DVC project; the deployment's entry point.

Trials train on 3000 real MNIST images (width 4, 1-2 epochs): a few seconds each.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from flows.sweep import SUMMARY_KEY, TABLE_KEY, hyperparameter_sweep
from pipeline.core.errors import ClusterError, ConfigError
from pipeline.data.dataset import images_path, labels_path

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def sweep_repo(mnist_prepared: Path, tmp_path: Path) -> Path:
    """A checkout-like directory: params.yaml, 3000 train images (no test split), stats."""
    repo = tmp_path / "repo"
    prepared = repo / "data" / "prepared"
    prepared.mkdir(parents=True)
    shutil.copyfile(ROOT / "params.yaml", repo / "params.yaml")
    shutil.copytree(ROOT / "conf", repo / "conf")  # sweep-apply composes like dvc exp run
    for path in (images_path, labels_path):
        np.save(path(prepared, "train"), np.load(path(mnist_prepared, "train"))[:3000])
    stats = repo / "metrics" / "data_stats.json"
    stats.parent.mkdir()
    stats.write_text(json.dumps({"normalization": {"mean": 0.1307, "std": 0.3081}}))
    return repo


TINY = {
    "train.val_size": 500,
    "train.width": 4,
    "train.epochs": 2,
    "sweep.local_workers": 2,
    "sweep.pruner_startup_trials": 2,
}
SPACE = {
    "lr": {"low": 0.02, "high": 0.3, "log": True},
    "label_smoothing": {"low": 0.0, "high": 0.1},
}


def read_artifact(key: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert found, f"no artifact {key!r}"
    return found[0]


def test_flow_sweeps_on_an_embedded_local_cluster(prefect_harness: None, sweep_repo: Path) -> None:
    summary = hyperparameter_sweep(
        trials=4, parallelism=2, space=SPACE, params=TINY, repo=str(sweep_repo)
    )
    print("\nsweep summary:", json.dumps(summary, indent=1))
    assert summary["trials"] == 4 and summary["workers"] == ["0", "1"]
    assert sum(summary["states"].values()) == 4 and "running" not in summary["states"]
    # Both LocalCluster workers ran trials.
    assert set(summary["trials_per_worker"]) == {"0", "1"}, summary["trials_per_worker"]
    assert summary["best"]["val_accuracy"] > 0.5

    out = sweep_repo / "reports" / "sweep"
    assert summary["report_dir"] == str(out)
    for name in ("trials.csv", "trials.json", "optimization_history.png", "best.yaml"):
        assert (out / name).is_file(), name
    best = yaml.safe_load((out / "best.yaml").read_text())
    # The override names the profile the sweep ran under: whatever params.yaml was composed
    # from (CI runs the tests after a quick-profile pipeline run).
    profile = yaml.safe_load((sweep_repo / "params.yaml").read_text())["profile"]
    assert set(best["train"]) == {"lr", "label_smoothing"} and best["profile"] == profile

    table = read_artifact(TABLE_KEY)
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["number"] for r in rows] == [0, 1, 2, 3]
    assert {"state", "val_accuracy", "val_accuracy_per_epoch", "seconds", "worker"} <= set(rows[0])
    assert "train.lr" in rows[0]
    assert "best: trial" in str(read_artifact(SUMMARY_KEY).data)

    # The next step of docs/sweeps.md, printed only: the dvc command that applies it.
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "sweep-apply", str(out / "best.yaml"), "--dry-run"],
        cwd=sweep_repo,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith(f"dvc exp run -S profile={profile} -S train.label_smoothing=")
    assert f"-S train.lr={best['train']['lr']!r}" in line


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"trials": 0}, ConfigError, r"sweep\.trials: Input should be greater than 0"),
        ({"space": {}}, ConfigError, r"sweep\.space: empty"),
        ({"space": {"lrate": {"low": 0.1, "high": 0.2}}}, ConfigError, r"space\.lrate: unknown"),
        ({"space": {"lr": {"low": 0.3, "high": 0.1}}}, ConfigError, r"low 0\.3 exceeds high"),
        (
            {"dask_address": "tcp://127.0.0.1:9", "params": {"sweep.connect_timeout_s": 2}},
            ClusterError,
            r"cannot reach a Dask scheduler at 'tcp://127\.0\.0\.1:9' within 2 s",
        ),
    ],
)
def test_flow_refuses_bad_input_before_any_trial(
    prefect_harness: None, sweep_repo: Path, kwargs: dict[str, Any], error: type, message: str
) -> None:
    kwargs = {"space": SPACE, **kwargs}
    with pytest.raises(error, match=message):
        hyperparameter_sweep(trials=kwargs.pop("trials", 2), repo=str(sweep_repo), **kwargs)
    assert not (sweep_repo / "reports").exists()  # nothing ran, nothing written


def test_flow_reads_the_scheduler_address_from_the_environment(
    prefect_harness: None, sweep_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MNIST_DASK_ADDRESS", "tcp://127.0.0.1:9")
    with pytest.raises(ClusterError, match=r"127\.0\.0\.1:9"):
        hyperparameter_sweep(
            trials=2, space=SPACE, params={"sweep.connect_timeout_s": 1}, repo=str(sweep_repo)
        )


def pipeline_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_sweep_apply_runs_a_dvc_experiment(fake_project: Path) -> None:
    """The real `dvc exp run -S ...` in a real DVC project: the experiment gets the values."""
    best = fake_project.parent / "best.yaml"  # outside the repository, like reports/ would be
    best.write_text(
        "profile: default\ntrain:\n  lr: 0.0421\n  epochs: 3\n  augment:\n    max_shift_px: 1.5\n"
    )
    proc = pipeline_cli(fake_project, "sweep-apply", str(best), "--name", "sweep-best")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0] == (
        "dvc exp run -n sweep-best -S profile=default -S train.augment.max_shift_px=1.5 "
        "-S train.epochs=3 -S train.lr=0.0421"
    )
    shown = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--json"],
        cwd=fake_project,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    exps = [e for entry in json.loads(shown) for e in entry.get("experiments") or []]
    [exp] = [e for e in exps if e.get("name") == "sweep-best"]
    [rev] = exp["revs"]
    params = rev["data"]["params"]["params.yaml"]["data"]["train"]
    assert (params["lr"], params["epochs"], params["augment"]["max_shift_px"]) == (0.0421, 3, 1.5)
    trained = json.loads((fake_project / "metrics" / "train" / "metrics.json").read_text())
    assert trained["epochs"] == 3  # the fake train stage ran with the override


def test_sweep_apply_override_wins_over_the_profile_and_bad_keys_are_refused(
    fake_project: Path,
) -> None:
    """Composed as DVC will: quick sets train.width 12, the override's 28 wins."""
    best = fake_project.parent / "best.yaml"
    best.write_text("profile: quick\ntrain:\n  width: 28\n")
    before = (fake_project / "params.yaml").read_bytes()
    proc = pipeline_cli(fake_project, "sweep-apply", str(best), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "dvc exp run -S profile=quick -S train.width=28"
    assert (fake_project / "params.yaml").read_bytes() == before  # a dry run writes nothing
    best.write_text("train:\n  lrr: 0.1\n")
    proc = pipeline_cli(fake_project, "sweep-apply", str(best), "--dry-run")
    assert proc.returncode == 2 and "train.lrr" in proc.stderr, proc.stderr


def test_deployment_entrypoint_and_parameters() -> None:
    from prefect.flows import load_flow_from_entrypoint

    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    [dep] = [d for d in deployments if d["name"] == "hyperparameter-sweep"]
    flow = load_flow_from_entrypoint(str(ROOT / dep["entrypoint"]))
    assert flow.name == "hyperparameter-sweep"
    assert set(dep["parameters"]) == {"trials", "parallelism", "space", "dask_address"}
    assert set(dep["parameters"]) <= set(flow.parameters.properties)
    assert dep["schedules"] == []
