"""Referral: who is referred, the risk-coverage curve and the threshold that reaches a target accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from medhier.classify.referral import Referral, refer, risk_coverage, risk_coverage_png, threshold_for_accuracy
from medhier.config import load_config

# Five images, most confident first; the third and fifth are wrong.
CONFIDENCE = np.array([0.95, 0.90, 0.80, 0.70, 0.40])
CORRECT = np.array([True, True, False, True, False])


@pytest.mark.parametrize("p_leaf, below, margin, expected", [
    # leaf probability under the threshold
    ([[0.9, 0.1], [0.55, 0.45], [0.3, 0.7]], 0.6, 0.0, [False, True, False]),
    # the two best leaves too close (0.10 and 0.40 apart)
    ([[0.9, 0.1], [0.55, 0.45], [0.3, 0.7]], 0.0, 0.2, [False, True, False]),
    ([[0.5, 0.4, 0.1], [0.8, 0.15, 0.05]], 0.0, 0.15, [True, False]),
    # both rules: either refers (the first by probability, the second by margin)
    ([[0.45, 0.2, 0.35], [0.52, 0.0, 0.48], [0.9, 0.05, 0.05]], 0.48, 0.05, [True, True, False]),
    # both off: nobody
    ([[0.34, 0.33, 0.33]], 0.0, 0.0, [False]),
])
def test_refer_by_probability_or_margin(p_leaf, below, margin, expected):
    p_leaf = np.array(p_leaf)
    leaf_prob = p_leaf.max(1)
    assert refer(p_leaf, leaf_prob, Referral(below, margin)).tolist() == expected


@pytest.mark.parametrize("overrides, expected", [
    ([], Referral(0.0, 0.0)),  # null without a checkpoint default: no probability referral
    (["score.refer_below=0.7", "score.refer_margin=0.1"], Referral(0.7, 0.1)),
])
def test_referral_comes_from_the_score_section(overrides, expected):
    assert Referral.of(load_config(None, overrides)) == expected


def test_risk_coverage_keeps_the_most_confident_first():
    curve = risk_coverage(CONFIDENCE, CORRECT)
    assert curve["coverage"] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert curve["accuracy"] == [1.0, 1.0, pytest.approx(2 / 3, abs=1e-4), 0.75, 0.6]
    assert curve["threshold"] == CONFIDENCE.tolist()


def test_images_of_equal_confidence_are_kept_or_dropped_together():
    curve = risk_coverage(np.array([0.9, 0.7, 0.7, 0.5]), np.array([True, False, True, True]))
    assert curve["coverage"] == [0.25, 0.75, 1.0]
    assert curve["accuracy"] == [1.0, pytest.approx(2 / 3, abs=1e-4), 0.75]


def test_a_long_curve_is_written_at_about_101_points():
    rng = np.random.default_rng(0)
    curve = risk_coverage(rng.random(5000), rng.random(5000) < 0.8)
    assert 90 <= len(curve["coverage"]) <= 101 and curve["coverage"][-1] == 1.0


@pytest.mark.parametrize("target, threshold, coverage, accuracy, reached", [
    (0.6, 0.0, 1.0, 0.6, True),  # every image together reaches it: refer none
    (0.75, 0.70, 0.8, 0.75, True),  # keep the four most confident
    (0.9, 0.90, 0.4, 1.0, True),  # keep two
    (1.0, 0.90, 0.4, 1.0, True),
])
def test_threshold_is_the_lowest_that_reaches_the_target(target, threshold, coverage, accuracy, reached):
    found = threshold_for_accuracy(CONFIDENCE, CORRECT, target)
    assert found == {"threshold": threshold, "coverage": coverage, "accuracy": accuracy, "reached": reached}
    kept = CONFIDENCE >= found["threshold"]
    assert CORRECT[kept].mean() >= target


def test_an_unreachable_target_refers_everything():
    found = threshold_for_accuracy(np.array([0.9, 0.8]), np.array([False, True]), 0.95)
    assert found["reached"] is False and found["coverage"] == 0.0
    assert refer(np.array([[0.9, 0.1], [0.8, 0.2]]), np.array([0.9, 0.8]), Referral(found["threshold"])).all()


def test_risk_coverage_png_is_a_png(tmp_path):
    path = risk_coverage_png(tmp_path / "rc.png", {"test": (CONFIDENCE, CORRECT)}, threshold=0.7, target=0.75)
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
