"""The decoded cache: an archive listed, decoded and preprocessed once, read by every epoch,
trial and evaluation (``medhier prepare``).

    archive ──manifest──▶ ingest rows ──▶ CACHE/rows-<fingerprint>/status=…/split=…/*.parquet
                                          CACHE/cache.json   (written last: the commit point)

The cache is reused while its fingerprint matches (the listing's digest, the labels file, the
labels codec, DICOM and preprocessing settings, splits) and rebuilt otherwise. ``cache.json``
describes it fully, so a cache is trusted and used without the config that made it.

Stratified splits (``data.split=stratified``, labelled archives) need every patient's labels
before any patient can be dealt, so the decoded rows are first written under
``CACHE/decoded-<fingerprint>/``, the patients are dealt from their small columns
(:func:`medhier.data.splits.stratified_splits`), and the rows are rewritten into their splits
(one more read and write of the decoded bytes; decoding is not repeated). ``counts`` names the
classes a split lacks (``missing_classes``) and the summary warns about them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import ray.data
from ray.data.expressions import col

from medhier import columns as C
from medhier.config import Config, ConfigError, PreprocessConfig, StorageConfig
from medhier.data.ingest import build_ingest, decode_settings
from medhier.data.labels import UNLABELLED, LabelCodec, Labels, default_labels_uri, read_labels
from medhier.data.manifest import ListingSummary, write_manifest
from medhier.data.splits import missing_classes, split_fractions, stratified_splits
from medhier.io import storage

__all__ = ["CACHE_FORMAT", "CacheInfo", "PrepareSummary", "cache_table", "check_preprocess_matches", "load_cache", "prepare", "write_rows"]

log = logging.getLogger(__name__)

# 2: label columns named by the task's codec (main_index, ...), counts per class.
# 3: manufacturer, pixel_spacing, study_date and the image's intensity statistics; stratified splits.
CACHE_FORMAT = 3


@dataclass
class CacheInfo:
    """``cache.json``: everything needed to trust and use a cache without the config that made it."""

    format: int
    fingerprint: str
    rows_dir: str  # relative to the cache root
    archive: str
    labels: str
    image_size: int
    resize: str
    codec: dict[str, Any]  # the labels codec's fingerprint (the taxonomy, for the classifier)
    class_column: str  # the integer label column that is >= 0 on labelled rows ("" when unlabelled)
    dicom: dict[str, Any]
    preprocess: dict[str, Any]
    counts: dict[str, Any]
    created_at: float

    @classmethod
    def read(cls, cache: str, storage_cfg: StorageConfig) -> CacheInfo | None:
        uri = storage.join(cache, "cache.json")
        try:
            data = json.loads(storage.read_bytes(uri, storage_cfg))
        except FileNotFoundError:
            return None
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: data.get(k) for k in known})

    def samples(self) -> dict[str, int]:
        """Labelled samples per split (what training and validation count): ``counts["samples"]``,
        or, in caches written before it existed, the per-class counts summed."""
        if "samples" in self.counts:
            return dict(self.counts["samples"])
        return {split: sum(per_class.values()) for split, per_class in self.counts.get("split_classes", {}).items()}

    def row_bytes(self) -> int:
        """About how many bytes one row takes (its image, its labels): ``counts["row_bytes"]``,
        else one uint8 image."""
        return int(self.counts.get("row_bytes") or self.image_size**2)


@dataclass
class PrepareSummary:
    """What ``prepare`` did, for the printed table and ``summary.json``."""

    cache: str
    reused: bool
    listing: ListingSummary
    counts: dict[str, Any]
    seconds: float
    images_per_s: float

    def table(self) -> str:
        c = self.counts
        width = max([15, *(len(r) + 2 for r in c["reasons"])])
        lines = [
            f"cache            {self.cache}" + ("  (up to date, reused)" if self.reused else ""),
            f"objects listed   {self.listing.objects:,}  ({self.listing.bytes / 1e6:,.1f} MB)",
            f"excluded         {self.listing.excluded:,}" + (f"  e.g. {', '.join(self.listing.excluded_examples[:3])}" if self.listing.excluded else ""),
            f"image rows       {c['ok']:,}   (train {c['splits'].get('train', 0):,} / val {c['splits'].get('val', 0):,} / test {c['splits'].get('test', 0):,})",
            f"unlabelled rows  {c['unlabelled']:,}",
            f"labels w/o file  {c['labels_without_file']:,}",
            # reason codes are up to 18 characters (unsupported_syntax): the column fits the longest
            f"error rows       {c['errors']:,}" + "".join(f"\n  {r:<{width}}{n:,}" for r, n in sorted(c["reasons"].items())),
        ]
        if c.get("classes"):
            lines.append(f"{'per ' + c.get('class_noun', 'class'):<17}" + ", ".join(f"{k} {v:,}" for k, v in c["classes"].items()))
        for split, names in c.get("missing_classes", {}).items():
            lines.append(f"WARNING          the {split} split has no {c.get('class_noun', 'class')} {', '.join(names)} (too few patients)")
        if not self.reused:
            lines.append(f"wall time        {self.seconds:,.1f} s   ({self.images_per_s:,.1f} images/s)")
        return "\n".join(lines)


def _fingerprint(cfg: Config, listing: ListingSummary, labels: Labels | None, codec: LabelCodec | None) -> str:
    dicom = asdict(cfg.dicom)
    dicom["patient_salt"] = hashlib.sha256(dicom["patient_salt"].encode()).hexdigest()  # keys depend on it
    parts = {
        "format": CACHE_FORMAT,
        "archive": listing.archive,
        "listing": listing.digest,
        "labels": labels.digest if labels else "",
        "codec": codec.fingerprint() if codec else {},
        "dicom": dicom,
        "image_size": cfg.preprocess.image_size,
        "resize": cfg.preprocess.resize,
        "split": [cfg.data.split, cfg.data.split_seed, cfg.data.train_fraction, cfg.data.val_fraction],
        "exclude": cfg.data.exclude,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def prepare(cfg: Config, archive: str, cache: str, labels_uri: str = "", force: bool = False,
            codec: LabelCodec | None = None) -> PrepareSummary:
    """List, decode and preprocess an archive once into a cache that epochs and trials read.

    ``codec``: the task's labels codec; without one the cache holds no labels. The labels
    manifest is ``labels_uri``, else ``data.labels``, else ``<archive>/labels.csv`` when it exists.
    Reuses an existing cache whose fingerprint matches, unless ``force``. Needs Ray initialised.
    """
    start = time.perf_counter()
    archive, cache = storage.normalize(archive), storage.normalize(cache)
    labels_uri = (labels_uri or cfg.data.labels or default_labels_uri(archive, cfg.storage)) if codec else ""
    labels = read_labels(labels_uri, codec, cfg.storage) if labels_uri else None

    listing = write_manifest(archive, storage.join(cache, "manifest"), cfg.data, cfg.storage)
    fingerprint = _fingerprint(cfg, listing, labels, codec)
    existing = CacheInfo.read(cache, cfg.storage)
    if existing and existing.fingerprint == fingerprint and not force:
        return PrepareSummary(cache, True, listing, existing.counts, time.perf_counter() - start, 0.0)

    rows_dir = f"rows-{fingerprint[:16]}"
    rows_uri = storage.join(cache, rows_dir)
    storage.delete(rows_uri, cfg.storage)  # leftovers of an interrupted run with the same inputs
    decode_seconds = _decode_into(cfg, archive, cache, rows_uri, labels, f"decoded-{fingerprint[:16]}")

    counts = _count_rows(rows_uri, cfg.storage, labels)
    counts["objects"] = listing.objects
    if labels:
        counts["missing_classes"] = missing_classes(counts["split_classes"], labels.codec.class_names,
                                                    list(split_fractions(cfg.data.train_fraction, cfg.data.val_fraction)))
        for split, names in counts["missing_classes"].items():
            log.warning("the %s split has no %s %s: too few labelled patients", split, labels.codec.class_noun, ", ".join(names))
    _check_every_object_has_a_row(counts, listing)
    info = CacheInfo(
        format=CACHE_FORMAT,
        fingerprint=fingerprint,
        rows_dir=rows_dir,
        archive=archive,
        labels=labels_uri,
        image_size=cfg.preprocess.image_size,
        resize=cfg.preprocess.resize,
        codec=codec.fingerprint() if codec else {},
        class_column=labels.codec.class_column if labels else "",
        dicom=cfg.to_public_dict()["dicom"],
        preprocess=asdict(cfg.preprocess),
        counts=counts,
        created_at=time.time(),
    )
    storage.write_text(storage.join(cache, "config.yaml"), cfg.to_yaml(), cfg.storage)
    storage.write_text(storage.join(cache, "cache.json"), json.dumps(asdict(info), indent=2), cfg.storage)
    if existing and existing.rows_dir != rows_dir:  # superseded by the commit above
        storage.delete(storage.join(cache, existing.rows_dir), cfg.storage)
    seconds = time.perf_counter() - start
    summary = PrepareSummary(cache, False, listing, counts, seconds, counts["ok"] / max(decode_seconds, 1e-9))
    storage.write_text(storage.join(cache, "summary.json"), json.dumps(asdict(summary), indent=2), cfg.storage)
    return summary


def _decode_into(cfg: Config, archive: str, cache: str, rows_uri: str, labels: Labels | None, decoded_dir: str) -> float:
    """Decode the cache's manifest into ``rows_uri`` -> the seconds decoding took. Stratified
    splits need every patient's labels first: the rows are decoded into ``decoded_dir`` (under
    ``cache``), then rewritten into their splits, and the folder removed."""
    ds = build_ingest(storage.join(cache, "manifest"), decode_settings(cfg, archive, labels), cfg.data)
    fs, rows_path = storage.filesystem(rows_uri, cfg.storage)
    start = time.perf_counter()
    if not (labels and cfg.data.split == "stratified"):
        write_rows(ds, rows_path, fs)
        return time.perf_counter() - start
    decoded_uri = storage.join(cache, decoded_dir)
    storage.delete(decoded_uri, cfg.storage)
    _, decoded_path = storage.filesystem(decoded_uri, cfg.storage)
    write_rows(ds, decoded_path, fs)
    seconds = time.perf_counter() - start
    _write_stratified(decoded_uri, rows_uri, cfg, labels)
    storage.delete(decoded_uri, cfg.storage)
    return seconds


def write_rows(ds, path: str, fs) -> None:
    """Write decoded rows as the cache's Parquet, partitioned by status and split. zstd: the
    cache is about a sixth smaller than with snappy and as fast to write."""
    ds.write_parquet(path, filesystem=fs, partition_cols=[C.STATUS, C.SPLIT], compression="zstd")


def _write_stratified(decoded_uri: str, rows_uri: str, cfg: Config, labels: Labels) -> None:
    """Deal the decoded rows' patients into stratified splits and write the rows there."""
    class_column = labels.codec.class_column
    small = _read_rows_table(decoded_uri, cfg.storage, [C.PATH, C.PATIENT_KEY, C.STUDY_INSTANCE_UID, class_column], C.STATUS_OK)
    groups = _group_keys(small)
    classes = np.asarray(small.column(class_column).to_numpy(zero_copy_only=False), np.int64) if small.num_rows else np.zeros(0, np.int64)
    assignment = stratified_splits(groups, classes, len(labels.codec.class_names), cfg.data.split_seed, cfg.data.train_fraction,
                                   cfg.data.val_fraction)
    fs, decoded_path = storage.filesystem(decoded_uri, cfg.storage)
    _, rows_path = storage.filesystem(rows_uri, cfg.storage)
    ds = _read_parquet(decoded_path, fs)  # status and split come back from the hive paths
    write_rows(ds.map_batches(_assign_splits, fn_kwargs={"assignment": assignment}, batch_format="pyarrow"), rows_path, fs)


