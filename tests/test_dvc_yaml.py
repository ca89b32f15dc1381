"""dvc.yaml's metrics and plots: numbers-only metrics files, titled plots, one orientation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import yaml

from pipeline.core.config import load_config
from pipeline.quality.evaluate import CONFUSION_PLOT, confusion_figure

ROOT = Path(__file__).resolve().parents[1]


def _dvc_yaml() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    return data


def _paths(entries: list[Any] | None) -> list[str]:
    out: list[str] = []
    for entry in entries or []:
        out += [entry] if isinstance(entry, str) else list(entry)
    return out


def test_metrics_are_the_dvclive_summaries_only() -> None:
    cfg = load_config(ROOT / "params.yaml")
    declared = [p for s in _dvc_yaml()["stages"].values() for p in _paths(s.get("metrics"))]
    assert sorted(declared) == sorted(
        [
            (cfg.train.live_dir / "metrics.json").as_posix(),
            (cfg.evaluate.live_dir / "metrics.json").as_posix(),
        ]
    )


def test_every_plot_has_a_title_and_axis_labels_and_reads_a_declared_output() -> None:
    dvc = _dvc_yaml()
    outs = [p for s in dvc["stages"].values() for k in ("outs", "plots") for p in _paths(s.get(k))]
    # Images (PNG written by a stage) are listed by path; they carry their own titles.
    images = [entry for entry in dvc["plots"] if isinstance(entry, str)]
    for file in images:
        assert file.endswith(".png"), file
        assert any(file.startswith(o + "/") for o in outs), file
    plots = {
        name: spec
        for entry in dvc["plots"]
        if isinstance(entry, dict)
        for name, spec in entry.items()
    }
    assert plots, "no top-level plots"
    for name, spec in plots.items():
        for key in ("title", "x_label", "y_label", "x", "y"):
            assert spec.get(key), f"plot {name}: no {key}"
        for file in spec["y"]:
            assert any(file == o or file.startswith(o + "/") for o in outs), (name, file)
            # series only: dvclive per-epoch files, dvclive's confusion data, or dvclive
            # custom plots drawn against a named column -- never a per-row table drawn
            # against its row index
            custom = "/plots/custom/" in file and spec["x"] != "step"
            assert "/plots/metrics/" in file or "/plots/sklearn/" in file or custom, (name, file)


def test_confusion_plot_has_actual_down_the_side_like_the_png() -> None:
    cfg = load_config(ROOT / "params.yaml")
    plots = {
        name: spec
        for entry in _dvc_yaml()["plots"]
        if isinstance(entry, dict)
        for name, spec in entry.items()
    }
    spec = plots["confusion"]
    file = (cfg.evaluate.live_dir / "plots" / "sklearn" / f"{CONFUSION_PLOT}.json").as_posix()
    # DVC's confusion template puts x along the bottom and y down the side; confusion_png
    # draws rows = actual (y axis), columns = predicted (x axis).
    assert spec["template"] == "confusion"
    assert spec["x"] == "predicted" and spec["y"] == {file: "actual"}
    assert "predicted" in spec["x_label"] and "actual" in spec["y_label"]
    cm = np.zeros((10, 10), dtype=np.int64)
    cm[3, 8] = 5  # five actual 3s predicted as 8
    fig = confusion_figure(cm, "t")
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted", "actual")
    image = ax.get_images()[0].get_array()
    assert image[3, 8] > 0 and image[8, 3] == 0  # row = actual, column = predicted
    plt.close(fig)
