"""``medhier plaque predict`` end to end from DICOM on Ray: each phantom patient's latest visit
measured and predicted with the model fitted on the frozen cohort (other patients), the rates
against the phantoms' true rates; incremental (a new visit, a changed record) and crash-safe
through the ledger."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medhier import columns as C
from medhier.classify.task import CLASSIFY
from medhier.cli import main
from medhier.config import StorageConfig, load_config
from medhier.infer.ledger import Ledger
from medhier.plaque.measure import MEASUREMENTS
from medhier.plaque.model import load_model
from medhier.plaque.patients import read_patients
from medhier.plaque.predict import LEDGER_KEY, predict_archive
from medhier.plaque.seg_task import PLAQUE_SEG
from medhier.train.checkpoint import load_checkpoint, save_checkpoint
from tests.plaque.phantoms import cfg, copy_archive
from tests.plaque.test_api import CrashOnVisit

SMOKE = str(Path(__file__).parents[2] / "configs" / "smoke.yaml")

pytestmark = pytest.mark.ray


def _rows(output: str) -> list[dict]:
    return Ledger(output, StorageConfig(), key=LEDGER_KEY).report().to_pylist()


@pytest.fixture(scope="module")
def predicted(carotid_archive, cohort_fit, tmp_path_factory, ray_session):
    """One run through the command line on the session's phantom archive (3 patients, 7
    visits, and a broken patient with no SEG and no record)."""
    _, fit_output = cohort_fit
    out = str(tmp_path_factory.mktemp("predict") / "out")
    root = carotid_archive.root
    code = main(["plaque", "predict", "--archive", root, "--patients", os.path.join(root, "patients.csv"), "--model", fit_output,
                 "--output", out, "runtime.progress=false", "plaque.register=false", "data.decode_batch_size=64"])
    assert code == 0
    return out


def test_each_patient_gets_one_row_for_the_latest_visit(predicted, carotid_archive, cohort_fit):
    rows = _rows(predicted)
    truth = pq.read_table(os.path.join(carotid_archive.root, "truth.parquet")).to_pylist()
    latest = {}
    for t in truth:
        if t["visit"] > latest.get(t["patient_key"], {"visit": 0})["visit"]:
            latest[t["patient_key"]] = t
    ok = [r for r in rows if r[C.STATUS] == C.STATUS_OK]
    assert len(rows) == 4 and len(ok) == 3
    (broken,) = [r for r in rows if r[C.STATUS] != C.STATUS_OK]
    assert broken[C.ERROR_REASON] == "no_segmentation" and broken["wall_thickening_mm_per_year"] is None
    model = load_model(cohort_fit[0].model, StorageConfig())
    for row in ok:
        visit = latest[row[C.PATIENT_KEY]]
        assert row[C.STUDY_INSTANCE_UID] == visit["study_instance_uid"] and row["visit_number"] == visit["visit"]
        for m in MEASUREMENTS:  # the truth SEG, measured
            assert (row[m] is None and math.isnan(visit[m])) or row[m] == pytest.approx(visit[m], rel=1e-9, abs=1e-9), m
        assert row[C.MODEL_ID] == model.model_id and row["segmentation_model_id"] == "seg:archive" and row["coverage"] == 0.9
        for factor in model.factors:
            assert row[f"{factor}_lower"] < row[factor] < row[f"{factor}_upper"], factor


def test_predicted_rates_match_the_true_rates_within_the_reported_error(predicted, carotid_archive, cohort_fit):
    """The phantoms' true rates (truth_rates.parquet, noise-free of measurement) against the
    job's predictions from DICOM: each within 2.5 x the factor's held-out RMSE in metrics.json,
    and most inside their 90 % interval."""
    summary, _ = cohort_fit
    rows = {r[C.PATIENT_KEY]: r for r in _rows(predicted) if r[C.STATUS] == C.STATUS_OK}
    true = pq.read_table(os.path.join(carotid_archive.root, "truth_rates.parquet")).to_pylist()
    inside, checked = 0, 0
    for patient in true:
        row = rows[patient["patient_key"]]
        for factor, f in summary.metrics["factors"].items():
            if factor not in patient:
                continue  # the relative lipid rate has no truth column
            error = abs(row[factor] - patient[factor])
            assert error <= 2.5 * f["test"]["xgboost"]["rmse"], (factor, row[factor], patient[factor])
            inside += row[f"{factor}_lower"] <= patient[factor] <= row[f"{factor}_upper"]
            checked += 1
    assert checked == 15 and inside >= 12


def test_a_new_visit_or_a_changed_record_is_predicted_alone_and_a_crash_leaves_nothing(carotid_archive, cohort_fit, tmp_path):
    _, fit_output = cohort_fit
    root = copy_archive(carotid_archive, str(tmp_path / "archive"))
    held_back = tmp_path / "V03"
    shutil.move(os.path.join(root, "P0001", "V03"), held_back)
    patients, out = os.path.join(root, "patients.csv"), str(tmp_path / "out")
    truth = pq.read_table(os.path.join(root, "truth.parquet")).to_pylist()
    key2 = carotid_archive.plans[1].key()
    victim = max((t for t in truth if t["patient_key"] == key2), key=lambda t: t["visit"])["study_instance_uid"]  # a latest visit
    with pytest.raises(Exception, match="injected crash"):
        predict_archive(cfg(), root, patients, fit_output, out, source=CrashOnVisit(victim))
    assert not os.path.exists(os.path.join(out, "report"))  # nothing visible

    first = predict_archive(cfg(), root, patients, fit_output, out)
    assert (first.predicted, first.ok, first.already_predicted) == (4, 3, 0)
    assert [r["visit_number"] for r in _rows(out) if r[C.PATIENT_KEY] == carotid_archive.plans[0].key()] == [2]

    shutil.move(held_back, os.path.join(root, "P0001", "V03"))  # P0001's third visit arrives
    with open(patients) as f:
        records = list(csv.DictReader(f))
    records[1]["age_years"] = str(int(records[1]["age_years"]) + 15)  # P0002's record is corrected
    with open(patients, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    second = predict_archive(cfg(), root, patients, fit_output, out)
    assert (second.predicted, second.already_predicted) == (2, 2)
    rows = _rows(out)
    p1 = [r for r in rows if r[C.PATIENT_KEY] == carotid_archive.plans[0].key()]
    assert sorted(r["visit_number"] for r in p1) == [2, 3]  # the earlier prediction stays: the history
    p2 = sorted((r for r in rows if r[C.PATIENT_KEY] == records[1]["patient_key"]), key=lambda r: r[C.SCORED_AT])
    assert len(p2) == 2 and p2[0][C.STUDY_INSTANCE_UID] == p2[1][C.STUDY_INSTANCE_UID]
    assert p2[0]["stenosis_change_pct_per_year"] != p2[1]["stenosis_change_pct_per_year"]  # age moves the prediction


def test_the_model_s_covariates_decide_what_a_record_needs(cohort_fit, tmp_path, carotid_archive, capsys):
    _, fit_output = cohort_fit
    model = load_model(fit_output, StorageConfig())
    records = read_patients(os.path.join(carotid_archive.root, "patients.csv"), model.space.covariate_specs, StorageConfig())
    assert records.num_rows == 3
    bad = tmp_path / "patients.parquet"
    pq.write_table(records.drop_columns(["smoking"]).append_column("smoker", pa.array([True] * 3)), bad)
    code = main(["plaque", "predict", "--archive", carotid_archive.root, "--patients", str(bad), "--model", fit_output,
                 "--output", str(tmp_path / "out")])
    assert code == 2 and "column 'smoker' is not a covariate" in capsys.readouterr().err
    assert not np.isnan(model.quantile["stenosis_change_pct_per_year"])


@pytest.fixture(scope="module")
def seg_predicted(seg_run, cohort_fit, tmp_path_factory):
    """The session's trained segmentation model as the source (--seg-checkpoint) on its own
    phantom archive (6 patients and a broken folder), predicted with the cohort's model."""
    out = str(tmp_path_factory.mktemp("seg-predict") / "out")
    root = seg_run.phantom.root
    summary = predict_archive(cfg(), root, os.path.join(root, "patients.csv"), cohort_fit[1], out, seg_checkpoint=seg_run.checkpoint)
    return summary, _rows(out)


