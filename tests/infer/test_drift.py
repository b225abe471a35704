"""Drift: the population stability index per feature, a run counted in the reference's bins, warnings."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from medhier import columns as C
from medhier.infer.drift import PREDICTED_CLASS, DriftCounter, psi, reference_profile


def _rows(n: int, seed: int, *, manufacturer: str = "ACME", spacing: float = 0.5, brightness: float = 0.4, error_rows: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({
        C.STATUS: [C.STATUS_OK] * n + [C.STATUS_ERROR] * error_rows,
        C.MODALITY: ["CT"] * (n + error_rows),
        C.BODY_PART: ["LSPINE"] * (n + error_rows),
        C.MANUFACTURER: [manufacturer] * (n + error_rows),
        C.PIXEL_SPACING: np.r_[rng.normal(spacing, 0.02, n), np.full(error_rows, np.nan)],
        C.INTENSITY_MEAN: np.r_[rng.normal(brightness, 0.03, n), np.full(error_rows, np.nan)],
        C.INTENSITY_STD: np.r_[rng.normal(0.2, 0.02, n), np.full(error_rows, np.nan)],
    })


@pytest.mark.parametrize("expected, actual, value", [
    ([50, 50], [50, 50], 0.0),
    ([50, 50], [500, 500], 0.0),  # shares, not counts
    # shares .5/.5 -> .9/.1 (+ half an image per bin): (.9-.5) ln(.9/.5) + (.1-.5) ln(.1/.5), about 0.88
    ([5000, 5000], [9000, 1000], 0.4 * math.log(0.9 / 0.5) + 0.4 * math.log(0.5 / 0.1)),
])
def test_psi_by_hand(expected, actual, value):
    assert psi(np.array(expected), np.array(actual)) == pytest.approx(value, abs=2e-3)


def test_a_run_like_the_training_data_shows_no_drift():
    profile = reference_profile(_rows(600, 0), {"normal": 300, "lesion": 300})
    counter = DriftCounter(profile)
    counter(_rows(300, 1, error_rows=20))  # error rows are not images
    counter.add_classes({"normal": 140, "lesion": 160})
    result = counter.result(warn_psi=0.25, min_images=100)
    assert result["images"] == 300 and result["reference_images"] == 600
    assert set(result["psi"]) == {C.MODALITY, C.BODY_PART, C.MANUFACTURER, C.PIXEL_SPACING, C.INTENSITY_MEAN, C.INTENSITY_STD, PREDICTED_CLASS}
    assert max(result["psi"].values()) < 0.1 and result["warnings"] == []


@pytest.mark.parametrize("change, feature", [
    ({"manufacturer": "OTHER CORP"}, C.MANUFACTURER),  # a category the reference never saw
    ({"spacing": 0.8}, C.PIXEL_SPACING),
    ({"brightness": 0.55}, C.INTENSITY_MEAN),
])
def test_a_shifted_feature_is_flagged_by_name(change, feature):
    counter = DriftCounter(reference_profile(_rows(600, 0)))
    counter(_rows(200, 2, **change))
    result = counter.result(warn_psi=0.25, min_images=100)
    assert result["psi"][feature] > 1.0
    assert [w.split(":")[0] for w in result["warnings"]] == [feature]
    assert "largest change" in result["warnings"][0]


def test_predicted_classes_drift_too():
    counter = DriftCounter(reference_profile(_rows(300, 0), {"normal": 240, "lesion": 60}))
    counter(_rows(300, 1))
    counter.add_classes({"normal": 60, "lesion": 240})
    assert [w.split(":")[0] for w in counter.result(0.25, 10)["warnings"]] == [PREDICTED_CLASS]


def test_warnings_wait_for_enough_images():
    counter = DriftCounter(reference_profile(_rows(600, 0)))
    counter(_rows(30, 2, manufacturer="OTHER CORP"))
    result = counter.result(warn_psi=0.25, min_images=100)
    assert result["psi"][C.MANUFACTURER] > 1.0 and result["warnings"] == []


def test_missing_values_have_their_own_bin():
    counter = DriftCounter(reference_profile(_rows(200, 0)))
    rows = _rows(200, 1)
    counter(rows.set_column(rows.schema.get_field_index(C.PIXEL_SPACING), C.PIXEL_SPACING, pa.array(np.full(200, np.nan))))
    assert counter.result(0.25, 10)["shares"][C.PIXEL_SPACING]["(missing)"] == [0.0, 1.0]


def test_no_profile_no_drift():
    counter = DriftCounter({})
    counter(_rows(50, 0))
    assert counter.result(0.25, 10) == {}


def test_a_profile_needs_the_feature_columns():
    with pytest.raises(ValueError, match="manufacturer"):
        reference_profile(_rows(10, 0).drop_columns([C.MANUFACTURER]))


# -- a scoring run against a trained checkpoint's profile -------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_a_run_on_another_scanner_geometry_warns_about_pixel_spacing(finished_run, tmp_path):
    """The checkpoint was trained on 64 px phantoms (2.19 mm pixels); an archive of 96 px ones
    (1.46 mm) resized to the same input is the same anatomy at another spacing."""
    import json
    from pathlib import Path

    from medhier.classify.score import score
    from medhier.config import load_config
    from medhier.infer.batch import report_table
    from medhier.synthetic import spine as synthetic
    from medhier.train.checkpoint import load_checkpoint
    from medhier.classify.task import CLASSIFY

    archive = str(tmp_path / "finer")
    synthetic.generate_archive(archive, 30, seed=8, size=96, difficulty=0.1)
    cfg = load_config(None, ["runtime.progress=false", "score.drift_min_images=20"])
    out = str(tmp_path / "scores")
    summary = score(cfg, archive, finished_run.best, out)
    drift = summary.drift
    assert drift["images"] == 30 and drift["reference_images"] == load_checkpoint(finished_run.best, CLASSIFY).profile["images"]
    assert drift["psi"][C.PIXEL_SPACING] > 1.0
    assert max(drift["psi"][k] for k in (C.MODALITY, C.BODY_PART, C.MANUFACTURER)) < 0.1
    assert any(w.startswith(f"{C.PIXEL_SPACING}: PSI") for w in drift["warnings"])
    assert json.loads(Path(out, "summary.json").read_text())["drift"]["psi"] == drift["psi"]
    assert "WARNING pixel_spacing" in summary.table()
    # the report carries the features drift was computed from, and the referral
    report = report_table(out).to_pylist()
    assert {round(r[C.PIXEL_SPACING], 4) for r in report} == {round(synthetic.FOV_MM / 96, 4)}
    threshold = load_checkpoint(finished_run.best, CLASSIFY).defaults["score"]["refer_below"]
    assert all(r["refer"] == (r["leaf_prob"] < threshold) for r in report)
