"""Abstention: threshold choice on validation, coverage, and the non-digit probes."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.quality.abstention import (
    PROBES,
    choose_threshold,
    make_probes,
    probe_report,
    selective,
)
from tests.helpers.synthetic_digits import make_images


def test_threshold_reaches_the_target_with_the_largest_coverage() -> None:
    conf = np.array([0.99, 0.98, 0.97, 0.96, 0.95, 0.90, 0.80])
    correct = np.array([1, 1, 1, 1, 0, 1, 0], dtype=bool)
    t = choose_threshold(conf, correct, target_precision=0.8)
    # Prefixes: 4/4, 4/5=0.8, 5/6=0.83, 5/7=0.71 -> six accepted.
    assert t.threshold == 0.90 and t.coverage == pytest.approx(6 / 7) and t.achievable
    assert t.precision == pytest.approx(5 / 6)
    strict = choose_threshold(conf, correct, target_precision=1.0)
    assert strict.threshold == 0.96 and strict.precision == 1.0


def test_ties_are_never_split() -> None:
    conf = np.array([0.9, 0.9, 0.9, 0.5])
    correct = np.array([1, 0, 1, 1], dtype=bool)
    t = choose_threshold(conf, correct, target_precision=0.99)
    assert not t.achievable and t.threshold == 0.9 and t.coverage == 0.75


def test_selective_matches_the_choice() -> None:
    rng = np.random.default_rng(0)
    conf = rng.random(1000)
    correct = rng.random(1000) < conf  # higher confidence, more often right
    t = choose_threshold(conf, correct, 0.95)
    s = selective(conf, correct, t.threshold)
    assert s.coverage == pytest.approx(t.coverage) and s.precision == pytest.approx(t.precision)


def test_probes_are_seeded_non_digits_and_leave_the_source_alone() -> None:
    src = make_images(50, seed=1)
    before = src.copy()
    a = make_probes(src, 40, seed=0)
    b = make_probes(src, 40, seed=0)
    assert np.array_equal(src, before)
    assert tuple(a) == PROBES
    for name in PROBES:
        assert a[name].shape == (40, 28, 28) and a[name].dtype == np.uint8
        assert np.array_equal(a[name], b[name])
    assert (a["blank"].reshape(40, -1).std(1) == 0).all()
    # Shuffling keeps each image's ink; occlusion removes most of it.
    assert np.isin(
        np.sort(a["shuffled"].reshape(40, -1), 1).sum(1), np.sort(src.reshape(50, -1), 1).sum(1)
    ).all()
    assert a["occluded"].astype(int).sum() < 0.5 * src[:40].astype(int).sum() * 40 / 40


def test_probe_report_counts_low_confidence() -> None:
    probes = make_probes(make_images(20, seed=2), 10, seed=0)

    def predict(images: np.ndarray) -> np.ndarray:
        # Confident only on images with a bright pixel somewhere.
        p = np.full((len(images), 10), 0.1)
        p[images.reshape(len(images), -1).max(1) > 250, 0] = 0.99
        return p

    report = probe_report(predict, probes, threshold=0.5)
    assert set(report.flagged) == set(PROBES)
    assert report.flagged["uniform_noise"] == 0.0  # always has a pixel > 250
    assert 0 <= report.flagged_all <= 1 and report.n_per_probe == 10
