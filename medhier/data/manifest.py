"""Archive listing into manifest Parquet files: the unit every job starts from.

    archive (dir, s3://) ──list, streamed──▶ manifest/part-NNNNN.parquet (path, size, etag, mtime)

Objects matching ``data.exclude`` are counted in the summary, never silently dropped. Each
manifest file's row groups are ``data.decode_batch_size`` objects: one decode task each.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from medhier import columns as C
from medhier.config import DataConfig, StorageConfig
from medhier.io import storage

__all__ = ["MANIFEST_SCHEMA", "ListingSummary", "manifest_files", "work_item_batches", "write_manifest"]

MANIFEST_SCHEMA = pa.schema(
    [(C.PATH, pa.string()), (C.SIZE, pa.int64()), (C.ETAG, pa.string()), (C.MTIME, pa.float64())]
)


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


def manifest_files(manifest: str, storage_cfg: StorageConfig) -> list[str]:
    """The Parquet files of a manifest folder, sorted (paths inside its filesystem)."""
    fs, path = storage.filesystem(manifest, storage_cfg)
    return sorted(i.path for i in fs.get_file_info(storage.pafs.FileSelector(path)) if i.path.endswith(".parquet"))


def work_item_batches(item: dict[str, np.ndarray], manifest: str, storage_cfg: StorageConfig) -> Iterator[dict[str, np.ndarray]]:
    """The manifest rows of one work item (``manifest_file`` and ``row_group`` columns: the row
    groups a decode or header task reads), one numpy batch per row group."""
    fs, _ = storage.filesystem(manifest, storage_cfg)
    for f, g in zip(item["manifest_file"], item["row_group"]):
        with fs.open_input_file(str(f)) as handle:
            table = pq.ParquetFile(handle).read_row_group(int(g))
        yield {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}

