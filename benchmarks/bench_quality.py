"""Quality benchmark: robustness per family and severity, calibration, abstention; 3 recipes.

    python benchmarks/bench_quality.py --seeds 0 1 2 --out docs/bench/quality.json \
        --md docs/bench/quality.md

Recipes, side by side (``--recipes`` picks some):

- ``seed_cnn``: the seed notebook's CNN with its own recipe as far as the repository
  records it (``benchmarks/notebook_baseline.py``): Nesterov SGD lr 0.05, constant
  rate, batch 128, no augmentation, no label smoothing, 3 epochs (about the notebook's
  55 s on this machine), float32;
- ``previous_default``: the default profile before the quality work (cnn width 24,
  5 epochs, affine augmentation only, float32), today's profile ``fast``;
- ``default``: the default profile composed from ``conf/`` (the
  robustness-trained recipe: every augmentation family, outlier exposure, bf16 autocast
  where the CPU has it).

Each (recipe, seed) trains in a fresh subprocess with ``pipeline.training.train.fit`` exactly as
the train stage does (validation split carved from the training set), then
``pipeline.quality.report.assess`` runs on the PyTorch model: the robustness suite on the test
split, temperature fitted on validation (ECE/NLL on test before and after), the
abstention threshold chosen on validation and the non-digit probes. Reads
``data/prepared`` and ``metrics/data_stats.json`` (run ingest + validate first). The
load average is recorded before and after each run: the CPU may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from machine import cpu_model, load_average
from timed_fit import composed_config, fit_timed

from pipeline.core.config import AugmentConfig

ROOT = Path(__file__).resolve().parents[1]

# Every family on a share of the images, and outlier exposure: off.
_NO_EXTRA_FAMILIES = {f"train.augment.{name}.p": 0.0 for name in AugmentConfig().shares()}
RECIPES: dict[str, dict[str, Any]] = {
    # Every recipe composes from conf/ (never the workspace params.yaml, which holds
    # whatever profile ran last): the two baselines from the base values (profile fast).
    "seed_cnn": {
        "profile": "fast",
        "train.model": "seed_cnn",
        "train.epochs": 3,
        "train.batch_size": 128,
        "train.optimizer": "sgd",
        "train.lr": 0.05,
        "train.momentum": 0.9,
        "train.nesterov": True,
        "train.weight_decay": 0.0,
        "train.schedule": "constant",
        "train.label_smoothing": 0.0,
        "train.ema_decay": 0.0,
        "train.augment.enabled": False,
        "train.amp": False,  # float32, as it ran before CPU bf16 autocast
    },
    "previous_default": {
        "profile": "fast",
        "train.model": "cnn",
        "train.width": 24,
        "train.epochs": 5,
        "train.batch_size": 128,
        "train.optimizer": "sgd",
        "train.lr": 0.1,
        "train.momentum": 0.9,
        "train.nesterov": True,
        "train.weight_decay": 0.0005,
        "train.schedule": "onecycle",
        "train.label_smoothing": 0.1,
        "train.ema_decay": 0.0,
        "train.augment.enabled": True,
        "train.augment.max_shift_px": 2.0,
        "train.augment.max_rotation_deg": 10.0,
        "train.augment.scale_range": [0.9, 1.1],
        "train.augment.max_shear": 0.0,
        **_NO_EXTRA_FAMILIES,
        "train.amp": False,
    },
    "default": {"profile": "default"},
}


def worker(
    recipe: str, seed: int, overrides: dict[str, Any], n_images: int | None
) -> dict[str, Any]:
    """Train one (recipe, seed) and assess it; returns a JSON-able dict."""
    import numpy as np

    from pipeline.data.dataset import load_split
    from pipeline.data.holdout import validation_split
    from pipeline.handoff.export import wrap
    from pipeline.quality.report import assess
    from pipeline.quality.robustness import torch_predictor
    from pipeline.training.model_io import LoadedModel

    sets = {**RECIPES[recipe], **overrides, "train.seed": seed}
    cfg = composed_config(ROOT, sets.pop("profile", None), sets)
    run = fit_timed(ROOT, cfg)
    result, tc = run.result, run.train
    load_after_train = load_average()
    val = validation_split(run.arrays, tc)  # the images training held out
    test = load_split(ROOT / cfg.data.prepared_dir, "test", mmap=False)
    model = LoadedModel(result.model, tc.model, tc.width, run.mean, run.std)
    qcfg = replace(cfg.quality, n_images=n_images) if n_images else cfg.quality
    predict = torch_predictor(wrap(model))
    # On every test image, also when the suite runs on the first --n-images only.
    test_accuracy = float(np.mean(predict(test.images).argmax(1) == test.labels))
    t1 = time.perf_counter()
    report = assess(
        predict,
        np.asarray(val.images),
        np.asarray(val.labels),
        test.images,
        test.labels,
        qcfg,
    )
    m = result.metrics
    return {
        "recipe": recipe,
        "seed": seed,
        "overrides": sets,
        "test_accuracy": test_accuracy,
        "suite_clean_accuracy": report.suite.clean_accuracy,
        "val_accuracy": m["val_accuracy"],
        "train_seconds": m["train_seconds"],
        "wall_seconds_incl_setup": round(run.wall_s, 3),
        "images_per_s": m["images_per_second"],
        "per_epoch_images_per_s": [round(r.images_per_second, 1) for r in result.history],
        "epochs": m["epochs"],
        "parameters": m["parameters"],
        "num_threads": result.info["runtime"]["num_threads"],
        "assess_seconds": round(time.perf_counter() - t1, 1),
        "loadavg_before": run.load_before,
        "loadavg_after_train": load_after_train,
        "loadavg_after": load_average(),
        "quality": report.to_dict(),
        "metrics": report.metrics(),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means and minima over seeds of the figures the targets are about."""
    from pipeline.quality.robustness import FAMILY_NAMES

    def mean(key: Any) -> float:
        return statistics.fmean(key(r) for r in runs)

    acc = [r["test_accuracy"] for r in runs]
    fam = {
        f: [
            statistics.fmean(r["metrics"]["robustness"][f][f"s{s}"] for r in runs)
            for s in (1, 2, 3)
        ]
        for f in FAMILY_NAMES
    }
    return {
        "n_seeds": len(runs),
        "test_accuracy_mean": statistics.fmean(acc),
        "test_accuracy_min": min(acc),
        "family_mean_accuracy": fam,
        "worst_family_at_severity_2": min(fam, key=lambda f: fam[f][1]),
        "worst_accuracy_at_severity_2": min(v[1] for v in fam.values()),
        "noise_sigma50_mean": fam["noise"][2],
        "ece_before_mean": mean(lambda r: r["quality"]["calibration"]["ece_before"]),
        "ece_after_mean": mean(lambda r: r["quality"]["calibration"]["ece_after"]),
        "ece_after_max": max(r["quality"]["calibration"]["ece_after"] for r in runs),
        "temperature_mean": mean(lambda r: r["quality"]["calibration"]["temperature"]),
        "target_precision": runs[0]["quality"]["threshold"]["target_precision"],
        "test_coverage_mean": mean(lambda r: r["quality"]["test"]["coverage"]),
        "test_coverage_min": min(r["quality"]["test"]["coverage"] for r in runs),
        "test_precision_mean": mean(lambda r: r["quality"]["test"]["precision"]),
        "probes_flagged_mean": mean(lambda r: r["quality"]["probes"]["flagged_all"]),
        "probes_flagged_min": min(r["quality"]["probes"]["flagged_all"] for r in runs),
        "probes_flagged_by_kind": {
            k: mean(lambda r, k=k: r["quality"]["probes"]["flagged"][k])
            for k in runs[0]["quality"]["probes"]["flagged"]
        },
        "median_train_seconds": statistics.median(r["train_seconds"] for r in runs),
        "max_train_seconds": max(r["train_seconds"] for r in runs),
        "median_images_per_s": statistics.median(r["images_per_s"] for r in runs),
    }


