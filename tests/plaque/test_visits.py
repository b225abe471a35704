"""Studies as visits: SeriesDescriptions claimed by the first matching sequence, the later
SeriesNumber preferred among series that form volumes, SEG objects set apart, visits ordered in
time with only usable ones numbered, the manifest keeping each study's latest row; on
synthetic series and on pydicom's real MR and CT studies."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil

import pyarrow as pa
import pytest
from pydicom.data import get_testdata_file

from medhier import columns as C
from medhier.config import PlaqueConfig
from medhier.io.volume import read_series
from medhier.plaque.visits import (
    REJECTED,
    SUPERSEDED,
    USED,
    choose_series,
    match_sequence,
    order_visits,
    plan_study,
    too_few_visits,
    visit_manifest,
)
from tests.io import series as S
from tests.plaque.phantoms import studies_of, study_of

SEQUENCES = PlaqueConfig().sequences


@pytest.mark.parametrize(
    "description, expected",
    [
        ("T1W_BB_TSE_AX", "T1w"),
        ("t1w bb tse ax", "T1w"),  # case-insensitive
        ("T1W_BB_TSE_AX_POST", "CE-T1w"),  # the first sequence in config order wins over T1w
        ("AX T1 +C", "CE-T1w"),
        ("T2W_BB_TSE_AX", "T2w"),
        ("TOF_3D_AX", "TOF"),
        ("3D MRA", "TOF"),
        ("3-plane localizer", None),
        ("", None),
    ],
)
def test_a_series_description_is_claimed_by_the_first_matching_sequence(description, expected):
    assert match_sequence(description, SEQUENCES) == expected


def _write(root, name: str, datasets, study_uid: str, *, description: str, number: int, drop: int | None = None) -> None:
    folder = os.path.join(root, "S", name)
    os.makedirs(folder)
    for k, ds in enumerate(datasets):
        if k == drop:
            continue
        ds.StudyInstanceUID, ds.SeriesDescription, ds.SeriesNumber = study_uid, description, number
        with open(os.path.join(folder, f"{k}.dcm"), "wb") as f:
            f.write(S.to_bytes(ds))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One study: two good T1w series (numbers 3 and 5), a good T2w (4) and its broken repeat
    (6, a slice missing), a localizer no sequence claims."""
    root = str(tmp_path_factory.mktemp("visit-study"))
    uid = "1.2.826.0.1.3680043.8.498.7001"
    _write(root, "t1-first", S.series(key="t1-first"), uid, description="T1W_BB", number=3)
    _write(root, "t1-repeat", S.series(key="t1-repeat"), uid, description="T1W_BB", number=5)
    _write(root, "t2", S.series(key="t2"), uid, description="T2W_BB", number=4)
    _write(root, "t2-broken", S.series(key="t2-broken"), uid, description="T2W_BB", number=6, drop=2)
    _write(root, "loc", S.series(shape=(1, 6, 7), key="loc"), uid, description="LOCALIZER", number=1)
    return study_of(root, "S")


def test_the_later_series_number_is_used_unless_it_forms_no_volume(study):
    plan = plan_study(study.members, SEQUENCES)
    assert [r.series_number for r in plan.candidates["T1w"]] == [5, 3]
    assert [r.series_number for r in plan.candidates["T2w"]] == [6, 4]
    assert [r.series_description for r in plan.unmatched] == ["LOCALIZER"]
    assert len(plan.image_paths) == 5 + 5 + 5 + 4  # candidates only: the localizer is never read
    results = list(read_series((p, open(os.path.join(study.settings.archive, p), "rb").read()) for p in plan.image_paths))
    choice = choose_series(plan, results)
    by_number = {ref.series_number: choice.outcomes[ref.series_instance_uid] for refs in plan.candidates.values() for ref in refs}
    assert {n: o[:2] for n, o in by_number.items()} == {
        5: (USED, ""), 3: (SUPERSEDED, ""), 4: (USED, ""), 6: (REJECTED, "missing_positions"),
    }
    assert choice.volumes["T1w"].series_number == 5 and choice.volumes["T2w"].series_number == 4
    assert set(choice.volumes) == {"T1w", "T2w"}