def _read_parquet(path: str, fs) -> ray.data.Dataset:
    """``ray.data.read_parquet`` without the progress bar of its footer sampling: Ray's V1 reader
    (see ``medhier.runtime.use_v1_parquet_reader``) samples a few files while the dataset is
    made, which takes a moment and would put a bar between medhier's own lines. The dataset's
    own stages keep the caller's progress setting."""
    ctx = ray.data.DataContext.get_current()
    shown, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    try:
        ds = ray.data.read_parquet(path, filesystem=fs)
    finally:
        ctx.enable_progress_bars = shown
    ds.context.enable_progress_bars = shown  # the dataset copied the context while the bar was off
    return ds


def _group_keys(table: pa.Table) -> list[str]:
    """Each row's patient as :func:`medhier.data.splits.split_key` decides it."""
    columns = [table.column(c).to_pylist() for c in (C.PATIENT_KEY, C.STUDY_INSTANCE_UID, C.PATH)]
    return [patient or study or path for patient, study, path in zip(*columns)]


def _assign_splits(batch: pa.Table, assignment: dict[str, str]) -> pa.Table:
    """Rows read back from ``decoded-*`` -> the same rows with their stratified split (error rows keep theirs)."""
    keys = _group_keys(batch)
    ok = batch.column(C.STATUS).to_pylist()
    old = batch.column(C.SPLIT).to_pylist()
    split = [assignment.get(k, s) if status == C.STATUS_OK else s for k, status, s in zip(keys, ok, old)]
    return batch.set_column(batch.schema.get_field_index(C.SPLIT), C.SPLIT, pa.array(split, pa.string()))


