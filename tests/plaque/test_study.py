"""One study -> one visit row: a phantom visit measured from its SEG gives the truth's
measurements, every series in its entry; registration keeps its transforms as JSON; a visit
that cannot be measured is an error row with a reason, its series still accounted for."""

from __future__ import annotations

import json
import math
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medhier import columns as C
from medhier.config import PlaqueConfig
from medhier.plaque.measure import MEASUREMENTS
from medhier.plaque.register import RigidTransform
from medhier.plaque.report import REPORT_SCHEMA, VISIT_KEY
from medhier.plaque.segmentations import ArchiveSegmentations
from medhier.plaque.study import VisitSettings, measure_study, measure_version
from medhier.synthetic import carotid
from tests.plaque.phantoms import study_of


def _settings(plaque: PlaqueConfig | None = None, source=None) -> VisitSettings:
    plaque = plaque or PlaqueConfig(register=False)
    source = source or ArchiveSegmentations()
    return VisitSettings(plaque, source, source.model_id, measure_version(plaque), "run-test")


def _truth(root: str, study_uid: str) -> dict:
    rows = pq.read_table(os.path.join(root, "truth.parquet")).to_pylist()
    return next(r for r in rows if r["study_instance_uid"] == study_uid)


def _entries(row: dict) -> dict[str, dict]:
    return {e["sequence"] or e["series_description"]: e for e in json.loads(row["series"])}


def test_a_visit_measured_from_its_seg_gives_the_truths_measurements(carotid_archive):
    study = study_of(carotid_archive.root, "P0001/V01", **{VISIT_KEY: "key-1"})
    row = measure_study(study, _settings())
    pa.Table.from_pylist([row], schema=REPORT_SCHEMA)  # the row fits the report's schema
    assert row[C.STATUS] == "ok" and row[C.ERROR_REASON] is None
    truth = _truth(carotid_archive.root, study.study_instance_uid)
    for name in MEASUREMENTS:
        expected = truth[name]
        if isinstance(expected, float) and math.isnan(expected):
            assert row[name] is None, name
        else:
            assert row[name] == pytest.approx(expected, rel=1e-9, abs=1e-9), name
    assert row["visit_date"] == truth["study_date"] and row[VISIT_KEY] == "key-1"
    assert row["objects"] == 4 * carotid.SLICES + 1 and row["segmentation"] == "P0001/V01/SEG/seg.dcm"
    entries = _entries(row)
    assert {k: e["outcome"] for k, e in entries.items()} == {seq: "used" for seq in carotid.SEQUENCES}
    identity = [e["transform"] for k, e in entries.items() if k != "T1w"]
    assert all(RigidTransform.from_dict(t).stop == "identity" for t in identity)  # plaque.register: false
    assert entries["T1w"]["transform"] is None and row["reference_series_uid"] == entries["T1w"]["series_instance_uid"]
    [seg] = json.loads(row["segmentation_objects"])
    assert seg["outcome"] == "used" and seg["unmapped"] == {} and seg["resampled"] is False


def test_registration_keeps_each_sequences_transform_in_the_row(carotid_archive):
    study = study_of(carotid_archive.root, "P0001/V01")
    row = measure_study(study, _settings(PlaqueConfig(register=True)))
    assert row[C.STATUS] == "ok"
    for seq, entry in _entries(row).items():
        if seq == "T1w":
            continue
        transform = RigidTransform.from_dict(entry["transform"])  # JSON round trip
        assert transform.iterations > 0 and transform.metric is not None
        # every sequence of a phantom visit registers (TOF and CE-T1w included): none rejected
        assert (entry["outcome"], entry["reason"]) == ("used", None), (seq, entry["reason"], entry["message"])


class Exploding:
    """A test-only segmentation source with a bug."""

    model_id = "seg:exploding"

    def locate(self):
        raise AssertionError("not called by measure_study")

    def archive_paths(self, plan):
        return []

    def labels(self, visit):
        raise RuntimeError("a bug in a segmentation source")


