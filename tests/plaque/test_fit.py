"""``medhier plaque fit`` on the frozen phantom cohort (1,000 patients, tests.plaque.cohort):
held-out patients, the boosted model against the mean predictor and ridge on every factor, the
intervals' coverage, and every output a user reads."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
import yaml

from medhier.cli import main
from medhier.config import Config, StorageConfig
from medhier.plaque.model import PredictionModel
from tests.plaque.cohort import PATIENTS_CSV, VISITS

pytestmark = pytest.mark.ray


def test_the_boosted_model_beats_mean_and_ridge_on_every_learnable_factor(cohort_fit):
    """Figures on the frozen cohort's 154 test patients (203 pairs), R² mean / ridge / xgboost:
    wall 0.372 vs 0.357, stenosis 0.217 vs 0.201, lipid 0.666 vs 0.664, haemorrhage 0.675 vs
    0.406 (the rate is an interaction, IPH x risk, which no linear model holds), cap 0.379 vs
    0.364, relative lipid 0.567 vs 0.558; the mean predictor is at about 0. The phantoms' rates
    are linear in the covariates except haemorrhage's, so ridge is nearly the right model for
    five of six factors and the trees, which start from it, add little there."""
    summary, _ = cohort_fit
    factors = summary.metrics["factors"]
    assert all(f["learnable"] for f in factors.values()), {n: f["test"]["xgboost"]["r2"] for n, f in factors.items()}
    for name, f in factors.items():
        r2 = {model: f["test"][model]["r2"] for model in ("mean", "ridge", "xgboost")}
        assert r2["xgboost"] > r2["ridge"] and r2["xgboost"] > r2["mean"] + 0.15, (name, r2)
        assert f["test"]["xgboost"]["rmse"] <= f["test"]["ridge"]["rmse"], name
        assert f["best"] == "xgboost" and f["test"]["xgboost"]["n"] >= 200
    assert factors["haemorrhage_change_mm3_per_year"]["test"]["xgboost"]["r2"] > factors["haemorrhage_change_mm3_per_year"]["test"]["ridge"]["r2"] + 0.2


def test_interval_coverage_on_held_out_patients_is_within_5_points(cohort_fit):
    summary, _ = cohort_fit
    coverage = summary.metrics["interval_coverage"]
    assert coverage["stated"] == 0.9 and coverage["n"] > 1200
    assert abs(coverage["test"] - 0.9) <= 0.05, coverage
    # Per factor ~200 test pairs and ~190 calibration pairs: a binomial spread of ~3 points each.
    for name, f in summary.metrics["factors"].items():
        assert abs(f["interval"]["test_coverage"] - 0.9) <= 0.08, (name, f["interval"])


def test_every_output_is_written_and_the_split_is_by_patient(cohort_fit):
    summary, output = cohort_fit
    for name in ("metrics.json", "predicted_vs_true.png", "feature_importance.png", "config.yaml", "change_factors.parquet"):
        assert os.path.getsize(os.path.join(output, name)) > 0, name
    for png in ("predicted_vs_true.png", "feature_importance.png"):
        with open(os.path.join(output, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    resolved = Config.from_dict(yaml.safe_load(open(os.path.join(output, "config.yaml"))))
    assert list(resolved.predict.factors) == list(summary.metrics["factors"])
    model = PredictionModel.load(summary.model, StorageConfig())
    assert model.model_id == summary.model_id == json.load(open(os.path.join(output, "metrics.json")))["model_id"]

    examples = pq.read_table(os.path.join(output, "examples.parquet")).to_pylist()
    splits: dict[str, set] = {}
    for row in examples:
        splits.setdefault(row["patient_key"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits.values())  # no patient in two splits
    sizes = summary.metrics["splits"]
    assert sum(s["pairs"] for s in sizes.values()) == len(examples) == pq.read_table(os.path.join(output, "change_factors.parquet")).num_rows
    assert sum(s["patients"] for s in sizes.values()) == len(splits) == 1000


@pytest.mark.parametrize("patients_text, message", [
    ("patient_key,sex,bmi\nk,F,21\n", "column 'bmi' is not a covariate of predict.covariates"),
    ("patient_key,sex\nk,F\n", "no column 'age_years'"),
], ids=["unknown-column", "missing-covariate"])
def test_a_bad_patients_file_fails_at_start_up_naming_the_column(tmp_path, capsys, patients_text, message):
    patients = tmp_path / "patients.csv"
    patients.write_text(patients_text)
    code = main(["plaque", "fit", "--measurements", VISITS, "--patients", str(patients), "--output", str(tmp_path / "out")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_measurements_are_named(tmp_path, capsys):
    code = main(["plaque", "fit", "--measurements", str(tmp_path / "none"), "--patients", PATIENTS_CSV, "--output", str(tmp_path / "o")])
    assert code == 2 and f"measurements '{tmp_path / 'none'}' not found" in capsys.readouterr().err
