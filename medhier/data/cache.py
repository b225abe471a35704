"""The Ray Data pipelines: archive listing, DICOM ingest, the preprocessed cache, splits.

This is the only module that builds Ray datasets.

    archive ──list (streamed)──▶ manifest Parquet ──read_parquet──▶ decode tasks ──▶ rows
                                                                    (fetch bytes, decode,
                                                                     resize, labels, split)

Every listed object yields at least one row: ``status == "ok"`` with an image, or
``status == "error"`` with a reason code and a message. Nothing is dropped silently; objects
matching ``data.exclude`` are counted in the listing summary.

The cache (``medhier prepare``) is the rows written once as Parquet, partitioned by status and
split, plus ``cache.json`` (written last: the commit point) that describes it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from medhier import columns as C
from medhier.io import storage
from medhier.config import Config, ConfigError, DataConfig, DicomConfig, PreprocessConfig, StorageConfig
from medhier.io.dicom import REASONS, DicomRejected, decode
from medhier.classify.presets import resize_image, to_uint8
from medhier.classify.taxonomy import UNLABELLED, Taxonomy, TaxonomyError

__all__ = [
    "CACHE_FORMAT",
    "ERROR_REASONS",
    "CacheInfo",
    "Labels",
    "ListingSummary",
    "PrepareSummary",
    "assign_split",
    "build_ingest",
    "load_cache",
    "prepare",
    "read_labels",
    "write_manifest",
]

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the cache layout or preprocessing semantics change
# Rejections from medhier.dicom plus failures around it; all become error rows.
ERROR_REASONS: dict[str, str] = {
    **REASONS,
    "read_error": "the object could not be read from storage",
    "internal_error": "an unexpected error in medhier while decoding (a bug: please report it)",
}
MANIFEST_SCHEMA = pa.schema(
    [(C.PATH, pa.string()), (C.SIZE, pa.int64()), (C.ETAG, pa.string()), (C.MTIME, pa.float64())]
)


# -- listing -------------------------------------------------------------------------------


@dataclass
class ListingSummary:
    """What the archive listing found. ``digest`` changes when any object is added, removed or
    modified (order-independent, so parallel S3 listing gives the same value)."""

    archive: str
    objects: int = 0
    bytes: int = 0
    excluded: int = 0
    excluded_examples: list[str] = field(default_factory=list)
    manifest_files: int = 0
    digest: str = ""


def write_manifest(archive: str, manifest: str, data_cfg: DataConfig, storage_cfg: StorageConfig) -> ListingSummary:
    """Stream the archive's listing into Parquet files under ``manifest`` (path, size, etag,
    mtime), ``data_cfg.manifest_rows_per_file`` rows per file. Memory stays at one file's rows.

    Raises FileNotFoundError naming the archive when it does not exist or is empty.
    """
    archive = storage.normalize(archive)
    storage.delete(manifest, storage_cfg)
    storage.makedirs(manifest, storage_cfg)
    fs, base = storage.filesystem(manifest, storage_cfg)
    summary = ListingSummary(archive=archive)
    excluded: list[str] = []
    digest = 0
    buffer: list = []

    def flush(rows: list) -> None:
        table = pa.Table.from_pylist([asdict(o) for o in rows], schema=MANIFEST_SCHEMA)
        with fs.open_output_stream(f"{base}/part-{summary.manifest_files:05d}.parquet") as f:
            # One row group per decode task: the unit of work the ingest hands to a CPU.
            pq.write_table(table, f, row_group_size=data_cfg.decode_batch_size)
        summary.manifest_files += 1

    for page in storage.list_objects(archive, storage_cfg, exclude=data_cfg.exclude, excluded=excluded):
        for obj in page:
            h = hashlib.sha256(f"{obj.path}\0{obj.size}\0{obj.etag}\0{obj.mtime}".encode()).digest()
            digest = (digest + int.from_bytes(h, "big")) % (1 << 256)
            summary.objects += 1
            summary.bytes += obj.size
        buffer.extend(page)
        while len(buffer) >= data_cfg.manifest_rows_per_file:
            flush(buffer[: data_cfg.manifest_rows_per_file])
            del buffer[: data_cfg.manifest_rows_per_file]
        summary.excluded = len(excluded)
        del excluded[5:]  # keep a few examples, not the whole list
        summary.excluded_examples = list(excluded)
    if buffer:
        flush(buffer)
    if summary.objects == 0:
        raise FileNotFoundError(
            f"archive {archive!r} has no candidate files"
            + (f" ({summary.excluded} excluded by data.exclude)" if summary.excluded else "")
        )
    summary.digest = f"{digest:064x}"
    return summary


# -- labels --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Labels:
    """A labels manifest, validated against the taxonomy.

    ``by``: "path" (relative to the archive root) or "sop_instance_uid". ``table``: key ->
    (main, sub, main index, sub index within main, leaf index).
    """

    uri: str
    by: str
    table: dict[str, tuple[str, str, int, int, int]]
    digest: str

    def lookup(self, path: str, sop_uid: str) -> tuple[str, str, int, int, int] | None:
        return self.table.get(path if self.by == C.PATH else sop_uid)


def read_labels(uri: str, taxonomy: Taxonomy, storage_cfg: StorageConfig) -> Labels:
    """Read and validate a CSV or Parquet labels manifest.

    Columns: ``main``, ``sub`` (may be empty when the main class has one subclass) and a key,
    ``path`` or ``sop_instance_uid``. Errors name the file, the row and the problem.
    """
    try:
        raw = storage.read_bytes(uri, storage_cfg)
    except FileNotFoundError:
        raise FileNotFoundError(f"labels manifest {uri!r} not found") from None
    try:
        if uri.lower().endswith(".parquet"):
            table = pq.read_table(io.BytesIO(raw))
        else:
            table = pacsv.read_csv(
                io.BytesIO(raw), convert_options=pacsv.ConvertOptions(strings_can_be_null=False, column_types={
                    C.PATH: pa.string(), C.MAIN: pa.string(), C.SUB: pa.string(), C.SOP_INSTANCE_UID: pa.string()})
            )
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"labels manifest {uri!r} could not be parsed: {exc}") from None
    names = table.column_names
    key = C.PATH if C.PATH in names else C.SOP_INSTANCE_UID if C.SOP_INSTANCE_UID in names else None
    missing = [c for c in (C.MAIN, C.SUB) if c not in names]
    if key is None or missing:
        need = missing + ([] if key else ["path or sop_instance_uid"])
        raise ValueError(f"labels manifest {uri!r}: missing column(s) {need}; found {names}")
    rows: dict[str, tuple[str, str, int, int, int]] = {}
    keys, mains, subs = (table.column(c).to_pylist() for c in (key, C.MAIN, C.SUB))
    line_offset = 2 if not uri.lower().endswith(".parquet") else 0  # CSV: header is line 1
    where = "line" if line_offset else "row"
    for i, (k, main, sub) in enumerate(zip(keys, mains, subs)):
        pos = f"{uri} {where} {i + line_offset}"
        k, main, sub = (str(v or "").strip() for v in (k, main, sub))
        if not k:
            raise ValueError(f"{pos}: empty {key}")
        if key == C.PATH:
            k = k.lstrip("/")
        if not sub:
            try:
                subs_of_main = taxonomy.subs[taxonomy.main_index(main)]
            except TaxonomyError as exc:
                raise TaxonomyError(f"{pos}: {exc}") from None
            if len(subs_of_main) != 1:
                raise TaxonomyError(f"{pos}: empty subclass for {main!r}, which has {list(subs_of_main)}")
            sub = subs_of_main[0]
        try:
            m, s, leaf = taxonomy.encode(main, sub)
        except TaxonomyError as exc:
            raise TaxonomyError(f"{pos}: {exc}") from None
        if k in rows:
            raise ValueError(f"{pos}: {key} {k!r} is labelled twice")
        rows[k] = (main, sub, m, s, leaf)
    return Labels(uri=uri, by=key, table=rows, digest=hashlib.sha256(raw).hexdigest())


def default_labels_uri(archive: str, storage_cfg: StorageConfig) -> str:
    """``<archive>/labels.csv`` when it exists (what ``medhier synth`` writes), else ""."""
    candidate = storage.join(storage.normalize(archive), "labels.csv")
    return candidate if storage.exists(candidate, storage_cfg) else ""


# -- splits --------------------------------------------------------------------------------


def assign_split(key: str, seed: int, train_fraction: float, val_fraction: float) -> str:
    """Deterministic split for a patient key: the same patient always lands in the same split,
    whatever the order or partitioning of the data, so no patient is in two splits."""
    h = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    if u < train_fraction:
        return "train"
    if u < train_fraction + val_fraction:
        return "val"
    return "test"


# -- decode stage --------------------------------------------------------------------------

_OUTPUT_COLUMNS = (
    C.PATH, C.SIZE, C.ETAG, C.MTIME, C.STATUS, C.REASON, C.ERROR, C.IMAGE,
    *C.META_COLUMNS, C.MAIN, C.SUB, C.MAIN_LABEL, C.SUB_LABEL, C.LEAF_LABEL, C.SPLIT,
)
NO_SPLIT = "none"  # error rows have no patient, hence no split (and a readable partition name)
_INT_COLUMNS = {C.SIZE, C.FRAME, C.NUM_FRAMES, C.ROWS, C.COLUMNS, C.MAIN_LABEL, C.SUB_LABEL, C.LEAF_LABEL}
_FETCH_POOL: ThreadPoolExecutor | None = None


def _fetch_pool(threads: int) -> ThreadPoolExecutor:
    # One pool per worker process, reused by every task that process runs.
    global _FETCH_POOL
    if _FETCH_POOL is None or _FETCH_POOL._max_workers != threads:
        _FETCH_POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="medhier-fetch")
    return _FETCH_POOL


def _prefetch(pool: ThreadPoolExecutor, fn, items: list, ahead: int):
    """``pool.map(fn, items)`` with at most ``ahead`` results in flight: a batch of large
    multi-frame objects must not all sit in memory before the first is decoded."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@dataclass(frozen=True)
