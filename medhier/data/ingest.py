"""The DICOM ingest: manifest rows -> decoded image rows or error rows, as a streaming Ray dataset.

    manifest row groups ──▶ decode tasks (fetch bytes ∥, io.image.decode_images, labels, split) ──▶ rows

Every listed object yields at least one row: ``status == "ok"`` with an image (one row per
selected frame), or ``status == "error"`` with a reason code and a message naming the object.
Nothing is dropped silently. An archive that stops answering (``storage.ArchiveUnavailable``,
e.g. a PACS down after retries) fails the decode task instead: an outage is not a property of
the object, and a ``read_error`` row would mark it done for good.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray.data

from medhier import columns as C
from medhier.config import Config, DataConfig, DicomConfig, StorageConfig
from medhier.data.labels import Labels
from medhier.data.manifest import manifest_files, work_item_batches
from medhier.data.splits import assign_split, split_key
from medhier.io import storage
from medhier.io.dicom import REASONS, DicomRejected
from medhier.io.image import decode_images

__all__ = ["ERROR_REASONS", "NO_SPLIT", "DecodeSettings", "build_ingest", "decode_batch", "decode_settings", "fetch_objects", "output_columns"]

# Rejections from medhier.io.dicom plus failures around it; all become error rows.
ERROR_REASONS: dict[str, str] = {
    **REASONS,
    "read_error": "the object could not be read from storage",
    "internal_error": "an unexpected error in medhier while decoding (a bug: please report it)",
}
NO_SPLIT = "none"  # error rows have no patient, hence no split (and a readable partition name)
_BASE_COLUMNS = (C.PATH, C.SIZE, C.ETAG, C.MTIME, C.STATUS, C.REASON, C.ERROR, C.IMAGE, *C.IMAGE_STATS, *C.META_COLUMNS)
_INT_COLUMNS = {C.SIZE, C.FRAME, C.NUM_FRAMES, C.ROWS, C.COLUMNS}
_FLOAT_COLUMNS = {C.MTIME, C.PIXEL_SPACING, *C.IMAGE_STATS}
_FETCH_POOL: ThreadPoolExecutor | None = None


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


def output_columns(settings: DecodeSettings) -> tuple[str, ...]:
    """The columns of :func:`decode_batch`'s rows: the object, the outcome, the image, DICOM
    metadata, the labels codec's columns (when labelled) and the split."""
    codec = settings.labels.codec if settings.labels else None
    return _BASE_COLUMNS + ((codec.label_columns + codec.index_columns) if codec else ()) + (C.SPLIT,)


def decode_batch(batch: dict[str, np.ndarray], settings: DecodeSettings) -> dict[str, np.ndarray]:
    """Manifest rows -> image rows (one per selected frame) or error rows (one per object).

    Input columns: path, size, etag, mtime. Output: :func:`output_columns`.
    """
    paths = [str(p) for p in batch[C.PATH]]
    blobs = fetch_objects(paths, settings.archive, settings.storage)
    columns = output_columns(settings)
    out: dict[str, list] = {c: [] for c in columns}
    for i, (rel, blob) in enumerate(zip(paths, blobs)):
        source = {C.PATH: rel, C.SIZE: int(batch[C.SIZE][i]), C.ETAG: str(batch[C.ETAG][i]), C.MTIME: float(batch[C.MTIME][i])}
        for row in _rows_of(rel, blob, source, settings):
            for k in columns:
                out[k].append(row[k])
    int_columns = _INT_COLUMNS | set(settings.labels.codec.index_columns if settings.labels else ())
    return {k: _column(v, int_columns=k in int_columns, floats=k in _FLOAT_COLUMNS) for k, v in out.items()}


