"""Bootstrap intervals: resampled by patient, the same metric definitions as evaluate(), a weighted AUC equal to scikit-learn's."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medhier.classify.bootstrap import _weighted_auc, bootstrap_intervals
from medhier.classify.metrics import evaluate
from medhier.classify.taxonomy import Taxonomy

TAX = Taxonomy.from_dict({"normal": ["normal"], "fracture": ["compression", "burst"], "lesion": ["benign", "malignant"]})


def _data(patients: int, per_patient: int, seed: int = 0, skill: float = 1.5):
    """Images of ``patients`` patients (one leaf each, ``per_patient`` images), scored by a
    model of the given skill -> (patient keys, main_true, leaf_true, p_main, p_leaf)."""
    rng = np.random.default_rng(seed)
    leaf = np.repeat(rng.integers(0, TAX.num_leaves, patients), per_patient)
    logits = rng.normal(size=(len(leaf), TAX.num_leaves))
    logits[np.arange(len(leaf)), leaf] += skill
    p_leaf = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    p_main = p_leaf @ TAX.leaf_mask.T.astype(float)
    keys = np.repeat([f"P{i}" for i in range(patients)], per_patient)
    return keys, TAX.leaf_main[leaf], leaf, p_main, p_leaf


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_auc_equals_scikit_learn_with_sample_weights(seed):
    rng = np.random.default_rng(seed)
    positive = rng.random(200) < 0.3
    score = np.round(rng.random(200) + 0.4 * positive, 1)  # rounded: many ties
    weights = rng.integers(0, 4, (5, 200)).astype(float)
    expected = [roc_auc_score(positive, score, sample_weight=w) for w in weights]
    np.testing.assert_allclose(_weighted_auc(weights, positive, score), expected, atol=1e-12)


def test_intervals_hold_the_point_estimates():
    data = _data(patients=120, per_patient=3)
    ci = bootstrap_intervals(TAX, *data, samples=400, seed=0)
    point = evaluate(TAX, *data[1:])
    assert ci["patients"] == 120 and ci["samples"] == 400 and ci["level"] == 0.95
    for level in ("main", "leaf"):
        lo, hi = ci[level]["accuracy"]
        assert lo < point[level]["accuracy"] < hi
        for metric in ("sensitivity", "specificity", "roc_auc"):
            lo, hi = ci[level]["macro"][metric]
            assert lo <= point[level]["macro"][metric] <= hi, (level, metric)
        for name, per_class in ci[level]["per_class"].items():
            lo, hi = per_class["sensitivity"]
            assert lo <= point[level]["per_class"][name]["sensitivity"] <= hi


def test_patients_not_images_are_resampled():
    """Ten copies of each patient's image carry no more information than one: the patient
    bootstrap gives the same interval for both, where an image bootstrap would shrink it ~3x."""
    keys, main, leaf, p_main, p_leaf = _data(patients=80, per_patient=1, seed=3)
    once = bootstrap_intervals(TAX, keys, main, leaf, p_main, p_leaf, samples=300, seed=5)
    tenfold = bootstrap_intervals(TAX, *(np.repeat(a, 10, axis=0) for a in (keys, main, leaf, p_main, p_leaf)), samples=300, seed=5)
    assert once["main"]["accuracy"] == tenfold["main"]["accuracy"]
    assert once["leaf"]["macro"] == tenfold["leaf"]["macro"]


@pytest.mark.parametrize("patients, samples", [(1, 200), (30, 0)])
def test_no_interval_without_patients_to_resample_or_resamples(patients, samples):
    assert bootstrap_intervals(TAX, *_data(patients=patients, per_patient=4), samples=samples) == {}


def test_same_seed_same_intervals():
    data = _data(patients=40, per_patient=2)
    assert bootstrap_intervals(TAX, *data, samples=100, seed=7) == bootstrap_intervals(TAX, *data, samples=100, seed=7)
