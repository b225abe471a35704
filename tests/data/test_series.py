"""Headers into study records: every object read once and placed in exactly one record (its
study, or one of its own saying why it is in none), a study's digest changing only with its own
objects, and work over studies handed exactly the studies (and the columns) the driver asks for."""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import pytest

from medhier import columns as C
from medhier.config import DataConfig, StorageConfig
from medhier.data.manifest import write_manifest
from medhier.data.series import (
    DIGEST,
    MEMBER_FIELDS,
    SeriesSettings,
    Study,
    map_studies,
    read_headers,
    read_study_keys,
    write_study_index,
)
from medhier.io.dicom import patient_key
from tests.io import series as S

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _archive(root) -> dict[str, str]:
    """Two studies (two series, then one), a file that is no DICOM, a DICOM without a study
    -> {relative path: what it is}."""
    files = {}
    first = S.series(shape=(3, 4, 5), key="study-a-t1") + S.series(shape=(2, 4, 5), key="study-a-t2")
    for ds in first:
        ds.StudyInstanceUID = first[0].StudyInstanceUID
    for k, ds in enumerate(first):
        files[f"a/{k}.dcm"] = S.to_bytes(ds)
    for k, ds in enumerate(S.series(shape=(2, 4, 5), key="study-b", patient_id="PAT-002")):
        files[f"b/{k}.dcm"] = S.to_bytes(ds)
    orphan = S.series(shape=(1, 4, 5), key="orphan")[0]
    del orphan.StudyInstanceUID
    files["orphan.dcm"] = S.to_bytes(orphan)
    files["notes.txt"] = b"not a DICOM file"
    for rel, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)) or root, exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
    return files


def _batch(root: str, paths: list[str]) -> dict[str, np.ndarray]:
    sizes = [os.path.getsize(os.path.join(root, p)) if os.path.exists(os.path.join(root, p)) else 0 for p in paths]
    return {C.PATH: np.array(paths, dtype=object), C.SIZE: np.array(sizes), C.ETAG: np.array([""] * len(paths), dtype=object),
            C.MTIME: np.array([1.5] * len(paths))}


def test_headers_are_one_row_per_object_with_a_reason_where_there_is_no_study(tmp_path):
    root = str(tmp_path)
    files = _archive(root)
    paths = sorted(files) + ["gone.dcm"]
    table = read_headers(_batch(root, paths), SeriesSettings(root, StorageConfig(), patient_salt="s"))
    rows = {r[C.PATH]: r for r in table.to_pylist()}
    assert list(rows) == paths
    assert {p: (r[C.STATUS], r[C.REASON]) for p, r in rows.items() if r[C.STATUS] != "ok"} == {
        "notes.txt": ("error", "not_dicom"), "orphan.dcm": ("error", "no_study_uid"), "gone.dcm": ("error", "read_error")}
    a0 = rows["a/0.dcm"]
    assert a0[C.PATIENT_KEY] == patient_key("PAT-001", "", "s")  # hashed; the raw ID never leaves io.dicom
    assert (a0["series_description"], a0["series_number"], a0[C.MODALITY], a0["study_date"]) == ("T1w study-a-t1", 7, "MR", "20240305")
    assert a0["sop_class_uid"] == S.MR_IMAGE and a0["referenced_series"] == []


@pytest.mark.ray
def test_every_object_is_in_exactly_one_record_and_work_goes_only_to_the_todo(tmp_path, ray_session):
    root, out = str(tmp_path / "archive"), str(tmp_path / "out")
    files = _archive(root)
    cfg, settings = DataConfig(exclude=[], decode_batch_size=3), SeriesSettings(root, StorageConfig())
    write_manifest(root, f"{out}/manifest", cfg, StorageConfig())
    summary = write_study_index(f"{out}/manifest", f"{out}/index", settings, cfg)
    assert (summary.objects, summary.studies, summary.rejected) == (len(files), 2, {"no_study_uid": 1, "not_dicom": 1})
    assert set(summary.examples) == {"orphan.dcm", "notes.txt"}
    keys = read_study_keys(f"{out}/index", StorageConfig())
    studies = {r[C.STUDY_INSTANCE_UID]: r for r in keys.to_pylist() if r[C.STATUS] == "ok"}
    assert sorted(r["objects"] for r in studies.values()) == [2, 5]

    # A changed object changes its study's digest, and only that one.
    time.sleep(0.01)
    os.utime(os.path.join(root, "b/1.dcm"))
    write_manifest(root, f"{out}/manifest2", cfg, StorageConfig())
    write_study_index(f"{out}/manifest2", f"{out}/index2", settings, cfg)
    again = {r[C.STUDY_INSTANCE_UID]: r[DIGEST] for r in read_study_keys(f"{out}/index2", StorageConfig()).to_pylist() if r[C.STATUS] == "ok"}
    changed = {uid for uid in studies if again[uid] != studies[uid][DIGEST]}
    b_uid = next(uid for uid, r in studies.items() if r["objects"] == 2)
    assert changed == {b_uid}

    # Work over studies: only the todo's studies (at the index's own digest), with its columns.
    a_uid = next(uid for uid in studies if uid != b_uid)
    todo = pa.table({C.STUDY_INSTANCE_UID: [a_uid, b_uid], DIGEST: [studies[a_uid][DIGEST], "stale"], "note": ["x", "y"]})
    schema = pa.schema([("study", pa.string()), ("members", pa.int64()), ("note", pa.string()), ("bytes", pa.int64())])
    rows = map_studies(f"{out}/index", todo, _summarise, schema, settings).take_all()
    assert rows == [{"study": a_uid, "members": 5, "note": "x", "bytes": sum(len(files[f"a/{k}.dcm"]) for k in range(5))}]


def _summarise(study: Study) -> dict:
    assert set(study.members[0]) == set(MEMBER_FIELDS)
    blobs = study.fetch([m[C.PATH] for m in study.members])
    return {"study": study.study_instance_uid, "members": len(study.members), "note": study.extra["note"],
            "bytes": sum(len(b) for b in blobs)}