# What the session's model segments well (lumen and outer wall: held-out Dice > 0.85): the
# measurements made of them. The plaque components are not learnt at CI size (seg_trained.py).
WALL_MEASUREMENTS = ("lumen_volume_mm3", "vessel_volume_mm3", "wall_volume_mm3", "reference_lumen_area_mm2", "stenosis_area_pct",
                     "mean_wall_thickness_mm", "max_wall_thickness_mm")


@pytest.mark.slow  # the session's trained segmentation model (seg_run)
def test_the_segmentation_model_segments_each_latest_visit_within_its_measured_error(seg_predicted, seg_run, cohort_fit):
    """--seg-checkpoint with a real model: every phantom patient's latest visit segmented,
    measured and predicted; the measurements of the model's label maps against those of the
    truth SEGs: over the visits, the mean relative error within twice the model's own held-out
    mean relative error (train-seg's metrics.json) or 10 %, and no visit off by half (a wrong vessel or
    an empty label map would be; an extreme such as the maximum wall thickness moves by a third
    between two CPU trainings of this small model)."""
    summary, rows = seg_predicted
    seg_id = load_checkpoint(seg_run.checkpoint, PLAQUE_SEG, seg_run.cfg.storage).model_id
    with open(os.path.join(seg_run.output, "metrics.json")) as f:
        held_out = json.load(f)["measurements"]
    truth = pq.read_table(os.path.join(seg_run.phantom.root, "truth.parquet")).to_pylist()
    latest = {}
    for t in truth:
        if t["visit"] > latest.get(t["patient_key"], {"visit": 0})["visit"]:
            latest[t["patient_key"]] = t
    ok = {r[C.PATIENT_KEY]: r for r in rows if r[C.STATUS] == C.STATUS_OK}
    assert set(ok) == set(latest) and summary.ok == len(latest) and summary.segmentation_model_id == seg_id
    # the broken folder's study: T2w forms no volume, and the model needs it
    assert [r[C.ERROR_REASON] for r in rows if r[C.STATUS] != C.STATUS_OK] == ["missing_sequence"]
    model = load_model(cohort_fit[0].model, StorageConfig())
    relative = {m: [] for m in WALL_MEASUREMENTS}
    for key, row in ok.items():
        visit = latest[key]
        assert row[C.STUDY_INSTANCE_UID] == visit["study_instance_uid"] and row["segmentation_model_id"] == seg_id
        assert row[C.MODEL_VERSION].startswith(f"{seg_id}|") and row["segmentation_format"] == "plaque-seg"
        assert row["n_slices"] == visit["n_slices"]
        for m in WALL_MEASUREMENTS:
            relative[m].append(abs(row[m] - visit[m]) / abs(visit[m]))
        for factor in model.factors:
            assert row[f"{factor}_lower"] < row[factor] < row[f"{factor}_upper"], factor
    for m, errors in relative.items():
        # The held-out error comes from the test split's 2 visits: a noisy reference (0.024 for the
        # lumen volume in one CI run, where these 6 visits averaged 0.054); under 10 % it no
        # longer bounds anything, so the bound is twice it or 10 %, whichever is larger.
        assert np.mean(errors) <= max(2 * held_out[m]["mean_rel_error"], 0.10), (m, errors, held_out[m])
        assert max(errors) < 0.5, (m, errors)


