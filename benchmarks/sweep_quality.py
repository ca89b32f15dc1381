"""Issue 13's quality sweep: the ``hyperparameter-sweep`` flow on full data, at most ~60 min.

    python benchmarks/sweep_quality.py            # -> reports/sweep/ (best.yaml, trials, plots)

Then retrain the best configuration and the default side by side with 3 seeds on the test
split, which the sweep never reads (the ``--set`` values are those of ``best.yaml``):

    python benchmarks/bench_train.py --seeds 0 1 2 --set train.width=20 ... --out best.json
    python benchmarks/bench_train.py --seeds 0 1 2 --out default.json

The space is ``sweep.space`` narrowed so that every configuration retrains within the
default profile's 5-minute budget on two CPU cores (width <= 32, at most 5 epochs).
Needs ``data/prepared`` and ``metrics/data_stats.json`` (``dvc repro validate``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

SPACE = {
    "lr": {"low": 0.04, "high": 0.25, "log": True},
    "width": {"low": 20, "high": 32, "step": 4},
    "epochs": {"choices": [4, 5]},
    "weight_decay": {"low": 0.0001, "high": 0.002, "log": True},
    "label_smoothing": {"low": 0.0, "high": 0.15},
    "batch_size": {"choices": [64, 128, 256]},
    "augment.max_shift_px": {"low": 0.0, "high": 3.0},
    "augment.max_rotation_deg": {"low": 0.0, "high": 15.0},
}
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from flows.sweep import hyperparameter_sweep

    t0 = time.time()
    # No new trial after 55 min; the running ones finish (one trial is 5-10 min).
    summary = hyperparameter_sweep(
        trials=18,
        space=SPACE,
        profile="default",
        params={"sweep.timeout_s": 3300},
        repo=str(ROOT),
    )
    print(f"sweep wall {time.time() - t0:.0f} s")
    print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":  # Dask's worker processes import this file again
    main()