class DecodeSettings:
    """Everything a decode task needs, small and picklable."""

    archive: str
    storage: StorageConfig
    dicom: DicomConfig
    image_size: int
    resize: str
    split_seed: int
    train_fraction: float
    val_fraction: float
    labels: Labels | None = None


def decode_batch(batch: dict[str, np.ndarray], settings: DecodeSettings) -> dict[str, np.ndarray]:
    """Manifest rows -> image rows (one per selected frame) or error rows (one per object).

    Input columns: path, size, etag, mtime. Output: :data:`_OUTPUT_COLUMNS`.
    """
    paths = [str(p) for p in batch[C.PATH]]
    fs, base = storage.filesystem(settings.archive, settings.storage)

    def fetch(rel: str) -> bytes | Exception:
        try:
            with fs.open_input_stream(f"{base}/{rel}") as f:
                return f.read()
        except Exception as exc:  # reported as a read_error row, never raised
            return exc

    # Object stores answer each GET in tens of milliseconds: fetch concurrently (ahead of the
    # decoder, in order), decode serially as the bytes arrive.
    blobs = _prefetch(_fetch_pool(settings.storage.read_threads), fetch, paths, ahead=2 * settings.storage.read_threads)
    out: dict[str, list] = {c: [] for c in _OUTPUT_COLUMNS}
    for i, (rel, blob) in enumerate(zip(paths, blobs)):
        source = {C.PATH: rel, C.SIZE: int(batch[C.SIZE][i]), C.ETAG: str(batch[C.ETAG][i]), C.MTIME: float(batch[C.MTIME][i])}
        if isinstance(blob, Exception):
            _append_error(out, source, "read_error", f"{rel}: {type(blob).__name__}: {blob}", settings)
            continue
        try:
            decoded = decode(blob, settings.dicom, source=rel)
        except DicomRejected as exc:
            _append_error(out, source, exc.reason, exc.message, settings)
            continue
        except Exception as exc:  # a bug must cost one row, not the archive
            _append_error(out, source, "internal_error", f"{rel}: {type(exc).__name__}: {exc}", settings)
            continue
        label = settings.labels.lookup(rel, decoded.meta[C.SOP_INSTANCE_UID]) if settings.labels else None
        split = _split_for(decoded.meta, rel, settings)
        for frame, pixels in zip(decoded.frames, decoded.pixels):
            image = to_uint8(resize_image(pixels, settings.image_size, settings.resize))
            row = {**source, C.STATUS: C.STATUS_OK, C.REASON: "", C.ERROR: "", C.IMAGE: image.tobytes()}
            row.update({k: decoded.meta.get(k, "") for k in C.META_COLUMNS})
            row[C.FRAME] = frame
            row.update(_label_columns(label))
            row[C.SPLIT] = split
            for k in _OUTPUT_COLUMNS:
                out[k].append(row[k])
    return {k: _column(k, v) for k, v in out.items()}


