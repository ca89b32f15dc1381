"""pipeline/sweep/search.py, cluster.py, report.py: space, bad input, pruning, reports.

The Dask tests share one real LocalCluster (2 worker processes) and train on a reduced
real MNIST (3000 train images, width 4), so a trial takes a few seconds.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from pipeline.core.config import Config, SweepConfig, config_from_dict, load_config
from pipeline.core.errors import ClusterError, ConfigError
from pipeline.data.dataset import images_path, labels_path
from pipeline.sweep.cluster import dask_client
from pipeline.sweep.report import write_sweep_reports
from pipeline.sweep.search import (
    best_overrides,
    check_sweep,
    load_sweep_data,
    run_sweep,
    search_space,
    trial_config,
)

ROOT = Path(__file__).resolve().parents[2]


def raw_params() -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load((ROOT / "params.yaml").read_text())
    return raw


def with_space(space: Any, **sweep: Any) -> dict[str, Any]:
    raw = raw_params()
    raw["sweep"] = {**raw["sweep"], "space": space, **sweep}
    return raw


# --- the search space and bad input --------------------------------------------------


def test_default_space_maps_to_optuna_distributions() -> None:
    space = search_space(load_config(ROOT / "params.yaml").sweep)
    assert isinstance(space["lr"], FloatDistribution) and space["lr"].log
    assert isinstance(space["width"], IntDistribution) and space["width"].step == 4
    assert isinstance(space["batch_size"], CategoricalDistribution)
    assert isinstance(space["augment.max_shift_px"], FloatDistribution)


@pytest.mark.parametrize(
    ("space", "sweep", "message"),
    [
        ({"lrr": {"low": 0.01, "high": 0.1}}, {}, "sweep.space.lrr: unknown parameter"),
        ({"augment.nope": {"choices": [1]}}, {}, "sweep.space.augment.nope: unknown parameter"),
        ({"lr": {"low": 0.5, "high": 0.1}}, {}, "sweep.space.lr: low 0.5 exceeds high 0.1"),
        ({"lr": {"low": 0.0, "high": 0.1, "log": True}}, {}, "sweep.space.lr: log scale"),
        ({"lr": {"high": 0.1}}, {}, "sweep.space.lr: needs low and high"),
        ({"lr": "big"}, {}, "sweep.space.lr: must be a mapping"),
        ({"lr": {"low": 0.1, "high": 0.2, "lg": True}}, {}, "sweep.space.lr: lg"),
        ({"lr": {"choices": []}}, {}, "sweep.space.lr: choices: must not be empty"),
        ({"width": {"low": 8.5, "high": 16}}, {}, "needs an integer low"),
        ({"optimizer": {"choices": ["sgd", "adam"]}}, {}, "'adam' is not a valid value"),
        ({"label_smoothing": {"low": 0.0, "high": 1.5}}, {}, "1.5 is not a valid value"),
        ({"seed": {"low": 0, "high": 3}}, {}, "sweep.space.seed: not tunable"),
        (
            {"lr": {"low": 0.01, "high": 0.1}},
            {"trials": 0},
            "sweep.trials: Input should be greater",
        ),
    ],
)
def test_bad_space_is_a_config_error_naming_the_key(
    space: Any, sweep: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        config_from_dict(with_space(space, **sweep))


def test_empty_space_loads_but_the_sweep_refuses_it() -> None:
    cfg = config_from_dict(with_space({}))  # the other stages must still run
    with pytest.raises(ConfigError, match=r"sweep\.space: empty"):
        check_sweep(cfg)


def test_a_sweep_needs_a_validation_split() -> None:
    cfg = config_from_dict(with_space({"lr": {"low": 0.01, "high": 0.1}}), {"train.val_size": 0})
    with pytest.raises(ConfigError, match=r"train\.val_size: 0"):
        check_sweep(cfg)


def test_trial_config_applies_nested_values_and_one_thread() -> None:
    base = load_config(ROOT / "params.yaml").train
    cfg = trial_config(base, {"lr": 0.05, "augment.max_shift_px": 1.5, "width": 20}, threads=1)
    assert (cfg.lr, cfg.augment.max_shift_px, cfg.width, cfg.num_threads) == (0.05, 1.5, 20, 1)
    assert cfg.augment.max_rotation_deg == base.augment.max_rotation_deg
    with pytest.raises(ConfigError, match="val_size"):
        trial_config(base, {"val_size": 10}, threads=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_scheduler_fails_fast_with_a_cluster_error() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with (
        pytest.raises(ClusterError, match=r"sweep\.dask_address: cannot reach .*within 2 s"),
        dask_client(SweepConfig(connect_timeout_s=2.0), address),
    ):
        pass
    assert time.monotonic() - t0 < 15


# --- on a real LocalCluster ------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with dask_client(SweepConfig(local_workers=2, trial_threads=1)) as c:
        yield c


@pytest.fixture(scope="module")
def train_only(mnist_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3000 real training images and the stats file; NO test split in the directory."""
    root = tmp_path_factory.mktemp("sweep-data")
    prepared = root / "prepared"
    prepared.mkdir()
    for path in (images_path, labels_path):
        np.save(path(prepared, "train"), np.load(path(mnist_prepared, "train"))[:3000])
    (root / "stats.json").write_text(json.dumps({"normalization": {"mean": 0.1307, "std": 0.3081}}))
    return root