def markdown(summary: dict[str, dict[str, Any]]) -> str:
    """The two tables for docs/benchmarks.md."""
    from pipeline.quality.robustness import FAMILIES

    names = list(summary)
    pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
    lines = [
        "| | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    rows = [
        (
            "clean test accuracy, mean (min)",
            lambda s: f"{pct(s['test_accuracy_mean'])} ({pct(s['test_accuracy_min'])})",
        ),
        (
            "worst family at severity 2",
            lambda s: f"{s['worst_family_at_severity_2']} {pct(s['worst_accuracy_at_severity_2'])}",
        ),
        ("noise sigma 50 (severity 3)", lambda s: pct(s["noise_sigma50_mean"])),
        (
            "ECE before / after temperature",
            lambda s: f"{pct(s['ece_before_mean'])} / {pct(s['ece_after_mean'])}",
        ),
        ("temperature", lambda s: f"{s['temperature_mean']:.2f}"),
        (
            "precision target of the threshold (validation)",
            lambda s: f"{100 * s['target_precision']:g}%",
        ),
        (
            "test coverage at that threshold, mean (min)",
            lambda s: f"{pct(s['test_coverage_mean'])} ({pct(s['test_coverage_min'])})",
        ),
        ("test precision on accepted", lambda s: pct(s["test_precision_mean"])),
        (
            "non-digit probes flagged, mean (min)",
            lambda s: f"{pct(s['probes_flagged_mean'])} ({pct(s['probes_flagged_min'])})",
        ),
        *(
            (f"- probes `{k}` flagged", lambda s, k=k: pct(s["probes_flagged_by_kind"][k]))
            for k in next(iter(summary.values()))["probes_flagged_by_kind"]
        ),
        (
            "train s, median (max)",
            lambda s: f"{s['median_train_seconds']:.0f} ({s['max_train_seconds']:.0f})",
        ),
        ("training images/s, median", lambda s: f"{s['median_images_per_s']:,.0f}"),
    ]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(summary[n]) for n in names) + " |")
    lines += ["", "Accuracy per family and severity (mean over seeds; levels 1 / 2 / 3):", ""]
    lines.append("| family | levels | " + " | ".join(f"`{n}`" for n in names) + " |")
    lines.append("|---|---|" + "---|" * len(names))
    for fam in FAMILIES:
        levels = " / ".join(f"{v:g}" for v in fam.levels)
        cells = [
            " / ".join(f"{100 * a:.1f}" for a in summary[n]["family_mean_accuracy"][fam.name])
            for n in names
        ]
        lines.append(f"| {fam.name} ({fam.unit}) | {levels} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--n-images", type=int, help="test images per perturbed copy (all)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--md", type=Path, help="write the markdown tables here too")
    parser.add_argument("--worker", nargs=2, metavar=("RECIPE", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    import yaml

    overrides = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.sets)}
    if args.worker is not None:
        out = worker(args.worker[0], int(args.worker[1]), overrides, args.n_images)
        print(json.dumps(out))
        return 0

    import torch

    runs: dict[str, list[dict[str, Any]]] = {}
    for recipe in args.recipes:
        for seed in args.seeds:
            cmd = [sys.executable, __file__, "--worker", recipe, str(seed)]
            cmd += [x for s in args.sets for x in ("--set", s)]
            if args.n_images:
                cmd += ["--n-images", str(args.n_images)]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                return proc.returncode
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            runs.setdefault(recipe, []).append(run)
            print(
                f"{recipe} seed {seed}: test {run['test_accuracy']:.4f}, "
                f"worst s2 {run['metrics']['robustness_min_at_severity']:.4f}, "
                f"ECE after {run['quality']['calibration']['ece_after']:.4f}, "
                f"probes flagged {run['quality']['probes']['flagged_all']:.3f}, "
                f"train {run['train_seconds']:.0f} s, load {run['loadavg_before']}",
                file=sys.stderr,
            )
    summary = {name: summarize(rs) for name, rs in runs.items()}
    payload = {
        "seeds": args.seeds,
        "overrides": overrides,
        "n_images": args.n_images,
        "cpu_model": cpu_model(),
        "cpu_count": len(os.sched_getaffinity(0)),
        "torch_version": str(torch.__version__),
        "python": platform.python_version(),
        "recipes": {name: RECIPES[name] for name in runs},
        "summary": summary,
        "runs": runs,
    }
    table = markdown(summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