def _without(carotid_archive, tmp_path, *remove: str) -> str:
    root = str(tmp_path / "archive")
    shutil.copytree(os.path.join(carotid_archive.root, "broken"), os.path.join(root, "broken"))
    shutil.copytree(os.path.join(carotid_archive.root, "P0001"), os.path.join(root, "P0001"))
    for rel in remove:
        target = os.path.join(root, rel)
        shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    return root


def test_a_broken_reference_is_an_error_row_naming_every_series_reason(carotid_archive, tmp_path):
    """The broken patient's T1w candidates without their one complete series: none forms a
    volume, the visit fails with the preferred (latest) candidate's reason, each series keeps its own."""
    root = _without(carotid_archive, tmp_path, "broken/non_dicom_file")
    row = measure_study(study_of(root, "broken"), _settings())
    assert (row[C.STATUS], row[C.ERROR_REASON]) == ("error", "missing_positions")  # truncated_pixels: series 104
    assert all(row[name] is None for name in MEASUREMENTS)
    reasons = {e["series_description"].rsplit(" ", 1)[-1].lower(): (e["outcome"], e["reason"]) for e in json.loads(row["series"])}
    assert reasons == {
        "gap": ("rejected", "missing_positions"),
        "duplicate_position": ("rejected", "duplicate_positions"),
        "mixed_orientation": ("rejected", "mixed_orientation"),
        "unequal_slice_size": ("rejected", "unequal_slice_size"),  # claimed by CE-T1w ("...SLICE..." holds "CE")
        "truncated_pixels": ("rejected", "missing_positions"),
    }
    truncated = next(e for e in json.loads(row["series"]) if e["series_description"].endswith("TRUNCATED_PIXELS"))
    assert truncated["rejected_instances"] == {"broken/truncated_pixels/IM0006.dcm": "unreadable_instance"}


@pytest.mark.parametrize(
    "folder, remove, plaque, source, reason",
    [
        ("broken", (), None, None, "no_segmentation"),  # the broken patient's study has no SEG
        ("P0001/V01", ("P0001/V01/SEG",), None, None, "no_segmentation"),
        ("P0001/V01", (), PlaqueConfig(sequences={"PD": ["*PD*"], "T1w": ["*T1*"]}, reference="PD", register=False), None,
         "no_reference_series"),
        ("P0001/V01", (), None, Exploding(), "internal_error"),
    ],
)
def test_a_visit_that_cannot_be_measured_is_an_error_row(carotid_archive, tmp_path, folder, remove, plaque, source, reason):
    root = _without(carotid_archive, tmp_path, *remove)
    row = measure_study(study_of(root, folder), _settings(plaque, source))
    assert (row[C.STATUS], row[C.ERROR_REASON]) == ("error", reason)
    assert study_of(root, folder).study_instance_uid in row[C.ERROR_MESSAGE]
    assert len(json.loads(row["series"])) >= 4  # the series are accounted for whatever failed
    segs = {f"{folder}/SEG/seg.dcm"} if os.path.exists(os.path.join(root, folder, "SEG")) else set()
    assert {e["path"] for e in json.loads(row["segmentation_objects"])} == segs  # and so are the SEG objects


def test_an_object_gone_since_its_header_was_read_is_a_read_error(carotid_archive, tmp_path):
    root = _without(carotid_archive, tmp_path)
    study = study_of(root, "P0001/V01")
    os.remove(os.path.join(root, "P0001/V01/T2w/IM0003.dcm"))
    row = measure_study(study, _settings())
    assert (row[C.STATUS], row[C.ERROR_REASON]) == ("error", "read_error")
    assert "IM0003.dcm" in row[C.ERROR_MESSAGE]
    assert {e["reason"] for e in json.loads(row["series"])} == {"read_error"}
