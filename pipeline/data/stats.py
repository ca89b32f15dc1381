"""Dataset statistics: per-split counts, class histograms, pixel moments, image summaries.

Pixel moments come from the exact 256-bin histogram of pixel values, so the mean and
std of 47M pixels cost one ``np.bincount`` and no float copy of the data. Values are
on the ``[0, 1]`` scale (pixel / 255), which is what training normalises with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from pipeline.core.contract import NUM_CLASSES
from pipeline.core.errors import SourceError
from pipeline.core.json_io import read_json
from pipeline.data.dataset import SPLITS, SplitArrays, load_split

INTENSITY_BINS = 16
# Bin edges of the per-image mean intensity, for drift: fine where MNIST lives.
IMAGE_MEAN_EDGES: tuple[float, ...] = (*np.round(np.linspace(0.0, 0.5, 26), 4).tolist(), 1.0)
_SMOOTH = 1e-4  # keeps reference weights non-zero so KL stays finite


def pixel_histogram(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
    """Counts of each pixel value 0..255 over the whole array: ``(256,) int64``."""
    return np.bincount(np.asarray(images, dtype=np.uint8).ravel(), minlength=256).astype(np.int64)


def moments(hist: npt.NDArray[np.int64]) -> tuple[float, float]:
    """Mean and (population) std of pixel/255 from a 256-bin histogram."""
    values = np.arange(256, dtype=np.float64) / 255.0
    n = hist.sum()
    mean = float((hist * values).sum() / n)
    var = float((hist * (values - mean) ** 2).sum() / n)
    return mean, var**0.5


def split_stats(arrays: SplitArrays) -> dict[str, Any]:
    """Statistics of one split (JSON-ready)."""
    labels = np.asarray(arrays.labels)
    hist = pixel_histogram(arrays.images)
    mean, std = moments(hist)
    class_counts = np.bincount(labels, minlength=NUM_CLASSES)
    coarse = hist.reshape(INTENSITY_BINS, -1).sum(axis=1) / hist.sum()
    return {
        "count": len(arrays),
        "class_counts": {str(c): int(class_counts[c]) for c in range(NUM_CLASSES)},
        "labels_out_of_range": int((labels >= NUM_CLASSES).sum()),
        "pixel_mean": round(mean, 6),
        "pixel_std": round(std, 6),
        "intensity_hist": [round(float(v), 6) for v in coarse],
    }


def image_summary(arrays: SplitArrays, split: str) -> pd.DataFrame:
    """One row per image: split, label, mean, std, min, max, ink (fraction of pixels > 0.5).

    Pixel statistics are on the [0, 1] scale. Computed in 10k-image chunks as float32.
    """
    parts = []
    for start in range(0, len(arrays), 10_000):
        x = np.asarray(arrays.images[start : start + 10_000], dtype=np.float32)
        x = x.reshape(x.shape[0], -1) / 255.0
        parts.append(
            pd.DataFrame(
                {
                    "mean": x.mean(axis=1, dtype=np.float64),
                    "std": x.std(axis=1, dtype=np.float64),
                    "min": x.min(axis=1).astype(np.float64),
                    "max": x.max(axis=1).astype(np.float64),
                    "ink": (x > 0.5).mean(axis=1, dtype=np.float64),
                }
            )
        )
    frame = pd.concat(parts, ignore_index=True)
    frame.insert(0, "label", np.asarray(arrays.labels, dtype=np.int64))
    frame.insert(0, "split", split)
    return frame


def compute_stats(prepared_dir: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """Statistics JSON and the per-image summary table of both splits."""
    stats: dict[str, Any] = {}
    frames = []
    for split in SPLITS:
        arrays = load_split(prepared_dir, split)
        stats[split] = split_stats(arrays)
        frames.append(image_summary(arrays, split))
    stats["normalization"] = {
        "mean": stats["train"]["pixel_mean"],
        "std": stats["train"]["pixel_std"],
        "source": "train split, pixel/255",
    }
    return stats, pd.concat(frames, ignore_index=True)


def distribution(values: npt.ArrayLike, edges: tuple[float, ...]) -> list[float]:
    """Smoothed, normalised histogram of ``values`` over ``edges``."""
    counts, _ = np.histogram(np.asarray(values, dtype=np.float64), bins=np.asarray(edges))
    weights = counts / max(counts.sum(), 1) + _SMOOTH
    return [float(w) for w in weights / weights.sum()]


def build_reference_profile(table: pd.DataFrame) -> dict[str, Any]:
    """The drift reference: class and per-image-intensity distributions per split."""
    profile: dict[str, Any] = {"format": "mnist-mlops/reference-profile-v1", "splits": {}}
    for split, part in table.groupby("split"):
        counts = np.bincount(part["label"].to_numpy(), minlength=NUM_CLASSES)[:NUM_CLASSES]
        profile["splits"][split] = {
            "labels": {
                "values": list(range(NUM_CLASSES)),
                "weights": [float(w) for w in counts / counts.sum()],
            },
            "image_mean": {
                "bins": list(IMAGE_MEAN_EDGES),
                "weights": distribution(part["mean"], IMAGE_MEAN_EDGES),
            },
        }
    return profile


def read_stats(stats_path: Path) -> dict[str, Any]:
    return read_json(stats_path, "dataset statistics", "run the validate stage first")


def read_normalization(stats_path: Path) -> tuple[float, float]:
    """``(mean, std)`` of training pixels on the [0, 1] scale, as computed by validate."""
    norm = read_stats(stats_path).get("normalization")
    if not isinstance(norm, dict) or not {"mean", "std"} <= norm.keys():
        raise SourceError(f"{stats_path}: no 'normalization' mean/std; re-run the validate stage")
    return float(norm["mean"]), float(norm["std"])
