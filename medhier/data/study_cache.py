"""The cache of a task that learns from studies (visits) rather than files: each study turned into
sample rows once, by the task's own function, and split by patient.

    archive ──manifest──▶ study index (data.series: headers, groupby StudyInstanceUID)
            ──one Ray task per study: the task's ``fn(study)`` -> sample rows (ok) or one error row──▶
            CACHE/rows-<fingerprint>/status=…/split=…/*.parquet
            CACHE/cache.json   (written last: the commit point)

The cache is the platform's (:class:`medhier.data.cache.CacheInfo`, read by
:func:`medhier.data.cache.load_cache` and the training harness like the classifier's), and it is
reused while its fingerprint matches: the listing's digest, the task's fingerprint (its settings
that change a sample), the splits, ``data.exclude`` and the patient salt. Every row of an ok
study is a labelled sample (no class column); a study that gives no sample has one error row
with the task's reason. A study's split comes from its patient key (:func:`assign_split`), so a
patient's every visit and slice land in one split.

Counts in ``cache.json`` (``counts``): ``ok`` and ``samples`` (rows per split), ``studies``
(studies with samples), ``errors`` and ``reasons`` (studies without samples, by reason),
``objects_in_no_study`` (objects no study claims, by reason), ``split_classes`` (split ->
class -> the sum of the task's count column for it: the classifier counts images per class,
the plaque model voxels per label), ``row_bytes``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from medhier import columns as C
from medhier.config import Config
# CACHE_FORMAT: the image cache's reader reads this cache too, so it is written in its format.
from medhier.data.cache import CACHE_FORMAT, CacheInfo, _read_rows_table, write_rows
from medhier.data.manifest import write_manifest
from medhier.data.series import DIGEST, SeriesSettings, Study, map_studies, read_study_keys, write_study_index
from medhier.data.splits import assign_split
from medhier.io import storage

__all__ = ["StudyPrepareSummary", "StudySampler", "prepare_studies"]



@dataclass(frozen=True)
class StudySampler:
    """What a task hands :func:`prepare_studies` (picklable: it travels to the study tasks).

    ``fn(study, **kwargs)``: one study -> its sample rows, each a dict of ``schema``'s columns
    with ``status`` ok, or a single row with ``status`` error, ``reason`` and ``error``.
    ``schema``: the rows' columns, ``status``/``reason``/``error`` among them, not ``split``.
    ``fingerprint``: the settings that change a sample. ``inputs``: what a sample holds for the
    model (``CacheInfo.preprocess``: the task checks it against its config before training).
    ``count_columns``: class name -> integer column summed per split (``split_classes``).
    ``row_bytes``: about how many bytes one row takes. ``image_size``: the sample's side.
    ``labels``: where the labels come from, in words (``CacheInfo.labels``).
    ``studies_per_task``: studies per Ray task.
    """

    fn: Callable[..., list[dict[str, Any]]]
    schema: pa.Schema
    fingerprint: Mapping[str, Any]
    inputs: Mapping[str, Any]
    image_size: int
    row_bytes: int
    labels: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    count_columns: Mapping[str, str] = field(default_factory=dict)
    class_noun: str = "class"
    studies_per_task: int = 1  # more when a study takes well under a second (Ray Data's per-task lag)


@dataclass
class StudyPrepareSummary:
    """What :func:`prepare_studies` did, for the printed table and ``summary.json``."""

    cache: str
    reused: bool
    objects: int
    excluded: int
    counts: dict[str, Any]
    seconds: float
    studies_per_s: float = 0.0

    def table(self) -> str:
        c = self.counts
        splits = c.get("samples", {})
        lines = [
            f"cache            {self.cache}" + ("  (up to date, reused)" if self.reused else ""),
            f"objects listed   {self.objects:,}  ({self.excluded:,} excluded by data.exclude, "
            f"{sum(c.get('objects_in_no_study', {}).values()):,} in no study)",
            f"studies          {c.get('studies', 0):,} with samples, {c.get('errors', 0):,} without",
        ]
        lines += [f"  {reason:<26}{n:,}" for reason, n in sorted(c.get("reasons", {}).items())]
        lines.append(f"samples          {c.get('ok', 0):,}   (train {splits.get('train', 0):,} / val {splits.get('val', 0):,} / "
                     f"test {splits.get('test', 0):,})")
        train = c.get("split_classes", {}).get("train", {})
        if train:
            lines.append(f"{'train ' + c.get('class_noun', 'class'):<17}" + ", ".join(f"{k} {v:,}" for k, v in train.items()))
        if not self.reused:
            lines.append(f"wall time        {self.seconds:,.1f} s   ({self.studies_per_s:,.2f} studies/s)")
        return "\n".join(lines)


def _fingerprint(cfg: Config, archive: str, digest: str, sampler: StudySampler) -> str:
    parts = {
        "format": CACHE_FORMAT,
        "kind": "studies",
        "archive": archive,
        "listing": digest,
        "sampler": dict(sampler.fingerprint),
        "salt": hashlib.sha256(cfg.dicom.patient_salt.encode()).hexdigest(),  # patient keys, so splits, depend on it
        "split": [cfg.data.split_seed, cfg.data.train_fraction, cfg.data.val_fraction],
        "exclude": cfg.data.exclude,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def prepare_studies(cfg: Config, archive: str, cache: str, sampler: StudySampler, force: bool = False) -> StudyPrepareSummary:
    """Turn every study of ``archive`` into sample rows once (module docstring), into ``cache``.
    Reuses a cache whose fingerprint matches, unless ``force``. Needs Ray initialised."""
    start = time.perf_counter()
    archive, cache = storage.normalize(archive), storage.normalize(cache)
    listing = write_manifest(archive, storage.join(cache, "manifest"), cfg.data, cfg.storage)
    fingerprint = _fingerprint(cfg, archive, listing.digest, sampler)
    existing = CacheInfo.read(cache, cfg.storage)
    if existing and existing.fingerprint == fingerprint and not force:
        return StudyPrepareSummary(cache, True, listing.objects, listing.excluded, existing.counts, time.perf_counter() - start)

    settings = SeriesSettings(archive, cfg.storage, cfg.dicom.patient_salt)
    index = storage.join(cache, "studies")
    found = write_study_index(storage.join(cache, "manifest"), index, settings, cfg.data)
    keys = read_study_keys(index, cfg.storage)
    studies = keys.filter(pc.equal(keys[C.STATUS], C.STATUS_OK))
    splits = [assign_split(patient or uid, cfg.data.split_seed, cfg.data.train_fraction, cfg.data.val_fraction)
              for patient, uid in zip(studies[C.PATIENT_KEY].to_pylist(), studies[C.STUDY_INSTANCE_UID].to_pylist())]
    todo = studies.select([C.STUDY_INSTANCE_UID, DIGEST]).append_column(C.SPLIT, pa.array(splits, pa.string()))

    rows_dir = f"rows-{fingerprint[:16]}"
    rows_uri = storage.join(cache, rows_dir)
    storage.delete(rows_uri, cfg.storage)  # leftovers of an interrupted run with the same inputs
    schema = sampler.schema.append(pa.field(C.SPLIT, pa.string()))
    made = time.perf_counter()
    if todo.num_rows:
        ds = map_studies(index, todo, _samples, schema, settings, fn_kwargs={"sampler": sampler},
                         studies_per_task=sampler.studies_per_task, num_cpus=cfg.data.decode_num_cpus)
        fs, rows_path = storage.filesystem(rows_uri, cfg.storage)
        write_rows(ds, rows_path, fs)
    seconds = time.perf_counter() - made

    counts = _count(rows_uri, cfg, sampler, studies.num_rows)
    counts.update(objects=listing.objects, objects_in_no_study=found.rejected, row_bytes=sampler.row_bytes, class_noun=sampler.class_noun)
    info = CacheInfo(
        format=CACHE_FORMAT, fingerprint=fingerprint, rows_dir=rows_dir, archive=archive, labels=sampler.labels,
        image_size=sampler.image_size, resize="", codec=dict(sampler.fingerprint), class_column="", dicom=cfg.to_public_dict()["dicom"],
        preprocess=dict(sampler.inputs), counts=counts, created_at=time.time(),
    )
    storage.write_text(storage.join(cache, "config.yaml"), cfg.to_yaml(), cfg.storage)
    storage.write_text(storage.join(cache, "cache.json"), json.dumps(asdict(info), indent=2, default=str), cfg.storage)
    if existing and existing.rows_dir != rows_dir:  # superseded by the commit above
        storage.delete(storage.join(cache, existing.rows_dir), cfg.storage)
    summary = StudyPrepareSummary(cache, False, listing.objects, listing.excluded, counts, time.perf_counter() - start,
                                  studies.num_rows / max(seconds, 1e-9))
    storage.write_text(storage.join(cache, "summary.json"), json.dumps(asdict(summary), indent=2), cfg.storage)
    return summary


def _samples(study: Study, sampler: StudySampler) -> list[dict[str, Any]]:
    """One study task: the task's rows with the study's split. A study must give at least one row."""
    rows = sampler.fn(study, **sampler.kwargs)
    if not rows:
        raise RuntimeError(f"study {study.study_instance_uid}: the task made no row, not even an error row")
    split = study.extra[C.SPLIT]
    for row in rows:
        row[C.SPLIT] = split
    return rows


def _count(rows_uri: str, cfg: Config, sampler: StudySampler, studies: int) -> dict[str, Any]:
    """Counts from the written rows (small columns only); every study must have rows."""
    count_columns = dict(sampler.count_columns)
    ok = _read_rows_table(rows_uri, cfg.storage, [C.STUDY_INSTANCE_UID, C.SPLIT, *count_columns.values()], C.STATUS_OK)
    err = _read_rows_table(rows_uri, cfg.storage, [C.STUDY_INSTANCE_UID, C.REASON], C.STATUS_ERROR)
    ok_studies = set(ok[C.STUDY_INSTANCE_UID].to_pylist()) if ok.num_rows else set()
    err_studies = set(err[C.STUDY_INSTANCE_UID].to_pylist()) if err.num_rows else set()
    if len(ok_studies | err_studies) != studies:
        raise RuntimeError(f"the cache accounts for {len(ok_studies | err_studies)} of {studies} studies; "
                           "refusing to commit a cache that lost studies")
    split_col = [str(v) for v in ok[C.SPLIT].to_pylist()] if ok.num_rows else []
    per_split = dict(Counter(split_col))
    split_classes: dict[str, dict[str, int]] = {}
    for name, column in count_columns.items():
        values = ok[column].to_pylist() if ok.num_rows else []
        for split_name, value in zip(split_col, values):
            per_class = split_classes.setdefault(split_name, {n: 0 for n in count_columns})
            per_class[name] += int(value or 0)
    return {
        "ok": ok.num_rows,
        "samples": per_split,
        "splits": per_split,
        "split_classes": split_classes,
        "studies": len(ok_studies),
        "errors": len(err_studies),
        "reasons": dict(Counter(err[C.REASON].to_pylist())) if err.num_rows else {},
    }