def _classifier_checkpoint(directory: str) -> str:
    smoke = load_config(SMOKE, ["preprocess.image_size=32", "model.head_channels=16", "model.hidden=16"])
    save_checkpoint(directory, CLASSIFY.build_model(smoke).eval(), smoke, CLASSIFY, epoch=0)
    return directory


@pytest.mark.parametrize("checkpoint, overrides, message", [
    ("classifier", [], "holds a 'classify' model, not a 'plaque-seg' one"),
    pytest.param("seg", ["plaque.sequences={T1w: ['*T1*'], T2w: ['*T2*']}"],
                 "seg.sequences names ['TOF', 'CE-T1w'], which are not plaque.sequences", marks=pytest.mark.slow),
])
def test_a_seg_checkpoint_the_job_cannot_use_is_refused_before_any_work(request, carotid_archive, cohort_fit, tmp_path, capsys,
                                                                         checkpoint, overrides, message):
    path = _classifier_checkpoint(str(tmp_path / "classifier")) if checkpoint == "classifier" else request.getfixturevalue("seg_run").checkpoint
    root = carotid_archive.root
    code = main(["plaque", "predict", "--archive", root, "--patients", os.path.join(root, "patients.csv"), "--model", cohort_fit[1],
                 "--seg-checkpoint", path, "--output", str(tmp_path / "out"), *overrides])
    err = capsys.readouterr().err
    assert code == 2 and message in err and path in err
    assert not (tmp_path / "out").exists()
