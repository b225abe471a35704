"""``medhier plaque measure`` end to end on Ray: one row per visit with the truth's measurements,
every object, series and SEG accounted for, visits numbered in time; a second run measures
nothing, a new visit is measured alone, a crashed run leaves nothing visible and the next one
completes; given segmentations (a SEG on a real CT study) re-measured when they change; S3 in
and out through the CLI."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medhier import columns as C
from medhier.cli import main
from medhier.config import StorageConfig
from medhier.infer.ledger import Ledger
from medhier.io import storage
from medhier.io.seg import SegmentSpec, write_seg
from medhier.io.volume import SEG_SOP_CLASSES, volume_from_datasets
from medhier.plaque import labels as L
from medhier.plaque.api import LEDGER_KEY, measure_archive
from medhier.plaque.measure import MEASUREMENTS
from medhier.plaque.segmentations import ArchiveSegmentations
from tests.plaque.phantoms import cfg, copy_archive

pytestmark = pytest.mark.ray


def _report(output: str, scfg: StorageConfig | None = None) -> list[dict]:
    return Ledger(output, scfg or StorageConfig(), key=LEDGER_KEY).report().to_pylist()


def _headers(root: str) -> list[pydicom.Dataset]:
    out = []
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            try:
                out.append(pydicom.dcmread(path, stop_before_pixels=True))
            except pydicom.errors.InvalidDicomError:
                continue
    return out


def test_every_visit_is_measured_once_and_every_series_and_seg_is_accounted_for(carotid_archive, ray_session, tmp_path):
    root = copy_archive(carotid_archive, str(tmp_path / "archive"))
    held_back = tmp_path / "V03"
    shutil.move(os.path.join(root, "P0001", "V03"), held_back)  # P0001's third visit arrives later
    out = str(tmp_path / "out")

    first = measure_archive(cfg(), root, out)
    rows = _report(out)
    assert first.visits == first.studies == len(rows) == 7  # 6 phantom visits and the broken patient's study
    assert Counter(r[C.STUDY_INSTANCE_UID] for r in rows) == Counter({r[C.STUDY_INSTANCE_UID]: 1 for r in rows})
    truth = {t["study_instance_uid"]: t for t in pq.read_table(os.path.join(root, "truth.parquet")).to_pylist()}
    for row in rows:
        if row[C.STUDY_INSTANCE_UID] not in truth:
            assert (row[C.STATUS], row[C.ERROR_REASON]) == ("error", "no_segmentation")  # the broken patient
            continue
        assert row[C.STATUS] == "ok", row[C.ERROR_MESSAGE]
        expected = truth[row[C.STUDY_INSTANCE_UID]]
        for name in MEASUREMENTS:
            if isinstance(expected[name], float) and math.isnan(expected[name]):
                assert row[name] is None
            else:
                assert row[name] == pytest.approx(expected[name], rel=1e-9, abs=1e-9), name

    # Every object: excluded, in no study, or a member of a measured study; every series and SEG
    # object an entry of its visit's row.
    assert first.objects_in_no_study == {"not_dicom": 1}  # broken/non_dicom_file/notes.txt
    assert first.excluded == 4  # patients.csv and the three truth tables
    headers = _headers(root)
    images = {ds.SeriesInstanceUID for ds in headers if ds.SOPClassUID not in SEG_SOP_CLASSES}
    segs = {str(p.relative_to(root)) for p in Path(root).rglob("seg.dcm")}
    entries = [e for r in rows for e in json.loads(r["series"])]
    assert Counter(e["series_instance_uid"] for e in entries) == Counter({uid: 1 for uid in images})
    assert {e["path"] for r in rows for e in json.loads(r["segmentation_objects"])} == segs
    assert first.series == {"used": 6 * 4 + 1, "rejected": 5}
    assert first.series_rejected == {"missing_positions": 2, "duplicate_positions": 1, "mixed_orientation": 1, "unequal_slice_size": 1}
    assert first.instances_rejected == {"unreadable_instance": 1}
    assert first.segmentation_objects == {"used": 6}
    assert (first.patients, first.patients_too_few_visits) == (4, 1)  # the broken patient has no usable visit

    visits = pq.read_table(os.path.join(out, "visits.parquet")).to_pylist()
    p1 = carotid_archive.plans[0].key()
    assert [(v["visit_number"], v["visits"]) for v in visits if v[C.PATIENT_KEY] == p1] == [(1, 2), (2, 2)]

    second = measure_archive(cfg(), root, out)
    assert (second.visits, second.already_measured) == (0, 7)

    shutil.move(held_back, os.path.join(root, "P0001", "V03"))
    third = measure_archive(cfg(), root, out)
    assert (third.visits, third.visits_ok, third.already_measured) == (1, 1, 7)
    visits = pq.read_table(os.path.join(out, "visits.parquet")).to_pylist()
    numbered = [(v["visit_number"], v["days_since_first"]) for v in visits if v[C.PATIENT_KEY] == p1]
    plan = carotid_archive.plans[0]
    assert numbered == [(v.index, v.days) for v in plan.visits]


class Crash(BaseException):
    """What a task that dies mid-run raises (a BaseException: not a visit's error row)."""


class CrashOnVisit(ArchiveSegmentations):
    """A test-only source: the archive's SEGs, except that the task measuring one study crashes."""

    def __init__(self, study_uid: str):
        self.study_uid = study_uid

    def labels(self, visit):
        if visit.study.study_instance_uid == self.study_uid:
            raise Crash("injected crash")
        return super().labels(visit)


def test_a_crashed_run_leaves_nothing_and_the_next_run_completes(carotid_archive, ray_session, tmp_path):
    root, out = carotid_archive.root, str(tmp_path / "out")
    victim = pq.read_table(os.path.join(root, "truth.parquet"))["study_instance_uid"][3].as_py()
    with pytest.raises(Exception, match="injected crash"):
        measure_archive(cfg(), root, out, source=CrashOnVisit(victim))
    assert not Path(out, "report").exists() and not Path(out, "ledger").exists()
    done = measure_archive(cfg(), root, out)
    assert done.visits == done.studies == 8 and len(_report(out)) == 8
    # the crashed run's block ended with its error, which removed its heartbeat: it is dead at
    # once, and its folder goes after this run's commit
    assert len(done.removed_runs) == 1


@pytest.fixture(scope="module")
def real_archive(tmp_path_factory):
    """pydicom's real studies of one patient: a cardiac CT (5 slices of 16 x 16) and three MR
    studies (localizers, a tri-plane pilot, radial angiography projections)."""
    base = os.path.dirname(get_testdata_file("DICOMDIR", read=False))
    root = tmp_path_factory.mktemp("real")
    for study in ("98892001", "98892003"):
        shutil.copytree(os.path.join(base, study), root / study)
    return str(root)


def _ct_seg(real_archive: str, wall_radius: float) -> tuple[bytes, str, np.ndarray]:
    """A DICOM SEG on the real CT series: a lumen disc and a wall ring on slices 1-3."""
    datasets = [pydicom.dcmread(p) for p in sorted(Path(real_archive, "98892001", "CT5N").iterdir())]
    grid = volume_from_datasets(datasets)  # the grid, as the job sees it
    z, y, x = np.indices(grid.shape)
    r = np.hypot(y - 7.5, x - 7.5)
    labels = np.where((r < wall_radius) & (z >= 1) & (z <= 3), L.WALL, 0)
    labels[(r < 3.0) & (labels > 0)] = L.LUMEN
    specs = {L.LUMEN: SegmentSpec("Lumen"), L.WALL: SegmentSpec("Vessel wall")}
    return write_seg(labels, datasets, specs, entropy=f"ct-{wall_radius}"), grid.study_uid, labels


def test_given_segs_measure_a_real_study_again_when_they_change(real_archive, ray_session, tmp_path):
    segs, out = tmp_path / "segs", str(tmp_path / "out")
    data, uid, labels = _ct_seg(real_archive, 6.0)
    segs.mkdir()
    (segs / f"{uid}.dcm").write_bytes(data)
    (segs / "1.2.3.nii.gz").write_bytes(b"a study this archive does not hold")
    (segs / "labels.txt").write_text("lumen 1, wall 2")
    config = cfg("plaque.sequences={ct: ['*SmartScore*'], localizer: ['*LOCALIZER*'], pilot: ['*PILOT*'], angio: ['*ANGIO*']}",
                 "plaque.reference=ct")
    first = measure_archive(config, real_archive, out, segmentations=str(segs))
    assert (first.studies, first.visits, first.visits_ok) == (4, 4, 1)
    assert (first.segmentation_files_no_study, first.segmentation_files_ignored) == (1, 1)
    assert first.errors == {"no_reference_series": 3}  # the MR studies hold no CT series
    assert first.series_rejected == {"single_slice": 4, "mixed_orientation": 3}  # every real MR series, by its reason
    rows = {r[C.STUDY_INSTANCE_UID]: r for r in _report(out)}
    ct = rows[uid]
    voxel = 2.5 * 0.488281 ** 2
    assert ct["lumen_volume_mm3"] == pytest.approx(np.count_nonzero(labels == L.LUMEN) * voxel, rel=1e-5)
    assert ct["wall_volume_mm3"] == pytest.approx(np.count_nonzero(labels == L.WALL) * voxel, rel=1e-5)
    assert ct["segmentation_format"] == "dicom-seg" and ct["n_slices"] == 3

    again = measure_archive(config, real_archive, out, segmentations=str(segs))
    assert again.visits == 0
    thicker, _, labels = _ct_seg(real_archive, 7.0)
    (segs / f"{uid}.dcm").write_bytes(thicker)
    third = measure_archive(config, real_archive, out, segmentations=str(segs))
    assert (third.visits, third.visits_ok) == (1, 1)  # the changed label map alone
    latest = max((r for r in _report(out) if r[C.STUDY_INSTANCE_UID] == uid), key=lambda r: r[C.SCORED_AT])
    assert latest["wall_volume_mm3"] == pytest.approx(np.count_nonzero(labels == L.WALL) * voxel, rel=1e-5)


@pytest.mark.s3
def test_synth_and_measure_on_s3_through_the_cli(ray_session, s3_bucket, storage_cfg, capsys):
    endpoint = f"storage.s3_endpoint={storage_cfg.s3_endpoint}"
    archive, out = f"{s3_bucket}/carotid", f"{s3_bucket}/measured"
    assert main(["plaque", "synth", "--out", archive, "--patients", "1", "--seed", "11", endpoint]) == 0
    assert "1 patients, 3 visits" in capsys.readouterr().out
    assert main(["plaque", "measure", "--archive", archive, "--output", out, "runtime.progress=false",
                 "plaque.register=false", endpoint]) == 0
    printed = capsys.readouterr().out
    assert "measured now     3 visits (3 ok, 0 errors)" in printed
    rows = _report(out, storage_cfg)
    assert len(rows) == 3 and {r[C.STATUS] for r in rows} == {"ok"}
    visits = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out, "visits.parquet"), storage_cfg))).to_pylist()
    assert [v["visit_number"] for v in visits] == [1, 2, 3]


def test_cli_names_a_missing_archive(tmp_path, capsys):
    assert main(["plaque", "measure", "--archive", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")]) == 2
    assert "medhier plaque measure: error: archive" in capsys.readouterr().err
