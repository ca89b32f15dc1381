"""Tests of pipeline/quality/evaluate.py: metric arithmetic, report files, the stage runner."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.atomic import sha256_file
from pipeline.core.config import Config
from pipeline.data.dataset import dataset_version, load_split
from pipeline.quality.calibration import fit_temperature
from pipeline.quality.evaluate import (
    compute_metrics,
    confusion_matrix,
    run_evaluate_stage,
    worst_mistakes,
)
from pipeline.quality.robustness import FAMILY_NAMES
from pipeline.training.model_io import load_model_file, save_model_file, torch_logits
from pipeline.training.models import build_model
from tests.helpers.models import constant_module

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def one_hot_logits(pred: list[int], scale: float = 5.0) -> np.ndarray:
    z = np.zeros((len(pred), 10), dtype=np.float32)
    z[np.arange(len(pred)), pred] = scale
    return z


def test_confusion_matrix_counts_actual_by_predicted() -> None:
    cm = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0])
    assert cm.shape == (10, 10)
    assert cm[0, 0] == 1 and cm[0, 1] == 1 and cm[1, 1] == 1
    assert cm[2, 2] == 2 and cm[2, 0] == 1
    assert cm.sum() == 6


def test_confusion_matrix_rejects_out_of_range_labels() -> None:
    with pytest.raises(ValueError, match="0..9"):
        confusion_matrix([0, 10], [0, 1])


def test_metrics_by_construction() -> None:
    labels = [0, 0, 1, 1, 2]
    pred = [0, 1, 1, 1, 1]
    res = compute_metrics(one_hot_logits(pred), labels)
    assert res.n == 5 and res.errors == 2
    assert res.accuracy == pytest.approx(3 / 5)
    # class 1: predicted 4 times, right twice; all 2 actual 1s found.
    assert res.precision[1] == pytest.approx(2 / 4)
    assert res.recall[1] == pytest.approx(1.0)
    assert res.f1[1] == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert res.recall[0] == pytest.approx(0.5) and res.precision[0] == pytest.approx(1.0)
    # class 2 is never predicted, class 5 never occurs: 0, never NaN.
    assert res.precision[2] == 0.0 and res.recall[2] == 0.0
    assert res.support[5] == 0 and res.f1[5] == 0.0
    assert res.support == (2, 2, 1, 0, 0, 0, 0, 0, 0, 0)


def test_loss_is_mean_cross_entropy() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 10)).astype(np.float32) * 3
    labels = rng.integers(0, 10, size=64)
    want = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels))
    assert compute_metrics(logits, labels).loss == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (np.zeros((3, 9), np.float32), [0, 1, 2], "logits must be"),
        (np.zeros((2, 10), np.float32), [0, 1, 2], "logits must be"),
        (np.zeros((0, 10), np.float32), [], "empty"),
        (np.full((1, 10), np.nan, np.float32), [0], "NaN"),
    ],
)
def test_compute_metrics_rejects_bad_input(
    logits: np.ndarray, labels: list[int], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        compute_metrics(logits, labels)


def test_worst_mistakes_most_confident_first() -> None:
    labels = [0, 0, 0, 0]
    logits = np.zeros((4, 10), np.float32)
    logits[0, 0] = 9  # right
    logits[1, 3] = 1  # wrong, unsure
    logits[2, 5] = 8  # wrong, confident
    logits[3, 2] = 4  # wrong, middling
    assert worst_mistakes(logits, labels, 10).tolist() == [2, 3, 1]
    assert worst_mistakes(logits, labels, 2).tolist() == [2, 3]


def test_run_evaluate_stage_writes_every_output(stage_cfg: Config, tiny_prepared: Path) -> None:
    cfg = replace(stage_cfg, evaluate=replace(stage_cfg.evaluate, batch_size=32, n_mistakes=8))
    save_model_file(cfg.train.model_path, constant_module(3), "mlp", 32, 0.13, 0.31)
    labels = np.asarray(load_split(tiny_prepared, "test").labels)

    metrics = run_evaluate_stage(cfg)

    live = cfg.evaluate.live_dir
    on_disk = json.loads((live / "metrics.json").read_text())
    assert on_disk == metrics

    # DVC metrics hold numbers only: hashes and names live in run.json.
    def leaves(tree: dict) -> list:  # type: ignore[type-arg]
        return [x for v in tree.values() for x in (leaves(v) if isinstance(v, dict) else [v])]

    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in leaves(on_disk))
    assert on_disk["accuracy"] == pytest.approx(float(np.mean(labels == 3)))
    # logits are 1 for class 3, 0 elsewhere: CE = log(e + 9) - [label == 3].
    assert on_disk["loss"] == pytest.approx(np.log(9 + np.e) - np.mean(labels == 3), rel=1e-5)

    run = json.loads(cfg.evaluate.run_info_path.read_text())
    assert run["n"] == len(labels)
    assert run["errors"] == int(np.sum(labels != 3))
    assert run["model_sha256"] == sha256_file(cfg.train.model_path)
    assert run["dataset_version"] == dataset_version(tiny_prepared)

    per_class = json.loads(cfg.evaluate.per_class_path.read_text())
    assert sorted(per_class, key=int) == [str(c) for c in range(10)]
    assert per_class["3"]["recall"] == 1.0
    assert per_class["3"]["support"] == int(np.sum(labels == 3))

    # dvclive's confusion plot data: one row per image, labels as strings.
    rows = json.loads((live / "plots" / "sklearn" / "confusion_matrix.json").read_text())
    assert [int(r["actual"]) for r in rows] == labels.tolist()
    assert {r["predicted"] for r in rows} == {"3"}
    # Nothing else in the dvclive directory: no per-step series for a single evaluation.
    files = sorted(p.relative_to(live).as_posix() for p in live.rglob("*") if p.is_file())
    assert files == [
        "metrics.json",
        "plots/custom/reliability.json",
        "plots/custom/robustness.json",
        "plots/images/reliability.png",
        "plots/images/robustness.png",
        "plots/sklearn/confusion_matrix.json",
    ]
    # Quality: every family at every severity, calibration before/after, abstention.
    assert set(on_disk["robustness"]) == set(FAMILY_NAMES)
    assert {"ece_before", "ece_after", "nll_before", "nll_after"} <= set(on_disk["calibration"])
    assert {"threshold", "test_coverage", "probes_flagged"} <= set(on_disk["abstention"])
    quality = json.loads(cfg.evaluate.quality_path.read_text())
    assert quality["model_sha256"] == run["model_sha256"]
    assert quality["temperature"] > 0
    assert round(quality["confidence_threshold"], 6) == on_disk["abstention"]["threshold"]
    assert "| noise (" in cfg.evaluate.quality_card_path.read_text()

    for png in (cfg.evaluate.confusion_png, cfg.evaluate.mistakes_png):
        assert png.read_bytes().startswith(PNG_MAGIC)


def test_quality_fits_on_validation_and_changes_nothing_under_data(
    stage_cfg: Config, tiny_prepared: Path
) -> None:
    """The temperature and threshold come from the held-out training images (never the
    test split), and the whole evaluation leaves the prepared dataset byte for byte."""
    from pipeline.data.holdout import validation_split

    before = {p.name: p.read_bytes() for p in tiny_prepared.iterdir()}
    torch.manual_seed(4)
    save_model_file(stage_cfg.train.model_path, build_model("mlp", 8).eval(), "mlp", 8, 0.13, 0.31)
    run_evaluate_stage(stage_cfg)
    assert {p.name: p.read_bytes() for p in tiny_prepared.iterdir()} == before

    quality = json.loads(stage_cfg.evaluate.quality_path.read_text())
    val = validation_split(load_split(tiny_prepared, "train"), stage_cfg.train)
    logits = torch_logits(load_model_file(stage_cfg.train.model_path), np.asarray(val.images))
    assert quality["report"]["calibration"]["n_fit"] == len(val) == stage_cfg.train.val_size
    assert quality["temperature"] == pytest.approx(fit_temperature(logits, val.labels))


def test_evaluate_keeps_the_old_outputs_when_logging_fails(
    stage_cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dvclive directory is swapped in whole: a failure mid-way leaves the old one."""
    import dvclive

    live = stage_cfg.evaluate.live_dir
    live.mkdir(parents=True)
    (live / "metrics.json").write_text('{"accuracy": 0.5}')

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(dvclive.Live, "log_sklearn_plot", broken)
    save_model_file(stage_cfg.train.model_path, constant_module(3), "mlp", 32, 0.13, 0.31)
    with pytest.raises(OSError, match="disk full"):
        run_evaluate_stage(stage_cfg)
    assert (live / "metrics.json").read_text() == '{"accuracy": 0.5}'
    leftovers = [p.name for p in live.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []
