"""DICOM instances -> one record per study, as Ray datasets: the unit of work of jobs over studies
(visits) rather than files.

    manifest row groups ──headers (parallel reads, pixels skipped)──▶ one header row per object
         ──groupby StudyInstanceUID (Ray Data hash shuffle)──▶ INDEX/*.parquet: one record per study
    INDEX row groups named by the driver's todo table ──▶ fn(Study) per study (the task's work) ──▶ rows

Why a shuffle and not a driver-side index: an archive of 100,000 studies holds some 20 million
instances; their paths alone are gigabytes, more than a driver should hold. Ray Data's groupby
hash-partitions the header rows over the cluster (``num_partitions`` grows with the listing, one
per :data:`OBJECTS_PER_PARTITION` objects) and each group (one study, hundreds of instances) is
small. The driver then reads only the index's small columns (one row per study, no member
lists) to decide what to do.

Every listed object ends up in exactly one index record: a study record (``status`` ok) lists it
among its ``members``, or a record of its own (``status`` error) says why it belongs to no study:

===================  ==========================================================================
reason               what it means
===================  ==========================================================================
(io.dicom REASONS)   :func:`medhier.io.dicom.read_dataset` rejects the header (``not_dicom``,
                     ``corrupt_header``)
read_error           the object could not be read from storage
no_study_uid         a DICOM object without a StudyInstanceUID
internal_error       an unexpected error while reading the header (a bug: please report it)
===================  ==========================================================================

Headers are read with ``pixels=False``: a file whose pixel data is cut short is a member of its
study here and is rejected by whoever decodes its pixels (e.g. :mod:`medhier.io.volume`).
Each header read fetches the whole object (every run: an index of earlier runs' headers is not
kept yet).

A study record's ``digest`` changes when any member object is added, removed or modified (its
path, size, ETag or mtime): with the StudyInstanceUID it identifies a version of the study.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray.data

from medhier import columns as C
from medhier.config import DataConfig, StorageConfig
from medhier.data.ingest import fetch_objects
from medhier.data.manifest import manifest_files, work_item_batches
from medhier.io import storage
from medhier.io.dicom import REASONS as DICOM_REASONS
from medhier.io.dicom import DicomRejected, patient_key, read_dataset

__all__ = [
    "DIGEST",
    "HEADER_SCHEMA",
    "MEMBER_FIELDS",
    "OBJECTS_PER_PARTITION",
    "REASONS",
    "STUDY_COLUMNS",
    "SeriesSettings",
    "Study",
    "StudyIndexSummary",
    "map_studies",
    "read_headers",
    "read_study_keys",
    "write_study_index",
]

REASONS: dict[str, str] = {
    **{k: v for k, v in DICOM_REASONS.items() if k in ("not_dicom", "corrupt_header")},
    "read_error": "the object could not be read from storage",
    "no_study_uid": "a DICOM object without a StudyInstanceUID",
    "internal_error": "an unexpected error while reading the header (a bug: please report it)",
}

# Header columns beside the platform's own (medhier.columns).
SOP_CLASS_UID = "sop_class_uid"
FRAME_OF_REFERENCE_UID = "frame_of_reference_uid"
SERIES_NUMBER = "series_number"  # null when absent
SERIES_DESCRIPTION = "series_description"
INSTANCE_NUMBER = "instance_number"  # null when absent
STUDY_DATE, STUDY_TIME = "study_date", "study_time"  # DICOM DA (YYYYMMDD) and TM strings, "" when absent
SERIES_DATE, SERIES_TIME = "series_date", "series_time"
REFERENCED_SERIES = "referenced_series"  # SeriesInstanceUIDs of ReferencedSeriesSequence (SEG, SR), else empty
# Study record columns.
MEMBERS = "members"  # list of the study's objects (MEMBER_FIELDS each)
OBJECTS = "objects"  # how many
DIGEST = "digest"  # sha256 of the members' (path, size, etag, mtime), hex
SOURCE = "source"  # the path of an object that belongs to no study ("" on study records)

HEADER_SCHEMA = pa.schema(
    [
        (C.PATH, pa.string()), (C.SIZE, pa.int64()), (C.ETAG, pa.string()), (C.MTIME, pa.float64()),
        (C.STATUS, pa.string()), (C.REASON, pa.string()), (C.ERROR, pa.string()),
        (C.PATIENT_KEY, pa.string()), (C.STUDY_INSTANCE_UID, pa.string()), (STUDY_DATE, pa.string()), (STUDY_TIME, pa.string()),
        (C.SERIES_INSTANCE_UID, pa.string()), (SERIES_NUMBER, pa.int64()), (SERIES_DESCRIPTION, pa.string()),
        (SERIES_DATE, pa.string()), (SERIES_TIME, pa.string()), (C.MODALITY, pa.string()),
        (C.SOP_INSTANCE_UID, pa.string()), (SOP_CLASS_UID, pa.string()), (INSTANCE_NUMBER, pa.int64()),
        (FRAME_OF_REFERENCE_UID, pa.string()), (REFERENCED_SERIES, pa.list_(pa.string())),
    ]
)
# What a study record keeps of each member: the object and its header, not the study's own fields.
MEMBER_FIELDS = tuple(
    f.name for f in HEADER_SCHEMA
    if f.name not in (C.STATUS, C.REASON, C.ERROR, C.PATIENT_KEY, C.STUDY_INSTANCE_UID, STUDY_DATE, STUDY_TIME)
)
_MEMBER_TYPE = pa.list_(pa.struct([HEADER_SCHEMA.field(name) for name in MEMBER_FIELDS]))
STUDY_SCHEMA = pa.schema(
    [
        (C.STUDY_INSTANCE_UID, pa.string()), (C.STATUS, pa.string()), (C.REASON, pa.string()), (C.ERROR, pa.string()),
        (SOURCE, pa.string()), (C.PATIENT_KEY, pa.string()), (STUDY_DATE, pa.string()), (STUDY_TIME, pa.string()),
        (OBJECTS, pa.int64()), (DIGEST, pa.string()), (MEMBERS, _MEMBER_TYPE),
    ]
)
# The study record without its members: what the driver reads.
STUDY_COLUMNS = tuple(name for name in STUDY_SCHEMA.names if name != MEMBERS)

OBJECTS_PER_PARTITION = 200_000  # header rows per shuffle partition of the groupby
STUDIES_PER_ROW_GROUP = 16  # index records per Parquet row group
_GROUP = "_group"  # the groupby key: the StudyInstanceUID, or the path of an object in no study


@dataclass(frozen=True)
class SeriesSettings:
    """What the header and study tasks need, small and picklable. ``patient_salt``: for
    :func:`medhier.io.dicom.patient_key`."""

    archive: str
    storage: StorageConfig
    patient_salt: str = ""


# -- headers -------------------------------------------------------------------------------------


def read_headers(batch: dict[str, np.ndarray], settings: SeriesSettings) -> pa.Table:
    """Manifest rows (path, size, etag, mtime) -> one :data:`HEADER_SCHEMA` row per object: its
    header fields (status ok), or why it has none (status error, a :data:`REASONS` code).
    Objects are fetched concurrently (``storage.read_threads``), parsed as they arrive."""
    paths = [str(p) for p in batch[C.PATH]]
    rows = []
    for i, (rel, blob) in enumerate(zip(paths, fetch_objects(paths, settings.archive, settings.storage))):
        row = {C.PATH: rel, C.SIZE: int(batch[C.SIZE][i]), C.ETAG: str(batch[C.ETAG][i]), C.MTIME: float(batch[C.MTIME][i])}
        rows.append({**row, **_header_of(rel, blob, settings.patient_salt)})
    return pa.Table.from_pylist(rows, schema=HEADER_SCHEMA)


def _header_of(rel: str, blob: bytes | Exception, salt: str) -> dict[str, Any]:
    if isinstance(blob, Exception):
        return _rejected("read_error", f"{rel}: {type(blob).__name__}: {blob}")
    try:
        ds = read_dataset(blob, source=rel, pixels=False)
    except DicomRejected as exc:
        return _rejected(exc.reason, exc.message)
    try:
        study = _text(ds, "StudyInstanceUID")
        if not study:
            return _rejected("no_study_uid", f"{rel}: a DICOM object ({_text(ds, 'Modality') or 'no modality'}) without a StudyInstanceUID")
        referenced = [str(item.get("SeriesInstanceUID", "")) for item in ds.get("ReferencedSeriesSequence") or []]
        return {
            C.STATUS: C.STATUS_OK, C.REASON: "", C.ERROR: "",
            C.PATIENT_KEY: patient_key(_text(ds, "PatientID"), _text(ds, "IssuerOfPatientID"), salt),
            C.STUDY_INSTANCE_UID: study, STUDY_DATE: _text(ds, "StudyDate"), STUDY_TIME: _text(ds, "StudyTime"),
            C.SERIES_INSTANCE_UID: _text(ds, "SeriesInstanceUID"), SERIES_NUMBER: _int(ds, "SeriesNumber"),
            SERIES_DESCRIPTION: _text(ds, "SeriesDescription"), SERIES_DATE: _text(ds, "SeriesDate"),
            SERIES_TIME: _text(ds, "SeriesTime"), C.MODALITY: _text(ds, "Modality").upper(),
            C.SOP_INSTANCE_UID: _text(ds, "SOPInstanceUID"), SOP_CLASS_UID: _text(ds, "SOPClassUID"),
            INSTANCE_NUMBER: _int(ds, "InstanceNumber"), FRAME_OF_REFERENCE_UID: _text(ds, "FrameOfReferenceUID"),
            REFERENCED_SERIES: [uid for uid in referenced if uid],
        }
    except Exception as exc:  # a bug must cost one object, not the archive
        return _rejected("internal_error", f"{rel}: {type(exc).__name__}: {exc}")


def _rejected(reason: str, message: str) -> dict[str, Any]:
    return {C.STATUS: C.STATUS_ERROR, C.REASON: reason, C.ERROR: message, REFERENCED_SERIES: []}


def _text(ds, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed value reads as absent, as in io.volume
        return ""
    return "" if value is None else str(value).strip()


def _int(ds, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


# -- the study index -----------------------------------------------------------------------------


@dataclass
class StudyIndexSummary:
    """What :func:`write_study_index` found: ``objects`` read, ``studies`` formed, and the objects
    that belong to no study (``rejected``: reason -> count, a few ``examples``: path -> message)."""

    index: str
    objects: int = 0
    studies: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)


def write_study_index(manifest: str, index: str, settings: SeriesSettings, data_cfg: DataConfig) -> StudyIndexSummary:
    """Read the header of every object a manifest (:func:`medhier.data.manifest.write_manifest`)
    lists, in parallel tasks (one per manifest row group), group them by StudyInstanceUID and
    write one record per study (and one per object in no study) under ``index`` as Parquet.
    Runs the pipeline; the driver holds the work items and, after it, the small columns."""
    fs, _ = storage.filesystem(manifest, settings.storage)
    items, objects = [], 0
    for f in manifest_files(manifest, settings.storage):
        with fs.open_input_file(f) as handle:
            meta = pq.ParquetFile(handle).metadata
        objects += meta.num_rows
        items.extend({"manifest_file": f, "row_group": g} for g in range(meta.num_row_groups))
    if not items:
        raise FileNotFoundError(f"manifest {manifest!r} lists no objects")
    headers = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _headers_of_slice,
        fn_kwargs={"settings": settings, "manifest_uri": manifest},
        batch_size=1,
        batch_format="numpy",
        num_cpus=data_cfg.decode_num_cpus,
    )
    partitions = max(1, min(64, math.ceil(objects / OBJECTS_PER_PARTITION)))
    records = headers.groupby(_GROUP, num_partitions=partitions).map_groups(_study_record, batch_format="pyarrow")
    storage.delete(index, settings.storage)
    ifs, path = storage.filesystem(index, settings.storage)
    # Small row groups: a study task reads the one row group that holds its study.
    records.write_parquet(path, filesystem=ifs, compression="zstd", row_group_size=STUDIES_PER_ROW_GROUP)
    return _index_summary(index, settings.storage)


def _headers_of_slice(item: dict[str, np.ndarray], settings: SeriesSettings, manifest_uri: str) -> pa.Table:
    """One work item (a manifest file's row group) -> its header rows, with the groupby key."""
    table = pa.concat_tables([read_headers(rows, settings) for rows in work_item_batches(item, manifest_uri, settings.storage)])
    ok = pc.equal(table[C.STATUS], C.STATUS_OK)
    # An object in no study is a group of its own ("\0" sorts it apart from every UID).
    group = pc.if_else(ok, table[C.STUDY_INSTANCE_UID], pc.binary_join_element_wise("\0", table[C.PATH], ""))
    return table.append_column(_GROUP, group)


def _study_record(group: pa.Table) -> pa.Table:
    """All header rows of one group -> its one index record (:data:`STUDY_SCHEMA`)."""
    rows = group.drop_columns([_GROUP]).sort_by(C.PATH).to_pylist()
    first = rows[0]
    members = [{k: r[k] for k in MEMBER_FIELDS} for r in rows]
    if first[C.STATUS] != C.STATUS_OK:
        record = {C.STUDY_INSTANCE_UID: "", C.STATUS: first[C.STATUS], C.REASON: first[C.REASON], C.ERROR: first[C.ERROR],
                  SOURCE: first[C.PATH], C.PATIENT_KEY: "", STUDY_DATE: "", STUDY_TIME: ""}
    else:
        record = {C.STUDY_INSTANCE_UID: first[C.STUDY_INSTANCE_UID], C.STATUS: C.STATUS_OK, C.REASON: "", C.ERROR: "",
                  SOURCE: "", C.PATIENT_KEY: _most_common(r[C.PATIENT_KEY] for r in rows),
                  STUDY_DATE: _most_common(r[STUDY_DATE] for r in rows), STUDY_TIME: _most_common(r[STUDY_TIME] for r in rows)}
    record.update({OBJECTS: len(rows), DIGEST: _digest(members), MEMBERS: members})
    return pa.Table.from_pylist([record], schema=STUDY_SCHEMA)


def _most_common(values) -> str:
    """The most frequent non-empty value (ties: the smallest), "" when all are empty: one study's
    instances should agree; an odd one out does not decide."""
    counts = Counter(v for v in values if v)
    return min(counts, key=lambda v: (-counts[v], v)) if counts else ""


def _digest(members: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for m in sorted(members, key=lambda m: m[C.PATH]):
        h.update(f"{m[C.PATH]}\0{m[C.SIZE]}\0{m[C.ETAG]}\0{int(m[C.MTIME] * 1000)}\n".encode())
    return h.hexdigest()


def read_study_keys(index: str, storage_cfg: StorageConfig) -> pa.Table:
    """The index's records without their member lists (:data:`STUDY_COLUMNS`): one row per study
    and per object in no study, small enough for the driver."""
    fs, path = storage.filesystem(index, storage_cfg)
    return pads.dataset(path, filesystem=fs, format="parquet", schema=STUDY_SCHEMA).to_table(columns=list(STUDY_COLUMNS))


def _index_summary(index: str, storage_cfg: StorageConfig) -> StudyIndexSummary:
    keys = read_study_keys(index, storage_cfg)
    summary = StudyIndexSummary(index=index, objects=int(pc.sum(keys[OBJECTS]).as_py() or 0))
    ok = pc.equal(keys[C.STATUS], C.STATUS_OK)
    summary.studies = int(pc.sum(ok).as_py() or 0)
    rejected = keys.filter(pc.invert(ok))
    summary.rejected = dict(sorted(Counter(rejected[C.REASON].to_pylist()).items()))
    for source, message in zip(rejected[SOURCE].to_pylist()[:5], rejected[C.ERROR].to_pylist()[:5]):
        summary.examples[source] = message
    return summary


# -- work over studies ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    """One study record as a task sees it: its identity, its ``members`` (one dict per object,
    :data:`MEMBER_FIELDS`, sorted by path) and the driver's ``extra`` columns for it (from the
    todo table). :meth:`fetch` reads member objects from the archive."""

    study_instance_uid: str
    patient_key: str
    study_date: str
    study_time: str
    digest: str
    members: tuple[dict[str, Any], ...]
    extra: dict[str, Any]
    settings: SeriesSettings

    def fetch(self, paths: Sequence[str]) -> list[bytes | Exception]:
        """The objects at ``paths`` (relative to the archive), read concurrently: bytes, or the
        exception a read raised."""
        return list(fetch_objects(paths, self.settings.archive, self.settings.storage))


def map_studies(
    index: str,
    todo: pa.Table,
    fn: Callable[..., dict[str, Any] | list[dict[str, Any]]],
    schema: pa.Schema,
    settings: SeriesSettings,
    *,
    fn_kwargs: dict[str, Any] | None = None,
    studies_per_task: int = 1,
    num_cpus: float = 1.0,
):
    """A streaming Ray dataset of ``fn(study, **fn_kwargs)`` (one ``schema`` row, a dict, or a
    list of them: a study may make several rows, e.g. one per slice) for every study of
    ``index`` that ``todo`` names.

    ``todo``: the studies to do, as (study_instance_uid, digest) rows, plus any columns the task
    wants handed to ``fn`` (``Study.extra``); a study whose digest differs from the index's (it
    changed since) is not done. The driver finds each study's row group in the index (its small
    columns only) and hands every task ``studies_per_task`` (file, row group, row) addresses; the
    task reads its studies' member lists itself, as the ingest reads manifest slices. Nothing
    runs until the dataset is consumed.
    """
    missing = {C.STUDY_INSTANCE_UID, DIGEST} - set(todo.column_names)
    if missing:
        raise ValueError(f"map_studies: the todo table needs the columns {sorted(missing)}")
    wanted = {(u, d): i for i, (u, d) in enumerate(zip(todo[C.STUDY_INSTANCE_UID].to_pylist(), todo[DIGEST].to_pylist()))}
    extra = todo.drop_columns([C.STUDY_INSTANCE_UID, DIGEST]).to_pylist()
    addresses = []
    fs, _ = storage.filesystem(index, settings.storage)
    for f in _index_files(index, settings.storage):
        with fs.open_input_file(f) as handle:
            parquet = pq.ParquetFile(handle)
            for g in range(parquet.num_row_groups):
                keys = parquet.read_row_group(g, columns=[C.STUDY_INSTANCE_UID, DIGEST, C.STATUS])
                for row, (uid, digest, status) in enumerate(zip(*(keys[c].to_pylist() for c in keys.column_names))):
                    i = wanted.get((uid, digest)) if status == C.STATUS_OK else None
                    if i is not None:
                        addresses.append({"file": f, "row_group": g, "row": row, "extra": extra[i]})
    tasks = [addresses[i : i + studies_per_task] for i in range(0, len(addresses), studies_per_task)]
    if not tasks:
        raise ValueError(f"map_studies: none of the {todo.num_rows} todo studies is in the index {index!r}")
    return ray.data.from_items([{"studies": t} for t in tasks], override_num_blocks=len(tasks)).map_batches(
        _apply,
        fn_kwargs={"fn": fn, "schema": schema, "settings": settings, "index": index, "kwargs": fn_kwargs or {}},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=num_cpus,
    )


def _index_files(index: str, storage_cfg: StorageConfig) -> list[str]:
    fs, path = storage.filesystem(index, storage_cfg)
    return sorted(i.path for i in fs.get_file_info(storage.pafs.FileSelector(path)) if i.path.endswith(".parquet"))


def _apply(item: pa.Table, fn, schema: pa.Schema, settings: SeriesSettings, index: str, kwargs: dict[str, Any]) -> pa.Table:
    """One work item (a few studies' addresses in the index) -> ``fn``'s rows."""
    fs, _ = storage.filesystem(index, settings.storage)
    rows, groups = [], {}
    for address in item["studies"].to_pylist()[0]:
        key = (address["file"], address["row_group"])
        if key not in groups:
            with fs.open_input_file(address["file"]) as handle:
                groups[key] = pq.ParquetFile(handle).read_row_group(address["row_group"])
        record = groups[key].slice(address["row"], 1).to_pylist()[0]
        study = Study(
            study_instance_uid=record[C.STUDY_INSTANCE_UID], patient_key=record[C.PATIENT_KEY],
            study_date=record[STUDY_DATE], study_time=record[STUDY_TIME], digest=record[DIGEST],
            members=tuple(record[MEMBERS]), extra=dict(address["extra"] or {}), settings=settings,
        )
        made = fn(study, **kwargs)
        rows.extend(made if isinstance(made, list) else [made])
    return pa.Table.from_pylist(rows, schema=schema)