def _split_for(meta: dict[str, Any], rel: str, settings: DecodeSettings) -> str:
    # Patients define splits; without a patient ID fall back to the study, then the file.
    key = meta.get(C.PATIENT_KEY) or meta.get(C.STUDY_INSTANCE_UID) or rel
    return assign_split(key, settings.split_seed, settings.train_fraction, settings.val_fraction)


def _label_columns(label) -> dict[str, Any]:
    if label is None:
        return {C.MAIN: "", C.SUB: "", C.MAIN_LABEL: UNLABELLED, C.SUB_LABEL: UNLABELLED, C.LEAF_LABEL: UNLABELLED}
    main, sub, m, s, leaf = label
    return {C.MAIN: main, C.SUB: sub, C.MAIN_LABEL: m, C.SUB_LABEL: s, C.LEAF_LABEL: leaf}


def _append_error(out: dict[str, list], source: dict[str, Any], reason: str, message: str, settings: DecodeSettings) -> None:
    row = {**source, C.STATUS: C.STATUS_ERROR, C.REASON: reason, C.ERROR: message, C.IMAGE: b""}
    row.update({k: "" for k in C.META_COLUMNS})
    row.update({C.FRAME: -1, C.NUM_FRAMES: 0, C.ROWS: 0, C.COLUMNS: 0})
    label = settings.labels.lookup(source[C.PATH], "") if settings.labels else None
    row.update(_label_columns(label))
    row[C.SPLIT] = NO_SPLIT
    for k in _OUTPUT_COLUMNS:
        out[k].append(row[k])


