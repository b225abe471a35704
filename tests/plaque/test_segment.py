"""``medhier plaque segment`` with the session's trained model: a DICOM SEG per visit on its
reference series, the measure job's row from the model's label map, error rows for what cannot be
segmented, incremental runs; the SEGs read back (pydicom, highdicom, ``plaque measure
--segmentations``) give the same measurements as the label maps they were written from."""

from __future__ import annotations

import math
import os
from pathlib import Path

import highdicom as hd
import pyarrow.parquet as pq
import pydicom
import pytest

from medhier import columns as C
from medhier.infer.ledger import Ledger
from medhier.plaque.api import LEDGER_KEY, measure_archive
from medhier.plaque.measure import MEASUREMENTS
from medhier.plaque.report import REASONS
from medhier.plaque.segment import SEGMENTS, seg_uri, segment_archive, segment_version

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # the session's trained model, then the segment job

LABELS = {spec.label for spec in SEGMENTS.values()}


@pytest.fixture(scope="module")
def segmented(seg_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("segmented"))
    summary = segment_archive(seg_run.cfg, seg_run.phantom.root, seg_run.checkpoint, out)
    rows = Ledger(out, seg_run.cfg.storage, key=LEDGER_KEY).report().to_pylist()
    return summary, {r[C.STUDY_INSTANCE_UID]: r for r in rows}, out


def truth_studies(seg_run) -> set[str]:
    truth = pq.read_table(os.path.join(seg_run.phantom.root, "truth.parquet"), columns=["study_instance_uid"])
    return set(truth["study_instance_uid"].to_pylist())


def test_every_visit_is_segmented_once_and_what_cannot_be_is_an_error_row(seg_run, segmented):
    summary, rows, out = segmented
    assert summary.visits == summary.studies == len(rows) == seg_run.phantom.summary.visits + 1  # + the broken patient's study
    ok = {uid for uid, r in rows.items() if r[C.STATUS] == C.STATUS_OK}
    assert ok == truth_studies(seg_run)  # every phantom visit segmented
    for uid, r in rows.items():
        assert r[C.MODEL_ID] == summary.model_id and r[C.MODEL_VERSION] == segment_version(seg_run.cfg.plaque)
        if uid in ok:
            assert r["segmentation"] == seg_uri(out, summary.model_id, uid) and r["segmentation_format"] == "dicom-seg"
            assert r["n_vessels"] >= 1 and r["lumen_volume_mm3"] > 0
        else:
            assert r["error_reason"] in REASONS and uid in r["error_message"]


def test_the_seg_files_open_reference_their_series_and_carry_the_label_set(seg_run, segmented):
    summary, rows, out = segmented
    files = sorted(Path(out, "seg", summary.model_id).glob("*.dcm"))
    assert len(files) == len(truth_studies(seg_run))
    for path in files:
        row = rows[path.stem]
        ds = pydicom.dcmread(path)
        seg = hd.seg.segread(path)
        assert ds.Modality == "SEG" and ds.StudyInstanceUID == path.stem
        (referenced,) = ds.ReferencedSeriesSequence
        assert referenced.SeriesInstanceUID == row["reference_series_uid"]
        assert len(referenced.ReferencedInstanceSequence) == 10  # every reference slice
        labels = {s.SegmentLabel for s in ds.SegmentSequence}
        assert {"Lumen", "Vessel wall"} <= labels <= LABELS
        assert {s.SegmentAlgorithmName for s in ds.SegmentSequence} == {"medhier plaque-seg"}
        assert seg.number_of_segments == len(labels)


def test_the_segs_measured_again_give_the_model_rows_measurements(seg_run, segmented, tmp_path):
    summary, rows, out = segmented
    again = measure_archive(seg_run.cfg, seg_run.phantom.root, str(tmp_path / "remeasured"),
                            segmentations=os.path.join(out, "seg", summary.model_id))
    assert again.visits_ok == len(truth_studies(seg_run))
    remeasured = Ledger(str(tmp_path / "remeasured"), seg_run.cfg.storage, key=LEDGER_KEY).report().to_pylist()
    compared = 0
    for r in remeasured:
        if r[C.STATUS] != C.STATUS_OK:
            continue
        model = rows[r[C.STUDY_INSTANCE_UID]]
        for name in MEASUREMENTS:
            a, b = r[name], model[name]
            assert (a is None and b is None) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9), f"{name}: SEG {a}, model {b}"
        compared += 1
    assert compared == len(truth_studies(seg_run))


def test_a_second_run_segments_nothing(seg_run, segmented):
    summary, rows, out = segmented
    second = segment_archive(seg_run.cfg, seg_run.phantom.root, seg_run.checkpoint, out)
    assert second.visits == 0 and second.already_measured == len(rows)
    assert len(Ledger(out, seg_run.cfg.storage, key=LEDGER_KEY).report()) == len(rows)