def test_segmentation_objects_and_series_less_objects_are_set_apart():
    members = [
        {C.PATH: "a/1.dcm", C.SERIES_INSTANCE_UID: "1.1", "series_description": "T1W", "series_number": 2, "sop_class_uid": S.MR_IMAGE},
        {C.PATH: "seg/old.dcm", C.SERIES_INSTANCE_UID: "1.8", "series_description": "SEG", "series_number": 90,
         "series_date": "20240101", "series_time": "1000", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.66.4", "referenced_series": ["1.1"]},
        {C.PATH: "seg/new.dcm", C.SERIES_INSTANCE_UID: "1.9", "series_description": "SEG", "series_number": 91,
         "series_date": "20240101", "series_time": "1200", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.66.4", "referenced_series": ["1.1"]},
        {C.PATH: "odd.dcm", C.SERIES_INSTANCE_UID: "", "series_description": "T1W", "sop_class_uid": S.MR_IMAGE},
    ]
    plan = plan_study(members, SEQUENCES)
    assert [s.path for s in plan.segmentations] == ["seg/new.dcm", "seg/old.dcm"]  # latest first
    assert plan.segmentations[0].referenced_series == ("1.1",)
    assert plan.no_series == ("odd.dcm",)
    assert plan.image_paths == ["a/1.dcm"]


def _visits(rows):
    schema = pa.schema([(C.PATIENT_KEY, pa.string()), (C.STUDY_INSTANCE_UID, pa.string()), ("visit_date", pa.date32()),
                        ("visit_time", pa.string()), ("usable", pa.bool_())])
    return pa.Table.from_pylist(
        [dict(zip(schema.names, (p, s, dt.date.fromisoformat(d) if d else None, t, u))) for p, s, d, t, u in rows], schema=schema
    )


def test_visits_are_ordered_in_time_and_only_usable_ones_are_numbered():
    ordered = order_visits(_visits([
        ("A", "s3", "2024-05-01", "090000", True),
        ("A", "s1", "2023-01-01", "080000", True),
        ("A", "s2", "2023-01-01", "170000", True),   # same day, later: after s1
        ("A", "s4", "2023-06-01", "", False),        # an error visit keeps its place, no number
        ("A", "s5", None, "", False),                # undated: last
        ("B", "t1", "2022-02-02", "", True),
    ]))
    rows = [(r[C.STUDY_INSTANCE_UID], r["visit_number"], r["days_since_first"], r["visits"]) for r in ordered.to_pylist()]
    assert rows == [("s1", 1, 0, 3), ("s2", 2, 0, 3), ("s4", None, None, 3), ("s3", 3, 486, 3), ("s5", None, None, 3),
                    ("t1", 1, 0, 1)]
    assert too_few_visits(ordered, 2) == (2, 1)
    assert too_few_visits(ordered, 4) == (2, 2)


def test_the_manifest_keeps_the_latest_row_of_each_study():
    def row(study, date, status, scored_ms, run):
        return {C.PATIENT_KEY: "A", C.STUDY_INSTANCE_UID: study, "visit_date": dt.date.fromisoformat(date), "visit_time": "",
                C.STATUS: status, C.ERROR_REASON: None if status == "ok" else "no_segmentation", "reference_series_uid": "r",
                "segmentation": "s.dcm", "series": json.dumps([{"outcome": "used"}]), C.RUN_ID: run, C.SCORED_AT: scored_ms}

    schema = pa.schema([(C.PATIENT_KEY, pa.string()), (C.STUDY_INSTANCE_UID, pa.string()), ("visit_date", pa.date32()),
                        ("visit_time", pa.string()), (C.STATUS, pa.string()), (C.ERROR_REASON, pa.string()),
                        ("reference_series_uid", pa.string()), ("segmentation", pa.string()), ("series", pa.string()),
                        (C.RUN_ID, pa.string()), (C.SCORED_AT, pa.timestamp("ms", tz="UTC"))])
    report = pa.Table.from_pylist([
        row("s1", "2023-01-01", "error", 1_000, "run-1"),
        row("s1", "2023-01-01", "ok", 2_000, "run-2"),  # the study changed and was measured again
        row("s2", "2024-01-01", "ok", 1_000, "run-1"),
    ], schema=schema)
    manifest = visit_manifest(report).to_pylist()
    assert [(m[C.STUDY_INSTANCE_UID], m["visit_number"], m[C.RUN_ID], m["days_since_first"]) for m in manifest] == [
        ("s1", 1, "run-2", 0), ("s2", 2, "run-1", 365)]


# -- real DICOM: pydicom's MR and CT studies of one patient ----------------------------------------


@pytest.fixture(scope="module")
def real_archive(tmp_path_factory):
    base = os.path.dirname(get_testdata_file("DICOMDIR", read=False))
    root = tmp_path_factory.mktemp("real")
    for study in ("98892001", "98892003"):  # patient 98890234: a CT study and three MR studies
        shutil.copytree(os.path.join(base, study), root / study)
    return str(root)


def test_real_mr_series_are_each_accounted_for_with_their_reason(real_archive):
    sequences = {"localizer": ["*LOCALIZER*"], "pilot": ["*PILOT*"], "angio": ["*ANGIO*"]}
    studies = studies_of(real_archive)
    angio = next(s for s in studies.values() if any("ANGIO" in m["series_description"] for m in s.members))
    plan = plan_study(angio.members, sequences)
    results = list(read_series((p, open(os.path.join(real_archive, p), "rb").read()) for p in plan.image_paths))
    choice = choose_series(plan, results)
    reasons = {ref.series_description: choice.outcomes[ref.series_instance_uid][:2] for refs in plan.candidates.values() for ref in refs}
    assert reasons == {
        "FAST LOCALIZER": (REJECTED, "single_slice"),  # one slice: no spacing
        "T/S/C RF FAST PILOT": (REJECTED, "mixed_orientation"),  # a tri-plane pilot
        "ANGIO Projected from   C": (REJECTED, "mixed_orientation"),  # radial projections
    }
    assert choice.volumes == {}


def test_real_studies_of_one_patient_are_ordered_by_study_date_and_time(real_archive):
    studies = studies_of(real_archive)
    assert len({s.patient_key for s in studies.values()}) == 1 and len(studies) == 4
    table = _visits([(s.patient_key, uid, f"{s.study_date[:4]}-{s.study_date[4:6]}-{s.study_date[6:]}", s.study_time, True)
                     for uid, s in studies.items()])
    ordered = order_visits(table).to_pylist()
    assert [(str(r["visit_date"]), r["visit_time"], r["visit_number"]) for r in ordered] == [
        ("2001-01-01", "000000", 1), ("2003-05-05", "025109", 2), ("2003-05-05", "045357", 3), ("2003-05-05", "050743", 4)]
    assert ordered[-1]["days_since_first"] == (dt.date(2003, 5, 5) - dt.date(2001, 1, 1)).days