def _column(name: str, values: list) -> np.ndarray:
    if name in _INT_COLUMNS:
        return np.asarray(values, dtype=np.int64)
    if name == C.MTIME:
        return np.asarray(values, dtype=np.float64)
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def build_ingest(manifest: str, settings: DecodeSettings, data_cfg: DataConfig):
    """A streaming Ray dataset of decoded rows (ok and error) from a manifest written by
    :func:`write_manifest`. Nothing runs until the dataset is consumed.

    The work items are the manifest's row groups (``decode_batch_size`` objects each): the
    driver holds one small (file, row group) pair per task, never the keys themselves, and each
    task reads its own slice of the manifest. Large tasks matter on small machines: Ray Data's
    scheduler notices a finished task up to 0.1 s late, which costs a fifth of the CPU time
    with 0.4-second tasks and a twentieth with 1.5-second ones.
    """
    import ray.data

    fs, path = storage.filesystem(manifest, settings.storage)
    files = sorted(i.path for i in fs.get_file_info(storage.pafs.FileSelector(path)) if i.path.endswith(".parquet"))
    items = []
    for f in files:
        with fs.open_input_file(f) as handle:
            groups = pq.ParquetFile(handle).num_row_groups
        items.extend({"manifest_file": f, "row_group": g} for g in range(groups))
    if not items:
        raise FileNotFoundError(f"manifest {manifest!r} lists no objects")
    work = ray.data.from_items(items, override_num_blocks=len(items))
    return work.map_batches(
        decode_manifest_slice,
        fn_kwargs={"settings": settings, "manifest_uri": manifest},
        batch_size=1,
        batch_format="numpy",
        num_cpus=data_cfg.decode_num_cpus,
    )


def decode_manifest_slice(item: dict[str, np.ndarray], settings: DecodeSettings, manifest_uri: str) -> dict[str, np.ndarray]:
    """One work item (a manifest file's row group) -> decoded rows, see :func:`decode_batch`."""
    fs, _ = storage.filesystem(manifest_uri, settings.storage)
    outputs = []
    for f, g in zip(item["manifest_file"], item["row_group"]):
        with fs.open_input_file(str(f)) as handle:
            table = pq.ParquetFile(handle).read_row_group(int(g))
        outputs.append(decode_batch({c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}, settings))
    if len(outputs) == 1:
        return outputs[0]
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}


def decode_settings(cfg: Config, archive: str, labels: Labels | None) -> DecodeSettings:
    return DecodeSettings(
        archive=storage.normalize(archive),
        storage=cfg.storage,
        dicom=cfg.dicom,
        image_size=cfg.preprocess.image_size,
        resize=cfg.preprocess.resize,
        split_seed=cfg.data.split_seed,
        train_fraction=cfg.data.train_fraction,
        val_fraction=cfg.data.val_fraction,
        labels=labels,
    )