def cache_table(cache: str, storage_cfg: StorageConfig, columns: list[str], split: str | None = None, labelled_only: bool = True) -> pa.Table:
    """Small columns of a committed cache's ok rows (one split, or all with a ``split`` column)
    read here with pyarrow: for profiles and counts, never for images."""
    cache = storage.normalize(cache)
    info = CacheInfo.read(cache, storage_cfg)
    if info is None:
        raise FileNotFoundError(f"no committed cache at {cache!r} (cache.json missing): run `medhier prepare`")
    sub = f"{C.STATUS}={C.STATUS_OK}" + (f"/{C.SPLIT}={split}" if split else "")
    fs, path = storage.filesystem(storage.join(cache, info.rows_dir, sub), storage_cfg)
    if fs.get_file_info(path).type == storage.pafs.FileType.NotFound:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    dataset = pads.dataset(path, filesystem=fs, format="parquet", partitioning=None if split else "hive")
    keep = (pads.field(info.class_column) >= 0) if labelled_only and info.class_column else None
    return dataset.to_table(columns=columns, filter=keep)


def _read_rows_table(rows_uri: str, storage_cfg: StorageConfig, columns: list[str], status: str) -> pa.Table:
    fs, path = storage.filesystem(storage.join(rows_uri, f"{C.STATUS}={status}"), storage_cfg)
    if fs.get_file_info(path).type == storage.pafs.FileType.NotFound:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    dataset = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
    return dataset.to_table(columns=columns)


def _count_rows(rows_uri: str, storage_cfg: StorageConfig, labels: Labels | None) -> dict[str, Any]:
    """Counts from the written rows (only small columns are read back)."""
    class_column = labels.codec.class_column if labels else None
    ok = _read_rows_table(rows_uri, storage_cfg, [C.PATH, C.SPLIT, *([class_column] if class_column else [])], C.STATUS_OK)
    err = _read_rows_table(rows_uri, storage_cfg, [C.PATH, C.REASON], C.STATUS_ERROR)
    classes = (np.asarray(ok.column(class_column).to_numpy(zero_copy_only=False), dtype=np.int64)
               if class_column and ok.num_rows else np.full(ok.num_rows, UNLABELLED, np.int64))
    names = labels.codec.class_names if labels else ()
    ok_paths = set(ok.column(C.PATH).to_pylist()) if ok.num_rows else set()
    err_paths = set(err.column(C.PATH).to_pylist()) if err.num_rows else set()
    split_col = [str(v) for v in ok.column(C.SPLIT).to_pylist()] if ok.num_rows else []
    split_classes: dict[str, dict[str, int]] = {}
    for split_name, index in zip(split_col, classes.tolist()):
        if index != UNLABELLED:
            per_class = split_classes.setdefault(split_name, {})
            per_class[names[index]] = per_class.get(names[index], 0) + 1
    return {
        "ok": ok.num_rows,
        "samples": {split: sum(per_class.values()) for split, per_class in split_classes.items()},  # labelled images per split
        "split_classes": split_classes,  # labelled images per split and class (class weights)
        "errors": err.num_rows,
        "objects_ok": len(ok_paths),
        "objects_error": len(err_paths),
        "reasons": dict(Counter(err.column(C.REASON).to_pylist())) if err.num_rows else {},
        "splits": dict(Counter(split_col)),
        "classes": {name: int((classes == i).sum()) for i, name in enumerate(names)},
        "class_noun": labels.codec.class_noun if labels else "class",
        "unlabelled": int((classes == UNLABELLED).sum()),
        "labels_without_file": _labels_without_file(rows_uri, storage_cfg, labels, ok_paths | err_paths),
    }


