"""The segmentation model's scores on label maps whose answer is known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from medhier.plaque import labels as L
from medhier.plaque.seg_metrics import STRUCTURES, bland_altman_png, overlays_png, score_visit, summarise

SPACING = (2.0, 0.5, 0.5)  # mm


def vessel(shape=(4, 32, 32), centre=(16, 16), lumen_r=4, outer_r=8, lipid=True) -> np.ndarray:
    """A straight vessel: lumen disc inside a wall ring, a lipid core in the wall's right side."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    r2 = (y - centre[0]) ** 2 + (x - centre[1]) ** 2
    out = np.zeros(shape, np.uint8)
    out[np.broadcast_to(r2 <= outer_r**2, shape)] = L.WALL
    out[np.broadcast_to(r2 <= lumen_r**2, shape)] = L.LUMEN
    if lipid:
        out[:, centre[0] - 1 : centre[0] + 2, centre[1] + lumen_r + 2 : centre[1] + lumen_r + 4] = L.LIPID
    return out


def test_a_perfect_prediction_scores_dice_one_and_no_distance_and_no_measurement_error():
    truth = vessel()
    scores = score_visit("1.2.3", truth, truth.copy(), SPACING)
    for name in ("lumen", "outer_wall", "vessel_wall", "lipid_core"):
        assert scores.dice[name] == pytest.approx(1.0)
        assert scores.hd95_mm[name] == pytest.approx(0.0)
    # the phantom has no haemorrhage: Dice and HD95 are undefined, not 0 or 1
    assert scores.dice["haemorrhage"] is None and scores.hd95_mm["haemorrhage"] is None
    assert np.trace(scores.confusion) == truth.size
    summary = summarise([scores])
    assert summary["measurements"]["lumen_volume_mm3"]["mean_abs_error"] == 0
    assert summary["measurements"]["lumen_volume_mm3"]["n"] == 1


@pytest.mark.parametrize(
    "shift_px, lumen_hd95_mm",
    [(1, 0.5), (2, 1.0), (4, 2.0)],  # a shift of k pixels of 0.5 mm moves the boundary by k/2 mm
)
def test_a_shifted_prediction_is_that_far_from_the_truth(shift_px, lumen_hd95_mm):
    truth = vessel(lipid=False)
    predicted = np.roll(truth, shift_px, axis=2)
    scores = score_visit("1.2.3", truth, predicted, SPACING)
    assert scores.hd95_mm["lumen"] == pytest.approx(lumen_hd95_mm, abs=0.26)
    assert 0 < scores.dice["lumen"] < 1
    # a pure translation changes no volume
    assert scores.predicted["lumen_volume_mm3"] == pytest.approx(scores.truth["lumen_volume_mm3"])


def test_a_model_that_misses_a_component_is_counted_in_the_confusion_and_the_volume_error():
    truth = vessel()
    predicted = np.where(truth == L.LIPID, L.WALL, truth).astype(np.uint8)  # the lipid core painted as wall
    scores = score_visit("1.2.3", truth, predicted, SPACING)
    lipid_voxels = int((truth == L.LIPID).sum())
    assert scores.dice["lipid_core"] == pytest.approx(0.0)
    assert scores.hd95_mm["lipid_core"] is None  # no predicted boundary to measure from
    assert scores.confusion[L.LIPID, L.WALL] == lipid_voxels
    errors = summarise([scores])["measurements"]["lipid_core_volume_mm3"]
    assert errors["bias"] == pytest.approx(-lipid_voxels * np.prod(SPACING))
    assert errors["mean_rel_error"] == pytest.approx(1.0)


def test_pooled_dice_counts_every_voxel_once_and_false_positives_where_the_truth_has_none():
    """Two visits: one whose 6-voxel-per-slice lipid core the model finds exactly, one with no
    lipid core where the model paints 2 voxels per slice of it. The per-visit Dice ignores the
    second visit (undefined there); the pooled Dice counts its false positives."""
    with_core, without = vessel(), vessel(lipid=False)
    found = score_visit("1.2.1", with_core, with_core.copy(), SPACING)
    invented = without.copy()
    invented[:, 16, 23:25] = L.LIPID
    phantom = score_visit("1.2.2", without, invented, SPACING)
    core = int((with_core == L.LIPID).sum())
    assert found.overlap["lipid_core"] == (core, 0, 0) and phantom.overlap["lipid_core"] == (0, 0, 8)
    summary = summarise([found, phantom])
    assert summary["dice"]["lipid_core"] == {"mean": 1.0, "median": 1.0, "n": 1}
    assert summary["dice_pooled"]["lipid_core"] == pytest.approx(2 * core / (2 * core + 8))
    assert summary["dice_pooled"]["haemorrhage"] is None  # nobody has any: undefined
    assert summary["dice_pooled"]["lumen"] == pytest.approx(1.0)


def test_bland_altman_limits_are_the_bias_plus_minus_196_sd():
    truth = vessel(lipid=False)
    visits = []
    for k, grow in enumerate([4, 5, 6]):  # the model's lumen a little larger each visit
        predicted = vessel(lumen_r=grow, lipid=False)
        visits.append(score_visit(f"1.2.{k}", truth, predicted, SPACING))
    e = summarise(visits)["measurements"]["lumen_volume_mm3"]
    diffs = np.array([v.predicted["lumen_volume_mm3"] - v.truth["lumen_volume_mm3"] for v in visits])
    assert e["bias"] == pytest.approx(diffs.mean())
    assert e["limits_of_agreement"] == pytest.approx([diffs.mean() - 1.96 * diffs.std(ddof=1), diffs.mean() + 1.96 * diffs.std(ddof=1)])
    png = bland_altman_png(visits)
    assert png.startswith(b"\x89PNG")


def test_overlays_are_a_png_and_every_structure_is_scored():
    truth = vessel()
    png = overlays_png([truth[0].astype(np.float32)] * 2, [truth[0]] * 2, [truth[1]] * 2, ["a", "b"])
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert set(summarise([score_visit("x", truth, truth, SPACING)])["dice"]) == set(STRUCTURES)


def test_maps_of_different_shapes_are_refused_naming_the_visit():
    with pytest.raises(ValueError, match="1.2.3"):
        score_visit("1.2.3", vessel(), vessel()[:2], SPACING)