# -- the cache -----------------------------------------------------------------------------


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
    taxonomy: dict[str, Any]
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
        return cls(**{k: v for k, v in data.items() if k in known})


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
        lines = [
            f"cache            {self.cache}" + ("  (up to date, reused)" if self.reused else ""),
            f"objects listed   {self.listing.objects:,}  ({self.listing.bytes / 1e6:,.1f} MB)",
            f"excluded         {self.listing.excluded:,}" + (f"  e.g. {', '.join(self.listing.excluded_examples[:3])}" if self.listing.excluded else ""),
            f"image rows       {c['ok']:,}   (train {c['splits'].get('train', 0):,} / val {c['splits'].get('val', 0):,} / test {c['splits'].get('test', 0):,})",
            f"unlabelled rows  {c['unlabelled']:,}",
            f"labels w/o file  {c['labels_without_file']:,}",
            f"error rows       {c['errors']:,}" + "".join(f"\n  {r:<15}{n:,}" for r, n in sorted(c["reasons"].items())),
        ]
        if c.get("leaves"):
            lines.append("per leaf         " + ", ".join(f"{k} {v:,}" for k, v in c["leaves"].items()))
        if not self.reused:
            lines.append(f"wall time        {self.seconds:,.1f} s   ({self.images_per_s:,.1f} images/s)")
        return "\n".join(lines)


