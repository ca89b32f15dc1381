"""Ingestion and validation timings on the real MNIST files.

    python benchmarks/bench_data.py --source ../shared/mnist --repeats 5 --out docs/bench/data.json

Runs ingest ``--repeats`` times into a temporary directory, validation once per repeat
(it dominates), and times loading the prepared arrays (memory-mapped and fully read).
Reports medians; writes JSON and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from machine import cpu_model, load_average

from pipeline.core.config import DataConfig, load_config
from pipeline.data.dataset import load_split
from pipeline.data.ingest import ingest
from pipeline.data.validate import run_validation


def timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("../shared/mnist"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cfg = load_config(Path("params.yaml"))
    rows: dict[str, list[float]] = {
        "ingest_s": [],
        "validate_s": [],
        "load_mmap_s": [],
        "load_full_s": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = replace(
            DataConfig(),
            source=str(args.source.resolve()),
            raw_dir=root / "raw",
            prepared_dir=root / "prepared",
        )
        vcfg = replace(cfg.validate, stats_path=root / "stats.json", report_dir=root / "report")
        for _ in range(args.repeats):
            rows["ingest_s"].append(timed(lambda: ingest(data)))
            rows["validate_s"].append(timed(lambda: run_validation(data.prepared_dir, vcfg)))
            rows["load_mmap_s"].append(timed(lambda: load_split(data.prepared_dir, "train")))
            rows["load_full_s"].append(
                timed(
                    lambda: np.asarray(
                        load_split(data.prepared_dir, "train", mmap=False).images
                    ).sum()
                )
            )
    result = {
        "machine": {
            "cpu": cpu_model(),
            "load_average": load_average(),
            "python": platform.python_version(),
        },
        "repeats": args.repeats,
        "median": {k: round(statistics.median(v), 4) for k, v in rows.items()},
        "all": {k: [round(x, 4) for x in v] for k, v in rows.items()},
    }
    print("| step | median s |\n|---|---|")
    for key, value in result["median"].items():
        print(f"| {key} | {value} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
