"""Segmentation sources: the study's own SEGs (latest on the reference series used, others
superseded or unused), files under --segmentations keyed by StudyInstanceUID (NIfTI and DICOM
SEG give the truth back; ambiguous, missing and malformed files are error rows), names that key
no study ignored and counted."""

from __future__ import annotations

import gzip
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest

from medhier import columns as C
from medhier.config import PlaqueConfig, StorageConfig
from medhier.io.seg import write_seg
from medhier.io.volume import read_series
from medhier.plaque import labels as L
from medhier.plaque.segmentations import (
    SEGMENTATION_PATHS,
    ArchiveSegmentations,
    GivenSegmentations,
    label_mapping,
    study_of_file,
)
from medhier.plaque.study import VisitSettings, measure_study, measure_version
from medhier.synthetic import carotid
from tests.plaque.phantoms import study_of

UID = "1.2.826.0.1.3680043.8.498.12345"


@pytest.mark.parametrize(
    "path, expected",
    [
        (f"{UID}.dcm", (UID, "dicom-seg")),
        (f"{UID}.nii.gz", (UID, "nifti")),
        (f"P01/{UID}.NII", (UID, "nifti")),  # any depth, any case of the extension
        (f"{UID}.nii.gz.bak", None),
        ("seg.nii.gz", None),  # not a UID
        ("notes.txt", None),
    ],
)
def test_a_file_is_keyed_by_the_study_uid_in_its_name(path, expected):
    assert study_of_file(path) == expected


def test_seg_labels_must_name_plaque_labels():
    with pytest.raises(ValueError, match="plaque.seg_labels names \\['thrombus'\\]"):
        label_mapping(PlaqueConfig(seg_labels={"thrombus": ["*thrombus*"]}))


def _settings(source, register: bool = False) -> VisitSettings:
    plaque = PlaqueConfig(register=register)
    return VisitSettings(plaque, source, source.model_id, measure_version(plaque), "run-test")


@pytest.fixture(scope="module")
def visit(carotid_archive):
    """The phantom's first visit: its folder, its truth label map and its series' datasets."""
    patient = carotid_archive.plans[0]
    labels, _ = carotid.render_labels(patient.visits[0])
    folder = "P0001/V01"
    datasets = {
        seq: [pydicom.dcmread(os.path.join(carotid_archive.root, folder, seq, name))
              for name in sorted(os.listdir(os.path.join(carotid_archive.root, folder, seq)))]
        for seq in carotid.SEQUENCES
    }
    return folder, labels, datasets


def _seg(labels, datasets, entropy: str, series_time: str) -> bytes:
    data = write_seg(labels, datasets, carotid.SEGMENTS, entropy=entropy, series_number=98)
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    ds.SeriesDate, ds.SeriesTime = datasets[0].StudyDate, series_time
    out = pydicom.filebase.DicomBytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def test_the_latest_seg_on_the_reference_series_is_used(carotid_archive, visit, tmp_path):
    folder, labels, datasets = visit
    root = str(tmp_path / "a")
    shutil.copytree(os.path.join(carotid_archive.root, folder), os.path.join(root, folder))
    no_lipid = np.where(labels == L.LIPID, L.WALL, labels)
    extra = {
        "SEG/late.dcm": _seg(no_lipid, datasets["T1w"], "late", "235900"),  # a re-segmentation: wins
        "SEG/on-t2w.dcm": _seg(labels, datasets["T2w"], "t2w", "235959"),  # drawn on another sequence
    }
    for rel, data in extra.items():
        with open(os.path.join(root, folder, rel), "wb") as f:
            f.write(data)
    row = measure_study(study_of(root, folder), _settings(ArchiveSegmentations()))
    assert row[C.STATUS] == "ok" and row["segmentation"] == f"{folder}/SEG/late.dcm"
    assert row["lipid_core_volume_mm3"] == 0.0
    outcomes = {e["path"].rsplit("/", 1)[-1]: e["outcome"] for e in json.loads(row["segmentation_objects"])}
    assert outcomes == {"late.dcm": "used", "seg.dcm": "superseded", "on-t2w.dcm": "unused"}


def _nifti(labels, reference, dtype=np.uint8) -> bytes:
    image = reference.volume.with_array(labels.astype(dtype)).to_nibabel()
    return gzip.compress(image.to_bytes())