def _fingerprint(cfg: Config, listing: ListingSummary, labels: Labels | None, taxonomy: Taxonomy) -> str:
    dicom = asdict(cfg.dicom)
    dicom["patient_salt"] = hashlib.sha256(dicom["patient_salt"].encode()).hexdigest()  # keys depend on it
    parts = {
        "format": CACHE_FORMAT,
        "archive": listing.archive,
        "listing": listing.digest,
        "labels": labels.digest if labels else "",
        "taxonomy": taxonomy.to_dict(),
        "dicom": dicom,
        "image_size": cfg.preprocess.image_size,
        "resize": cfg.preprocess.resize,
        "split": [cfg.data.split_seed, cfg.data.train_fraction, cfg.data.val_fraction],
        "exclude": cfg.data.exclude,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def prepare(cfg: Config, archive: str, cache: str, labels_uri: str = "", force: bool = False) -> PrepareSummary:
    """List, decode and preprocess an archive once into a cache that epochs and trials read.

    Reuses an existing cache whose fingerprint (listing, labels, preprocessing, taxonomy,
    splits) matches, unless ``force``. Needs Ray to be initialised.
    """
    start = time.perf_counter()
    archive, cache = storage.normalize(archive), storage.normalize(cache)
    taxonomy = Taxonomy.from_config(cfg.taxonomy)
    labels_uri = labels_uri or cfg.data.labels or default_labels_uri(archive, cfg.storage)
    labels = read_labels(labels_uri, taxonomy, cfg.storage) if labels_uri else None

    listing = write_manifest(archive, storage.join(cache, "manifest"), cfg.data, cfg.storage)
    fingerprint = _fingerprint(cfg, listing, labels, taxonomy)
    existing = CacheInfo.read(cache, cfg.storage)
    if existing and existing.fingerprint == fingerprint and not force:
        return PrepareSummary(cache, True, listing, existing.counts, time.perf_counter() - start, 0.0)

    rows_dir = f"rows-{fingerprint[:16]}"
    rows_uri = storage.join(cache, rows_dir)
    storage.delete(rows_uri, cfg.storage)  # leftovers of an interrupted run with the same inputs
    settings = decode_settings(cfg, archive, labels)
    ds = build_ingest(storage.join(cache, "manifest"), settings, cfg.data)
    fs, rows_path = storage.filesystem(rows_uri, cfg.storage)
    decode_start = time.perf_counter()
    write_rows(ds, rows_path, fs)
    decode_seconds = time.perf_counter() - decode_start

    counts = _count_rows(rows_uri, cfg.storage, taxonomy, labels)
    counts["objects"] = listing.objects
    _check_every_object_has_a_row(counts, listing)
    info = CacheInfo(
        format=CACHE_FORMAT,
        fingerprint=fingerprint,
        rows_dir=rows_dir,
        archive=archive,
        labels=labels_uri,
        image_size=cfg.preprocess.image_size,
        resize=cfg.preprocess.resize,
        taxonomy=taxonomy.to_dict(),
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


def write_rows(ds, path: str, fs) -> None:
    """Write decoded rows as the cache's Parquet, partitioned by status and split. zstd: the
    cache is about a sixth smaller than with snappy and as fast to write."""
    ds.write_parquet(path, filesystem=fs, partition_cols=[C.STATUS, C.SPLIT], compression="zstd")


def _read_rows_table(rows_uri: str, storage_cfg: StorageConfig, columns: list[str], status: str) -> pa.Table:
    fs, path = storage.filesystem(storage.join(rows_uri, f"{C.STATUS}={status}"), storage_cfg)
    if fs.get_file_info(path).type == storage.pafs.FileType.NotFound:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    dataset = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
    return dataset.to_table(columns=columns)


def _count_rows(rows_uri: str, storage_cfg: StorageConfig, taxonomy: Taxonomy, labels: Labels | None) -> dict[str, Any]:
    """Counts from the written rows (only small columns are read back)."""
    ok = _read_rows_table(rows_uri, storage_cfg, [C.PATH, C.SPLIT, C.LEAF_LABEL], C.STATUS_OK)
    err = _read_rows_table(rows_uri, storage_cfg, [C.PATH, C.REASON], C.STATUS_ERROR)
    leaf = np.asarray(ok.column(C.LEAF_LABEL).to_numpy(zero_copy_only=False), dtype=np.int64) if ok.num_rows else np.zeros(0, np.int64)
    names = taxonomy.leaf_names
    ok_paths = set(ok.column(C.PATH).to_pylist()) if ok.num_rows else set()
    err_paths = set(err.column(C.PATH).to_pylist()) if err.num_rows else set()
    labelled_paths = ok_paths | err_paths
    if labels is None:
        without_file = 0
    elif labels.by == C.PATH:
        without_file = sum(1 for k in labels.table if k not in labelled_paths)
    else:
        seen = set(_read_rows_table(rows_uri, storage_cfg, [C.SOP_INSTANCE_UID], C.STATUS_OK).column(C.SOP_INSTANCE_UID).to_pylist()) if ok.num_rows else set()
        without_file = sum(1 for k in labels.table if k not in seen)
    split_leaves: dict[str, dict[str, int]] = {}
    split_col = [str(v) for v in ok.column(C.SPLIT).to_pylist()] if ok.num_rows else []
    for split_name, leaf_index in zip(split_col, leaf.tolist()):
        if leaf_index != UNLABELLED:
            per_leaf = split_leaves.setdefault(split_name, {})
            per_leaf[names[leaf_index]] = per_leaf.get(names[leaf_index], 0) + 1
    return {
        "ok": ok.num_rows,
        "split_leaves": split_leaves,  # labelled images per split and leaf (class weights)
        "errors": err.num_rows,
        "objects_ok": len(ok_paths),
        "objects_error": len(err_paths),
        "reasons": dict(Counter(err.column(C.REASON).to_pylist())) if err.num_rows else {},
        "splits": dict(Counter(split_col)),
        "leaves": {names[i]: int((leaf == i).sum()) for i in range(len(names))},
        "unlabelled": int((leaf == UNLABELLED).sum()),
        "labels_without_file": without_file,
    }


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

    ``in_memory_below``: when the split's rows take fewer bytes (image bytes, as counted at
    prepare time), read them here with pyarrow and hand them to Ray as in-memory blocks. Small
    medical data sets then cost no Parquet-read tasks at all, whose start-up (seconds) would
    otherwise dominate every epoch and every trial; large ones keep streaming.
    -> (dataset, CacheInfo). Raises FileNotFoundError when the cache was never committed.
    """
    import ray.data
    from ray.data.expressions import col

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
    rows = info.counts["splits"].get(split, 0) if split else info.counts["ok"]
    if rows * info.image_size**2 < in_memory_below:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
        table = dataset.to_table(columns=columns, filter=(pads.field(C.LEAF_LABEL) >= 0) if labelled_only else None)
        # a few blocks, so that streaming_split can spread them over the workers
        chunk = max(1, -(-table.num_rows // 8))
        return ray.data.from_arrow([table.slice(i, chunk) for i in range(0, max(table.num_rows, 1), chunk)]), info
    ds = ray.data.read_parquet(path, filesystem=fs)
    if labelled_only:
        ds = ds.filter(expr=col(C.LEAF_LABEL) >= 0)  # pushed down to the Parquet reader
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