_OPENED: list[str] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], str | Path):
        _OPENED.append(str(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only when asked


@contextlib.contextmanager
def record_opened_files() -> Iterator[list[str]]:
    """Every file this process opens inside the block (``sys.addaudithook``)."""
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


def tiny_config(data_root: Path, out: Path, space: dict[str, Any], **sweep: Any) -> Config:
    overrides = {
        "data.prepared_dir": str(data_root / "prepared"),
        "validate.stats_path": str(data_root / "stats.json"),
        "train.val_size": 500,
        "train.width": 4,
        "train.epochs": 2,
        "sweep.report_dir": str(out),
        **{f"sweep.{k}": v for k, v in sweep.items()},
    }
    return config_from_dict(with_space(space), overrides)


def test_pruning_stops_a_bad_trial_after_its_first_epoch(
    client: Any, train_only: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(
        train_only,
        tmp_path / "sweep",
        {"lr": {"low": 0.000001, "high": 0.5, "log": True}},
        trials=3,
        parallelism=1,
        pruner="median",
        pruner_startup_trials=2,
        pruner_warmup_epochs=0,
    )
    assert not (train_only / "prepared" / "test_images.npy").exists()
    from pipeline.sweep.search import make_study

    study = make_study(cfg.sweep)
    # Two sound trials first, then one whose learning rate is far too small to learn.
    for lr in (0.1, 0.12, 0.000001):
        study.enqueue_trial({"lr": lr})
    events: list[str] = []
    result = run_sweep(client, cfg, load_sweep_data(cfg), study=study, on_event=events.append)

    good1, good2, bad = result.records
    assert (good1.state, good2.state, bad.state) == ("complete", "complete", "pruned"), events
    assert len(good1.val_accuracy_per_epoch) == 2 and len(good2.val_accuracy_per_epoch) == 2
    assert len(bad.val_accuracy_per_epoch) == 1  # stopped after epoch 1 of 2
    assert bad.val_accuracy_per_epoch[0] < min(good1.val_accuracy_per_epoch[0], 0.5)
    assert study.trials[2].state == optuna.trial.TrialState.PRUNED
    assert result.best.number in (0, 1)
    assert any("trial 2 pruned after epoch 1" in e for e in events), events


def test_sweep_reports_and_best_override(client: Any, train_only: Path, tmp_path: Path) -> None:
    cfg = tiny_config(
        train_only,
        tmp_path / "sweep",
        {
            "lr": {"low": 0.02, "high": 0.3, "log": True},
            "augment.max_shift_px": {"low": 0, "high": 2},
        },
        trials=4,
        pruner="none",
    )
    # The data dir has no test split at all, and the driver opens no test file either
    # (workers get the train arrays through Dask, never a path).
    assert sorted(p.name for p in (train_only / "prepared").iterdir()) == [
        "train_images.npy",
        "train_labels.npy",
    ]
    with record_opened_files() as opened:
        result = run_sweep(client, cfg, load_sweep_data(cfg))
    assert any("train_images.npy" in p for p in opened)
    assert not [p for p in opened if "test_" in Path(p).name or "t10k" in p]
    report = write_sweep_reports(result, cfg.sweep.report_dir, cfg.profile)

    assert result.parallelism == 2 and result.workers == ["0", "1"]
    assert [r.state for r in result.records] == ["complete"] * 4
    out = cfg.sweep.report_dir
    for name in ("trials.csv", "trials.json", "optimization_history.png", "param_importances.png"):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "trials.json").read_text())
    assert data["summary"]["trials"] == 4 and data["summary"]["plots_skipped"] == {}
    assert sum(data["summary"]["trials_per_worker"].values()) == 4
    assert [t["number"] for t in data["trials"]] == [0, 1, 2, 3]
    for trial in data["trials"]:
        assert len(trial["val_accuracy_per_epoch"]) == 2 and trial["worker"] in ("0", "1")
        assert trial["seconds"] > 0 and 0 <= trial["val_accuracy"] <= 1
    csv_lines = (out / "trials.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and "train.lr" in csv_lines[0]

    best = result.best
    assert best.val_accuracy == max(r.val_accuracy or 0 for r in result.records)
    assert report.best_path == out / "best.yaml"
    override = yaml.safe_load(report.best_path.read_text())
    # The override names the profile the sweep ran under (CI runs this after a quick run).
    assert override == {"profile": cfg.profile, **best_overrides(best)}
    assert override["train"]["lr"] == best.params["lr"]
    assert override["train"]["augment"]["max_shift_px"] == best.params["augment.max_shift_px"]