@pytest.fixture()
def given(carotid_archive, visit, tmp_path):
    """--segmentations: a NIfTI for the first visit, a DICOM SEG for the second, a file keyed to
    no study, a file no study can be read from."""
    folder, labels, datasets = visit
    reference = next(read_series((str(i), _bytes(ds)) for i, ds in enumerate(datasets["T1w"])))
    first = study_of(carotid_archive.root, folder).study_instance_uid
    second = study_of(carotid_archive.root, "P0001/V02").study_instance_uid
    segs = tmp_path / "segs"
    (segs / "more").mkdir(parents=True)
    (segs / f"{first}.nii.gz").write_bytes(_nifti(labels, reference))
    shutil.copy(os.path.join(carotid_archive.root, "P0001/V02/SEG/seg.dcm"), segs / "more" / f"{second}.dcm")
    (segs / "1.2.3.4.nii").write_bytes(b"keyed to no study of the archive")
    (segs / "README.txt").write_text("label maps for the carotid study")
    return str(segs), first, second, labels, reference


def _bytes(ds) -> bytes:
    out = pydicom.filebase.DicomBytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def test_given_files_are_located_by_study_and_odd_names_ignored(given):
    segs, first, second, _, _ = given
    located = GivenSegmentations(segs).locate()
    rows = {r[C.STUDY_INSTANCE_UID]: r[SEGMENTATION_PATHS] for r in located.table.to_pylist()}
    assert rows == {first: f"{first}.nii.gz", second: f"more/{second}.dcm", "1.2.3.4": "1.2.3.4.nii"}
    assert list(located.ignored) == ["README.txt"]


@pytest.mark.parametrize("folder", ["P0001/V01", "P0001/V02"])  # NIfTI, then DICOM SEG
def test_given_nifti_and_seg_files_give_the_truths_measurements(carotid_archive, given, folder):
    segs, first, second, _, _ = given
    uid = study_of(carotid_archive.root, folder).study_instance_uid
    name = f"{uid}.nii.gz" if uid == first else f"more/{uid}.dcm"
    row = measure_study(study_of(carotid_archive.root, folder, **{SEGMENTATION_PATHS: name}), _settings(GivenSegmentations(segs)))
    assert row[C.STATUS] == "ok", row[C.ERROR_MESSAGE]
    assert row["segmentation_format"] == ("nifti" if uid == first else "dicom-seg")
    outcomes = {e["path"]: e["outcome"] for e in json.loads(row["segmentation_objects"])}
    assert outcomes[f"{folder}/SEG/seg.dcm"] == "unused"  # the study's own SEG: another source was asked
    truth = {r["study_instance_uid"]: r for r in pq.read_table(os.path.join(carotid_archive.root, "truth.parquet")).to_pylist()}[uid]
    for column in ("wall_volume_mm3", "lipid_core_volume_mm3", "stenosis_area_pct", "min_cap_thickness_mm"):
        assert row[column] == pytest.approx(truth[column], rel=1e-9), column


@pytest.mark.parametrize(
    "names, reason",
    [
        ([], "no_segmentation"),
        (["{uid}.nii.gz", "other/{uid}.dcm"], "several_segmentations"),
        (["{uid}.nii"], "seg_not_labels"),  # a probability map, not labels
    ],
)
def test_a_missing_ambiguous_or_malformed_given_file_is_an_error_row(carotid_archive, visit, given, tmp_path, names, reason):
    _, labels, _ = visit
    _, first, _, _, reference = given
    segs = tmp_path / "bad"
    for name in names:
        target = segs / name.format(uid=first)
        target.parent.mkdir(parents=True, exist_ok=True)
        data = gzip.decompress(_nifti(labels * 0.5, reference, np.float32)) if name.endswith(".nii") else _nifti(labels, reference)
        target.write_bytes(data)
    segs.mkdir(exist_ok=True)
    paths = "\n".join(sorted(n.format(uid=first) for n in names))
    row = measure_study(study_of(carotid_archive.root, "P0001/V01", **{SEGMENTATION_PATHS: paths}),
                        _settings(GivenSegmentations(str(segs), StorageConfig())))
    assert (row[C.STATUS], row[C.ERROR_REASON]) == ("error", reason)
