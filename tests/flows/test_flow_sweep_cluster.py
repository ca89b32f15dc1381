"""The sweep flow on a Dask cluster of separate processes on loopback, as if on other
machines: ``dask scheduler`` plus two ``dask worker`` processes (no nanny, so a killed
worker stays dead). Trials spread over both workers; one worker is SIGKILLed in the
middle of a trial; the sweep still completes with every trial accounted for, the killed
worker's trial re-run on the other worker. Prints the per-worker counts (``-s``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from flows.sweep import hyperparameter_sweep
from pipeline.data.dataset import images_path, labels_path

ROOT = Path(__file__).resolve().parents[2]
DASK = str(Path(sys.executable).parent / "dask")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[str, dict[str, subprocess.Popen[bytes]]]]:
    """A scheduler and workers ``w1``, ``w2`` as separate processes (logs under tmp_path)."""
    address = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str, argv: list[str]) -> None:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)

    port = address.rsplit(":", 1)[1]
    start("scheduler", [DASK, "scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"])
    for name in ("w1", "w2"):
        start(
            name,
            [DASK, "worker", address, "--name", name, "--nthreads", "1", "--no-nanny",
             "--no-dashboard", "--host", "127.0.0.1"],
        )  # fmt: skip
    from distributed import Client

    with Client(address, timeout=60) as c:
        c.wait_for_workers(2, timeout=120)
    try:
        yield address, procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for name, proc in procs.items():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            print(f"{name} exit status {proc.returncode}")


class Killer(threading.Thread):
    """SIGKILLs ``victim`` while it runs its second trial (it then has one finished)."""

    def __init__(self, address: str, victim: str, proc: subprocess.Popen[bytes]) -> None:
        super().__init__(daemon=True)
        self.address, self.victim, self.proc = address, victim, proc
        self.killed_key: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        from distributed import Client

        seen: list[str] = []
        with Client(self.address, timeout=30) as client:
            while not self.stop.is_set():
                names = {a: str(w["name"]) for a, w in client.scheduler_info()["workers"].items()}
                for addr, keys in client.processing().items():
                    if names.get(addr) != self.victim:
                        continue
                    for key in keys:
                        if str(key).startswith("trial-") and key not in seen:
                            seen.append(str(key))
                    current = set(map(str, keys))
                    # Its first trial finished, a later one running now.
                    if len(seen) >= 2 and seen[0] not in current and seen[-1] in current:
                        time.sleep(1.0)  # into its first epochs
                        if seen[-1] in map(str, client.processing().get(addr, ())):
                            os.kill(self.proc.pid, signal.SIGKILL)
                            self.killed_key = seen[-1]
                            return
                time.sleep(0.1)


def test_sweep_survives_a_killed_worker_on_a_loopback_cluster(
    prefect_harness: None,
    cluster: tuple[str, dict[str, subprocess.Popen[bytes]]],
    mnist_prepared: Path,
    tmp_path: Path,
) -> None:
    address, procs = cluster
    repo = tmp_path / "repo"
    prepared = repo / "data" / "prepared"
    prepared.mkdir(parents=True)
    shutil.copyfile(ROOT / "params.yaml", repo / "params.yaml")
    for path in (images_path, labels_path):
        np.save(path(prepared, "train"), np.load(path(mnist_prepared, "train"))[:3000])
    stats = repo / "metrics" / "data_stats.json"
    stats.parent.mkdir()
    stats.write_text(json.dumps({"normalization": {"mean": 0.1307, "std": 0.3081}}))

    killer = Killer(address, "w2", procs["w2"])
    killer.start()
    try:
        summary = hyperparameter_sweep(
            trials=6,
            parallelism=2,
            space={"lr": {"low": 0.02, "high": 0.3, "log": True}},
            dask_address=address,
            params={
                "train.val_size": 500,
                "train.width": 4,
                "train.epochs": 3,
                "sweep.pruner": "none",
            },
            repo=str(repo),
        )
    finally:
        killer.stop.set()
        killer.join(timeout=30)

    trials = json.loads((repo / "reports" / "sweep" / "trials.json").read_text())["trials"]
    print("\nworkers:", summary["workers"])
    print("trials per worker (finished there):", summary["trials_per_worker"])
    print("killed w2 while it ran", killer.killed_key)
    print("retried trials:", summary["retried_trials"])
    for t in trials:
        print(f"  trial {t['number']}: {t['state']} on {t['worker']}, attempts {t['attempts']}, "
              f"{t['seconds']} s, val acc {t['val_accuracy']}")  # fmt: skip

    assert killer.killed_key is not None, "the worker was never killed mid-trial"
    assert procs["w2"].poll() == -signal.SIGKILL
    assert summary["workers"] == ["w1", "w2"]
    # Every trial accounted for, all completed; both workers ran trials.
    assert [t["number"] for t in trials] == list(range(6))
    assert [t["state"] for t in trials] == ["complete"] * 6
    assert summary["trials_per_worker"]["w2"] >= 1 and summary["trials_per_worker"]["w1"] >= 1
    assert sum(summary["trials_per_worker"].values()) == 6
    # The trial killed on w2 was re-run on w1 and finished there.
    killed_number = int(killer.killed_key.split("-")[1])
    [retried] = [r for r in summary["retried_trials"] if r["number"] == killed_number]
    assert retried["attempts"][0] == "w2" and retried["attempts"][-1] == "w1", retried
    assert trials[killed_number]["worker"] == "w1"
    # After the kill only w1 is left: the later trials all ran there.
    assert all(t["worker"] == "w1" for t in trials if t["number"] > killed_number)
