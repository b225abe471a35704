"""After training, on phantoms: temperatures and a referral threshold fitted on the validation
split and stored in best/, and the evaluation that shows what they do on the test split
(calibration error, risk-coverage, bootstrap intervals) — one run shared by every test
(tests/trained.py: an over-confident model, as small medical models are)."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from medhier import columns as C
from medhier.classify.labels import LEAF_INDEX, MAIN_INDEX
from medhier.classify.calibration import BIAS_MIN_IMAGES, Temperatures
from medhier.classify.metrics import evaluate, hierarchical_predictions
from medhier.classify.posthoc import calibrated, fit_posthoc, predict_splits
from medhier.classify.report import P_LEAF, PRED_LEAF
from medhier.classify.task import CLASSIFY, taxonomy_of
from medhier.data.cache import CacheInfo
from medhier.data.splits import split_key
from medhier.train.checkpoint import config_for_checkpoint, load_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def held_out(finished_run):
    """What the predictor (the model actor, as scoring runs it) says of the validation and test images."""
    return predict_splits(finished_run.best, finished_run.cache, finished_run.cfg, ["val", "test"])


def test_temperatures_are_fitted_and_the_weights_stay(finished_run):
    """Fails when calibration leaves the temperatures at 1: the over-confident model needs T > 1."""
    loaded = load_checkpoint(finished_run.best, CLASSIFY)
    t = loaded.task_meta["temperatures"]
    assert abs(math.log(t["main"])) > 0.05 and abs(math.log(t["sub"])) > 0.05, t
    assert t["main"] > 1  # over-confident: softened
    assert loaded.model_id == finished_run.model_id  # the weights are the harness's
    assert finished_run.posthoc["temperatures"] == t and finished_run.metrics["calibration"]["temperatures"] == t


def test_calibration_at_least_halves_the_calibration_error_on_the_test_split(finished_run):
    ece = finished_run.metrics["calibration"]["ece"]
    assert finished_run.metrics["split"] == "test"
    for level in ("main", "leaf"):
        before, after = ece[level]["before"], ece[level]["after"]
        assert after <= max(0.5 * before, 0.03), f"{level}: ECE {before:.3f} -> {after:.3f}"
        assert ece[level]["classwise_after"] < ece[level]["classwise_before"]


def test_accuracy_rises_as_coverage_falls(finished_run):
    curve = finished_run.metrics["referral"]["curve"]
    coverage, accuracy = np.array(curve["coverage"]), np.array(curve["accuracy"])
    assert coverage[-1] == 1.0 and accuracy[-1] == pytest.approx(finished_run.metrics["referral"]["accuracy_all"], abs=1e-4)
    # the most confident half is more often right than all, the most confident quarter more still
    half, quarter = accuracy[coverage <= 0.5][-1], accuracy[coverage <= 0.25][-1]
    assert quarter >= half > accuracy[-1]


def test_the_referral_threshold_reaches_the_target_on_validation(finished_run, held_out):
    loaded = load_checkpoint(finished_run.best, CLASSIFY)
    referral = loaded.task_meta["referral"]
    assert referral["target_accuracy"] == 0.8 and referral["reached"]
    assert loaded.defaults == {"score": {"refer_below": referral["threshold"]}}
    assert config_for_checkpoint(finished_run.cfg, loaded).score.refer_below == referral["threshold"]
    # The predictor's own (calibrated) answers on the validation split, kept at the threshold.
    val = held_out["val"]
    leaf_prob = val[P_LEAF][np.arange(len(val[PRED_LEAF])), val[PRED_LEAF]]
    kept = leaf_prob >= referral["threshold"]
    assert kept.mean() == pytest.approx(referral["coverage"], abs=1e-6)
    assert (val[PRED_LEAF][kept] == val[LEAF_INDEX][kept]).mean() >= 0.8
    # The test split at the same threshold: what metrics.json reports.
    test = finished_run.metrics["referral"]
    assert test["threshold"] == referral["threshold"] and 0 < test["coverage"] < 1
    assert test["accuracy_kept"] > test["accuracy_all"]


def test_metrics_carry_patient_bootstrap_intervals_around_the_point_estimates(finished_run, held_out):
    metrics = json.loads(Path(finished_run.output, "metrics.json").read_text())
    test = held_out["test"]
    patients = {split_key({C.PATIENT_KEY: k, C.STUDY_INSTANCE_UID: s}, p) for k, s, p in zip(test[C.PATIENT_KEY], test[C.STUDY_INSTANCE_UID], test[C.PATH])}
    assert metrics["bootstrap"] == {"level": 0.95, "samples": 300, "patients": len(patients), "seed": 0}
    assert metrics["n"] == len(test[LEAF_INDEX]) > len(patients)  # several images per patient
    for level in ("main", "leaf"):
        lo, hi = metrics[level]["ci"]["accuracy"]
        assert lo <= metrics[level]["accuracy"] <= hi and hi - lo > 0
        lo, hi = metrics[level]["ci"]["macro"]["roc_auc"]
        assert lo <= metrics[level]["macro"]["roc_auc"] <= hi


def test_the_reported_metrics_are_those_of_the_calibrated_probabilities(finished_run, held_out):
    test = held_out["test"]
    p_main, p_leaf = (test[k].astype(np.float64) for k in ("p_main", "p_leaf"))
    again = evaluate(taxonomy_of(load_checkpoint(finished_run.best, CLASSIFY)), test[MAIN_INDEX], test[LEAF_INDEX],
                     p_main / p_main.sum(1, keepdims=True), p_leaf / p_leaf.sum(1, keepdims=True))
    assert again["leaf"]["accuracy"] == finished_run.metrics["leaf"]["accuracy"]
    assert again["main"]["macro"]["roc_auc"] == pytest.approx(finished_run.metrics["main"]["macro"]["roc_auc"], abs=1e-6)


def test_every_split_holds_every_leaf_and_the_plots_are_written(finished_run):
    counts = CacheInfo.read(finished_run.cache, finished_run.cfg.storage).counts
    assert counts["missing_classes"] == {}
    assert all(len(per_leaf) == 5 and all(per_leaf.values()) for per_leaf in counts["split_classes"].values())
    for name in ("reliability_main.png", "reliability_leaf.png", "risk_coverage.png", "confusion_leaf.png"):
        assert Path(finished_run.output, "plots", name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.path.exists(os.path.join(finished_run.output, "metrics.json"))


def test_auto_calibration_fits_no_class_biases_on_a_small_validation_split(finished_run):
    t = load_checkpoint(finished_run.best, CLASSIFY).task_meta["temperatures"]
    assert set(t) == {"main", "sub"}  # 72 validation images: fewer than BIAS_MIN_IMAGES
    assert any(f"fewer than the {BIAS_MIN_IMAGES}" in note for note in finished_run.posthoc["notes"])


def test_class_biases_reach_the_checkpoint_and_the_predictor(finished_run, held_out, tmp_path):
    """train.calibration=temperature_bias: the biases fitted on the validation split are stored in
    best/ and the predictor (the model actor) answers with them: its probabilities are the raw
    ones tempered and shifted, its predictions their hierarchical argmax."""
    best = str(tmp_path / "best")
    shutil.copytree(finished_run.best, best)
    cfg = copy.deepcopy(finished_run.cfg)
    cfg.train.calibration = "temperature_bias"
    posthoc = fit_posthoc(best, finished_run.cache, cfg, val=held_out["val"])
    loaded = load_checkpoint(best, CLASSIFY)
    t = Temperatures.from_meta(loaded.task_meta)
    tax = taxonomy_of(loaded)
    assert posthoc.temperatures == t.to_dict() and len(t.main_bias) == tax.num_mains and len(t.sub_bias) == tax.num_leaves
    assert max(map(abs, t.main_bias)) > 0.01 and loaded.model_id == finished_run.model_id
    val = predict_splits(best, finished_run.cache, cfg, ["val"])["val"]
    p_main, p_leaf = calibrated(val, t, tax)
    np.testing.assert_allclose(val["p_leaf"], p_leaf, atol=1e-5)
    pred_main, pred_leaf = hierarchical_predictions(tax, p_main, p_leaf)
    assert np.array_equal(val[PRED_LEAF], pred_leaf) and np.array_equal(val["pred_main"], pred_main)
    # fitted on these images by maximum likelihood: a better NLL than one temperature per level
    plain = calibrated(val, Temperatures.from_meta(load_checkpoint(finished_run.best, CLASSIFY).task_meta), tax)[1]
    nll = [-np.log(p[np.arange(len(p)), val[LEAF_INDEX]]).mean() for p in (p_leaf, plain)]
    assert nll[0] < nll[1]
