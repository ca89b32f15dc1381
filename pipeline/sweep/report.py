"""The files of a finished sweep, in ``sweep.report_dir`` (replaced as a whole).

- ``trials.csv``: one row per trial (number, state, val_accuracy, epochs, seconds,
  worker, attempts, retried, error, then one ``train.<key>`` column per searched setting);
  ``val_accuracy_per_epoch`` is ``;``-separated.
- ``trials.json``: the same trials (per-epoch lists kept as lists) plus a summary: best
  trial, counts per state and per worker, retried trials, wall time, trials per minute.
- ``optimization_history.png`` and ``param_importances.png`` (Optuna's matplotlib
  plots); the summary lists a plot that was not drawn and why (e.g. one completed trial).
- ``best.yaml``: the best trial's values as a params override (``train: {lr: ...}``),
  applied with ``python -m pipeline sweep-apply <report_dir>/best.yaml``.
"""

from __future__ import annotations

import csv
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.atomic import write_json, write_text
from pipeline.core.dirswap import atomic_dir
from pipeline.sweep.search import SweepResult, TrialRecord, best_overrides

BEST_FILE = "best.yaml"


@dataclass(frozen=True)
class SweepReport:
    report_dir: Path
    rows: list[dict[str, Any]]  # one flat row per trial (the CSV, the Prefect table)
    summary: dict[str, Any]
    best_path: Path | None  # None when no trial completed


def trial_row(r: TrialRecord, keys: list[str]) -> dict[str, Any]:
    """One trial as a flat, CSV/table-ready mapping."""
    row: dict[str, Any] = {
        "number": r.number,
        "state": r.state,
        "val_accuracy": None if r.val_accuracy is None else round(r.val_accuracy, 5),
        "epochs": len(r.val_accuracy_per_epoch),
        "val_accuracy_per_epoch": ";".join(f"{v:.5f}" for v in r.val_accuracy_per_epoch),
        "seconds": r.seconds,
        "worker": r.worker,
        "attempts": ";".join(r.attempts),
        "retried": r.retried,
        "error": r.error,
    }
    for key in keys:
        value = r.params.get(key)
        row[f"train.{key}"] = round(value, 6) if isinstance(value, float) else value
    return row


def summarize(result: SweepResult) -> dict[str, Any]:
    states: dict[str, int] = {}
    for r in result.records:
        states[r.state] = states.get(r.state, 0) + 1
    done = [r for r in result.records if r.state == "complete"]
    minutes = result.wall_seconds / 60
    out: dict[str, Any] = {
        "trials": len(result.records),
        "states": states,
        "workers": result.workers,
        "parallelism": result.parallelism,
        "trials_per_worker": result.trials_per_worker(),
        "retried_trials": [
            {"number": r.number, "attempts": r.attempts, "resubmitted": r.resubmitted}
            for r in result.records
            if r.retried
        ],
        "wall_seconds": round(result.wall_seconds, 2),
        "trials_per_minute": round(len(result.records) / minutes, 2) if minutes > 0 else None,
        "best": None,
    }
    if done:
        best = result.best
        out["best"] = {
            "number": best.number,
            "val_accuracy": best.val_accuracy,
            "params": {f"train.{k}": v for k, v in sorted(best.params.items())},
        }
    return out


def _plots(result: SweepResult, out_dir: Path) -> dict[str, str]:
    """Draw Optuna's plots into ``out_dir``; returns ``{plot: reason}`` for those not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.exceptions import ExperimentalWarning
    from optuna.visualization import matplotlib as ovm

    skipped: dict[str, str] = {}
    complete = [r for r in result.records if r.state == "complete"]
    plots = {
        "optimization_history.png": lambda: ovm.plot_optimization_history(
            result.study, target_name="val accuracy"
        ),
        "param_importances.png": lambda: ovm.plot_param_importances(
            result.study, target_name="val accuracy"
        ),
    }
    for name, draw in plots.items():
        if name == "param_importances.png" and len(complete) < 2:
            skipped[name] = f"needs 2 completed trials, have {len(complete)}"
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            axes = draw()
        fig = axes.get_figure(root=True)
        assert fig is not None
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
    return skipped


def best_yaml(result: SweepResult, profile: str) -> str:
    best = result.best
    header = (
        f"# Best trial {best.number} of {len(result.records)}: val accuracy "
        f"{best.val_accuracy:.5f} (validation split, not test).\n"
        f"# Apply as a DVC experiment: python -m pipeline sweep-apply <this file>\n"
    )
    # The profile the sweep ran under: its other settings are part of what was measured.
    tree = {"profile": profile, **best_overrides(best)}
    return header + yaml.safe_dump(tree, sort_keys=True)


def write_sweep_reports(result: SweepResult, report_dir: Path, profile: str) -> SweepReport:
    """Write every file listed in the module docstring; ``report_dir`` is replaced whole."""
    report_dir = Path(report_dir)
    keys = sorted({k for r in result.records for k in r.params})
    rows = [trial_row(r, keys) for r in result.records]
    summary = summarize(result)
    with atomic_dir(report_dir) as tmp:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["number"])
        writer.writeheader()
        writer.writerows(rows)
        write_text(tmp / "trials.csv", buf.getvalue())
        summary["plots_skipped"] = _plots(result, tmp)
        trials = [
            {**row, "val_accuracy_per_epoch": r.val_accuracy_per_epoch, "params": r.params}
            for row, r in zip(rows, result.records, strict=True)
        ]
        write_json(tmp / "trials.json", {"summary": summary, "trials": trials})
        if summary["best"] is not None:
            write_text(tmp / BEST_FILE, best_yaml(result, profile))
    best_path = report_dir / BEST_FILE if summary["best"] is not None else None
    return SweepReport(report_dir, rows, summary, best_path)