def _labels_without_file(rows_uri: str, storage_cfg: StorageConfig, labels: Labels | None, paths: set[str]) -> int:
    if labels is None:
        return 0
    if labels.by == C.PATH:
        return sum(1 for k in labels.table if k not in paths)
    seen = set(_read_rows_table(rows_uri, storage_cfg, [C.SOP_INSTANCE_UID], C.STATUS_OK).column(C.SOP_INSTANCE_UID).to_pylist())
    return sum(1 for k in labels.table if k not in seen)


def _check_every_object_has_a_row(counts: dict[str, Any], listing: ListingSummary) -> None:
    accounted = counts["objects_ok"] + counts["objects_error"]
    if accounted != listing.objects:
        raise RuntimeError(
            f"cache accounts for {accounted} of {listing.objects} listed objects; "
            "refusing to commit a cache that lost files"
        )


def load_cache(
    cache: str,
    storage_cfg: StorageConfig,
    split: str | None = None,
    columns: list[str] | None = None,
    labelled_only: bool = True,
    in_memory_below: int = 0,
):
    """The ok rows of a committed cache as a Ray dataset (optionally one split).

    ``labelled_only``: only rows whose class column (the codec's) is set; a cache without a class
    column whose every row is a labelled sample (a cache of studies, :mod:`medhier.data.study_cache`)
    is read whole. ``in_memory_below``: when the split's rows take fewer bytes
    (:meth:`CacheInfo.row_bytes` each, as counted at prepare time), read them
    here with pyarrow and hand them to Ray as in-memory blocks. Small medical data sets then
    cost no Parquet-read tasks at all, whose start-up (seconds) would otherwise dominate every
    epoch and every trial; large ones keep streaming.
    -> (dataset, CacheInfo). Raises FileNotFoundError when the cache was never committed.
    """
    cache = storage.normalize(cache)
    info = CacheInfo.read(cache, storage_cfg)
    if info is None:
        raise FileNotFoundError(f"no committed cache at {cache!r} (cache.json missing): run `medhier prepare`")
    if info.format != CACHE_FORMAT:
        raise ValueError(f"cache at {cache!r} has format {info.format}, this medhier reads {CACHE_FORMAT}: re-run prepare")
    sub = f"{C.STATUS}={C.STATUS_OK}" + (f"/{C.SPLIT}={split}" if split else "")
    fs, path = storage.filesystem(storage.join(cache, info.rows_dir, sub), storage_cfg)
    if fs.get_file_info(path).type == storage.pafs.FileType.NotFound:
        raise FileNotFoundError(f"cache at {cache!r} has no rows for split {split!r}")
    if labelled_only and not info.class_column and not sum(info.samples().values()):
        raise ValueError(f"cache at {cache!r} holds no labels: pass a labels manifest to prepare")
    by_class = labelled_only and bool(info.class_column)
    rows = info.counts["splits"].get(split, 0) if split else info.counts["ok"]
    if rows * info.row_bytes() < in_memory_below:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
        table = dataset.to_table(columns=columns, filter=(pads.field(info.class_column) >= 0) if by_class else None)
        # a few blocks, so that streaming_split can spread them over the workers
        chunk = max(1, -(-table.num_rows // 8))
        return ray.data.from_arrow([table.slice(i, chunk) for i in range(0, max(table.num_rows, 1), chunk)]), info
    ds = _read_parquet(path, fs)
    if by_class:
        ds = ds.filter(expr=col(info.class_column) >= 0)  # pushed down to the Parquet reader
    if columns:
        ds = ds.select_columns(columns)
    return ds, info


def check_preprocess_matches(info: CacheInfo, cfg: PreprocessConfig) -> None:
    """A cache made at another image size or resize mode would silently change the model's input."""
    if info.image_size != cfg.image_size or info.resize != cfg.resize:
        raise ConfigError(
            f"cache was made with image_size={info.image_size}, resize={info.resize!r} but the config asks "
            f"preprocess.image_size={cfg.image_size}, preprocess.resize={cfg.resize!r}: re-run prepare"
        )
