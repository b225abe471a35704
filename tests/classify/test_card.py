"""The model card beside best/: the facts a reader needs, equal to the run's own records."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from medhier.classify.card import CARD_JSON, CARD_MD, _markdown
from medhier.classify.task import CLASSIFY
from medhier.data.cache import CacheInfo
from medhier.train.checkpoint import load_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def card(finished_run):
    return json.loads(Path(finished_run.output, CARD_JSON).read_text()), Path(finished_run.output, CARD_MD).read_text()


def test_the_card_names_the_model_and_its_intended_use(finished_run, card):
    facts, text = card
    loaded = load_checkpoint(finished_run.best, CLASSIFY)
    assert facts["model"]["model_id"] == loaded.model_id and facts["model"]["epoch"] == loaded.epoch
    assert facts["model"]["taxonomy"] == {"normal": ["normal"], "fracture": ["compression", "burst"], "lesion": ["benign", "malignant"]}
    assert "not a diagnosis" in facts["intended_use"]
    # phantoms: said first, and what the model has seen
    assert facts["limitations"][0].startswith("Trained on medhier's synthetic phantoms")
    assert "modality CT; body part LSPINE; manufacturer medhier-phantom" in facts["limitations"][1]
    assert text.startswith(f"# Model card: {loaded.model_id}") and "## Intended use" in text and "not for clinical use" in text


def test_the_training_data_counts_are_the_cache_s(finished_run, card):
    facts, text = card
    data = facts["training_data"]
    split_classes = CacheInfo.read(finished_run.cache, finished_run.cfg.storage).counts["split_classes"]
    assert data["images_per_leaf_and_split"] == {s: split_classes[s] for s in ("train", "val", "test")}
    assert data["images_per_split"] == {s: sum(v.values()) for s, v in split_classes.items()}
    assert sum(data["patients_per_split"].values()) < data["images"] == 240
    assert data["modalities"] == {"CT": 240} and data["manufacturers"] == {"medhier-phantom": 240}
    assert data["study_dates"] == {"first": "20240115", "last": "20240115"} and data["missing_leaves"] == {}
    row = f"| fracture/burst | {split_classes['train']['fracture/burst']} | {split_classes['val']['fracture/burst']} | {split_classes['test']['fracture/burst']} |"
    assert row in text


def test_metrics_calibration_and_referral_are_the_run_s(finished_run, card):
    facts, text = card
    metrics, loaded = finished_run.metrics, load_checkpoint(finished_run.best, CLASSIFY)
    ev = facts["evaluation"]
    assert ev["split"] == "test" and ev["images"] == metrics["n"]
    assert ev["metrics"]["leaf"]["accuracy"] == {"value": metrics["leaf"]["accuracy"], "ci95": metrics["leaf"]["ci"]["accuracy"]}
    assert ev["metrics"]["main"]["roc_auc"]["ci95"] == metrics["main"]["ci"]["macro"]["roc_auc"]
    assert facts["calibration"] == metrics["calibration"]
    assert facts["referral"]["threshold"] == loaded.defaults["score"]["refer_below"]
    assert facts["referral"]["evaluation_coverage"] == metrics["referral"]["coverage"]
    assert facts["config"]["train"]["refer_target_accuracy"] == 0.8
    assert f"Refer below leaf probability {facts['referral']['threshold']:.3f}" in text
    assert f"ECE {metrics['calibration']['ece']['leaf']['before']:.3f} before" in text


def test_the_card_names_the_class_biases_where_calibration_fitted_them(card):
    facts = copy.deepcopy(card[0])
    facts["calibration"]["temperatures"].update(main_bias=[0.5, -1.0, 0.5], sub_bias=[0.0, 0.3, -0.3, -1.0, 1.0])
    text = _markdown(facts)
    assert "class biases (bias-corrected temperature scaling): main [0.5, -1.0, 0.5], leaves [0.0, 0.3, -0.3, -1.0, 1.0]." in text
    assert "class biases" not in _markdown(card[0])  # this run's 72 validation images: temperatures only
