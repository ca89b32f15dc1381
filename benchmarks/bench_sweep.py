"""Sweep throughput: trials per minute on Dask, 1 and 2 workers, embedded and on loopback.

    python benchmarks/bench_sweep.py --prepared data/prepared --trials 8 --out docs/bench/sweep.json

Every configuration runs the SAME trials (enqueued, fixed learning rates, no pruning,
``--samples`` real training images, width ``--width``, ``--epochs`` epochs) through
:func:`pipeline.sweep.search.run_sweep`, side by side in one run:

- ``local 1x1``: LocalCluster, 1 worker process with 1 thread (1 torch thread per trial);
- ``local 1x1, 2 torch threads``: 1 worker, one trial at a time, 2 torch threads (the
  second core used inside each trial instead of by a second trial);
- ``local 2x1``: LocalCluster, 2 worker processes with 1 thread each;
- ``loopback 1x1`` / ``loopback 2x1``: ``dask scheduler`` + ``dask worker`` processes
  on 127.0.0.1 (``--no-nanny``), as if on other machines.

Trials per minute counts from the first submission to the last result; cluster start,
the data scatter and the per-worker warm-up are reported separately. Writes JSON and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from machine import cpu_model, load_average

from pipeline.core.config import config_from_dict, to_dict
from pipeline.sweep.cluster import dask_client
from pipeline.sweep.search import SweepData, load_sweep_data, make_study, run_sweep

ROOT = Path(__file__).resolve().parents[1]
DASK = str(Path(sys.executable).parent / "dask")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def loopback_cluster(workers: int, log_dir: Path) -> Iterator[str]:
    """``dask scheduler`` and ``workers`` ``dask worker`` processes; yields the address."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argvs = [[DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"]]
    argvs += [
        [DASK, "worker", address, "--name", f"w{i + 1}", "--nthreads", "1", "--no-nanny",
         "--no-dashboard", "--host", "127.0.0.1"]
        for i in range(workers)
    ]  # fmt: skip
    procs = []
    try:
        for i, argv in enumerate(argvs):
            log = open(log_dir / f"proc{i}.log", "wb")  # noqa: SIM115 - lives with the process
            procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env))
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def one_run(
    name: str, cfg: Any, data: SweepData, lrs: list[float], address: str | None
) -> dict[str, Any]:
    load_before = load_average()
    t0 = time.perf_counter()
    with dask_client(cfg.sweep, address) as client:
        if address is not None:
            client.wait_for_workers(cfg.sweep.local_workers, timeout=120)
        started = time.perf_counter() - t0
        study = make_study(cfg.sweep)
        for lr in lrs:
            study.enqueue_trial({"lr": lr})
        t1 = time.perf_counter()
        result = run_sweep(client, cfg, data, study=study)
        total = time.perf_counter() - t1
    states = [r.state for r in result.records]
    row = {
        "config": name,
        "workers": len(result.workers),
        "parallelism": result.parallelism,
        "trials": len(result.records),
        "states": {s: states.count(s) for s in set(states)},
        "trials_per_worker": result.trials_per_worker(),
        "cluster_start_s": round(started, 2),
        "scatter_and_warm_up_s": round(total - result.wall_seconds, 2),
        "trials_wall_s": round(result.wall_seconds, 2),
        "trials_per_minute": round(len(result.records) / result.wall_seconds * 60, 2),
        "median_trial_s": sorted(r.seconds or 0.0 for r in result.records)[len(lrs) // 2],
        "load_before": load_before,
        "load_after": load_average(),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--stats", type=Path, default=Path("metrics/data_stats.json"))
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="configs to run (default: all)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    raw = {
        "data": {"prepared_dir": str(args.prepared)},
        "validate": {"stats_path": str(args.stats)},
        "train": {
            "max_train_samples": args.samples,
            "val_size": args.samples // 5,
            "width": args.width,
            "epochs": args.epochs,
        },
        "sweep": {
            "trials": args.trials,
            "pruner": "none",
            "connect_timeout_s": 60,
            "space": {"lr": {"low": 0.01, "high": 0.5, "log": True}},
        },
    }
    base = config_from_dict(raw)
    data = load_sweep_data(base)
    lrs = [round(0.03 + 0.02 * i, 3) for i in range(args.trials)]
    configs: list[tuple[str, dict[str, Any], bool]] = [
        ("local 1x1", {"local_workers": 1, "trial_threads": 1}, False),
        # One trial at a time using both cores inside torch (intra-op threads).
        (
            "local 1x1, 2 torch threads",
            {"local_workers": 1, "trial_threads": 2, "parallelism": 1},
            False,
        ),
        ("local 2x1", {"local_workers": 2, "trial_threads": 1}, False),
        ("loopback 1x1", {"local_workers": 1, "trial_threads": 1}, True),
        ("loopback 2x1", {"local_workers": 2, "trial_threads": 1}, True),
    ]
    rows = []
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-sweep-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    for name, sweep, loopback in configs:
        if args.only and name not in args.only:
            continue
        cfg = config_from_dict(raw, {f"sweep.{k}": v for k, v in sweep.items()})
        if loopback:
            with loopback_cluster(sweep["local_workers"], log_dir) as address:
                rows.append(one_run(name, cfg, data, lrs, address))
        else:
            rows.append(one_run(name, cfg, data, lrs, None))

    result = {
        "benchmark": "sweep",
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "settings": {
            "trials": args.trials,
            "samples": args.samples,
            "val_size": args.samples // 5,
            "width": args.width,
            "epochs": args.epochs,
            "learning_rates": lrs,
            "train": to_dict(base.train),
        },
        "runs": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print()
    print("| configuration | trials at a time | trials/min | median trial s | start s | load |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['parallelism']} | {r['trials_per_minute']} | "
            f"{r['median_trial_s']:.1f} | {r['cluster_start_s'] + r['scatter_and_warm_up_s']:.0f}"
            f" | {r['load_before'][0]} -> {r['load_after'][0]} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