def _rows_of(rel: str, blob: bytes | Exception, source: dict[str, Any], settings: DecodeSettings) -> list[dict[str, Any]]:
    """One object's rows: one per selected frame, or one error row."""
    if isinstance(blob, Exception):
        return [_error_row(source, "read_error", f"{rel}: {type(blob).__name__}: {blob}", settings)]
    try:
        decoded, images = decode_images(blob, settings.dicom, settings.image_size, settings.resize, source=rel)
    except DicomRejected as exc:
        return [_error_row(source, exc.reason, exc.message, settings)]
    except Exception as exc:  # a bug must cost one row, not the archive
        return [_error_row(source, "internal_error", f"{rel}: {type(exc).__name__}: {exc}", settings)]
    labels = settings.labels.columns(rel, decoded.meta[C.SOP_INSTANCE_UID]) if settings.labels else {}
    split = assign_split(split_key(decoded.meta, rel), settings.split_seed, settings.train_fraction, settings.val_fraction)
    meta = {k: decoded.meta.get(k, "") for k in C.META_COLUMNS}
    return [{**source, C.STATUS: C.STATUS_OK, C.REASON: "", C.ERROR: "", C.IMAGE: image.tobytes(), **_image_stats(image), **meta,
             C.FRAME: frame, **labels, C.SPLIT: split} for frame, image in zip(decoded.frames, images)]


def _image_stats(image: np.ndarray) -> dict[str, float]:
    """The model input's grey levels (uint8) -> mean and standard deviation in [0, 1]."""
    values = image.astype(np.float32) / 255.0
    return {C.INTENSITY_MEAN: float(values.mean()), C.INTENSITY_STD: float(values.std())}


def _error_row(source: dict[str, Any], reason: str, message: str, settings: DecodeSettings) -> dict[str, Any]:
    row = {**source, C.STATUS: C.STATUS_ERROR, C.REASON: reason, C.ERROR: message, C.IMAGE: b""}
    row.update({k: "" for k in C.META_COLUMNS})
    row.update({k: float("nan") for k in (C.PIXEL_SPACING, *C.IMAGE_STATS)})
    row.update({C.FRAME: -1, C.NUM_FRAMES: 0, C.ROWS: 0, C.COLUMNS: 0})
    if settings.labels:  # a broken file listed in the labels keeps its label, for the counts
        row.update(settings.labels.columns(source[C.PATH], ""))
    row[C.SPLIT] = NO_SPLIT
    return row


def _column(values: list, *, int_columns: bool, floats: bool) -> np.ndarray:
    if int_columns:
        return np.asarray(values, dtype=np.int64)
    if floats:
        return np.asarray(values, dtype=np.float64)
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def fetch_objects(paths: Sequence[str], archive: str, storage_cfg: StorageConfig) -> Iterator[bytes | Exception]:
    """The objects at ``paths`` (relative to ``archive``) in order, read concurrently with at most
    ``2 x storage.read_threads`` in flight (object stores answer each GET in tens of
    milliseconds: the reads run ahead of the caller, which decodes serially as the bytes
    arrive): bytes, or the exception a read raised (the caller makes it an error row), except
    ``storage.ArchiveUnavailable`` (an archive that stopped answering), which is raised: an
    outage says nothing about the object and must not mark it done."""
    read = storage.reader(archive, storage_cfg)

    def fetch(rel: str) -> bytes | Exception:
        try:
            return read(rel)
        except storage.ArchiveUnavailable:
            raise
        except Exception as exc:  # reported by the caller, never raised
            return exc

    threads = storage_cfg.read_threads
    return _prefetch(_fetch_pool(threads), fetch, list(paths), ahead=2 * threads)


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


def build_ingest(manifest: str, settings: DecodeSettings, data_cfg: DataConfig):
    """A streaming Ray dataset of decoded rows (ok and error) from a manifest written by
    :func:`medhier.data.manifest.write_manifest`. Nothing runs until the dataset is consumed.

    The work items are the manifest's row groups (``decode_batch_size`` objects each): the
    driver holds one small (file, row group) pair per task, never the keys themselves, and each
    task reads its own slice of the manifest. Large tasks matter on small machines: Ray Data's
    scheduler notices a finished task up to 0.1 s late, which costs a fifth of the CPU time
    with 0.4-second tasks and a twentieth with 1.5-second ones.
    """
    fs, _ = storage.filesystem(manifest, settings.storage)
    items = []
    for f in manifest_files(manifest, settings.storage):
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
    outputs = [decode_batch(rows, settings) for rows in work_item_batches(item, manifest_uri, settings.storage)]
    if len(outputs) == 1:
        return outputs[0]
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
