"""Training benchmark: test accuracy, training time, throughput and peak RSS per seed.

    python benchmarks/bench_train.py --profile default --seeds 0 1 2 --out docs/bench/train.json
    python benchmarks/bench_train.py --profile quick --seeds 0 1 2 --out docs/bench/train_quick.json

Each seed runs in a fresh subprocess (so peak RSS and timings are per run) that trains
with ``pipeline.training.train.fit`` exactly as the train stage does (val split carved from
the training set, checkpoints written to a temp dir), then measures accuracy on the TEST
split, which training never sees. Reads ``data/prepared`` and ``metrics/data_stats.json``
(run ingest + validate first). Records ``/proc/loadavg`` before and after every run
because the CPU may be shared; reports medians. ``--set key=value`` overrides params
(YAML values), e.g. ``--set train.num_threads=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from machine import cpu_model, load_average
from timed_fit import composed_config, fit_timed

ROOT = Path(__file__).resolve().parents[1]


def worker(profile: str, seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Train one seed and evaluate on the test split; returns a JSON-able dict."""
    import torch

    from pipeline.data.dataset import load_split
    from pipeline.training.train import loss_and_accuracy

    cfg = composed_config(ROOT, profile, {**overrides, "train.seed": seed})
    run = fit_timed(ROOT, cfg)
    result = run.result
    test = load_split(ROOT / cfg.data.prepared_dir, "test", mmap=False)
    test_loss, test_acc = loss_and_accuracy(
        result.model,
        torch.from_numpy(test.images),
        torch.from_numpy(test.labels).long(),
        run.mean,
        run.std,
        1000,
    )
    m = result.metrics
    return {
        "seed": seed,
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "val_accuracy": m["val_accuracy"],
        "train_seconds": m["train_seconds"],
        "wall_seconds_incl_setup": round(run.wall_s, 3),
        "images_per_s": m["images_per_second"],
        "peak_rss_mib": m["peak_rss_mib"],
        "epochs": m["epochs"],
        "parameters": m["parameters"],
        "num_threads": result.info["runtime"]["num_threads"],
        "loadavg_before": run.load_before,
        "loadavg_after": load_average(),
        "per_epoch_images_per_s": [round(r.images_per_second, 1) for r in result.history],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import yaml

    overrides = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.sets)}
    if args.worker is not None:
        print(json.dumps(worker(args.profile, args.worker, overrides)))
        return 0

    import torch

    runs = []
    for seed in args.seeds:
        cmd = [sys.executable, __file__, "--profile", args.profile, "--worker", str(seed)]
        cmd += [x for s in args.sets for x in ("--set", s)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(json.dumps(run), file=sys.stderr)

    accs = [r["test_accuracy"] for r in runs]
    summary = {
        "profile": args.profile,
        "overrides": overrides,
        "seeds": args.seeds,
        "cpu_model": cpu_model(),
        "cpu_count": len(os.sched_getaffinity(0)),
        "torch_version": str(torch.__version__),
        "python": platform.python_version(),
        "test_accuracy_mean": statistics.fmean(accs),
        "test_accuracy_min": min(accs),
        "median_train_seconds": statistics.median(r["train_seconds"] for r in runs),
        "median_images_per_s": statistics.median(r["images_per_s"] for r in runs),
        "max_peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "runs": runs,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print("| seed | test acc | val acc | train s | img/s | peak RSS MiB | load before/after |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(
            f"| {r['seed']} | {r['test_accuracy']:.4f} | {r['val_accuracy']:.4f} "
            f"| {r['train_seconds']:.1f} | {r['images_per_s']:.0f} | {r['peak_rss_mib']:.0f} "
            f"| {r['loadavg_before']} / {r['loadavg_after']} |"
        )
    print(
        f"mean test acc {summary['test_accuracy_mean']:.4f} (min {min(accs):.4f}), "
        f"median train {summary['median_train_seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
