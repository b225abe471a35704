"""Labels manifests: a CSV or Parquet file keyed by ``path`` (relative to the archive root) or by
``sop_instance_uid``, with the label columns a task defines.

The platform does not know what a label means: a task hands it a :class:`LabelCodec` that names
its raw columns, turns one row's raw values into integer columns, and names the classes counted
per split. The classifier's codec (``medhier.classify.labels``) reads ``main`` and ``sub``.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from medhier import columns as C
from medhier.config import StorageConfig
from medhier.io import storage

__all__ = ["UNLABELLED", "LabelCodec", "Labels", "default_labels_uri", "read_labels"]

UNLABELLED = -1  # every integer label column of a row without a label


class LabelCodec(Protocol):
    """What a task tells the platform about its labels (see the module docstring)."""

    label_columns: tuple[str, ...]  # raw columns of the manifest, e.g. ("main", "sub")
    index_columns: tuple[str, ...]  # integer columns every row gets, e.g. ("main_index", "sub_index", "leaf_index")
    class_column: str  # the index column whose classes are counted per split (and is >= 0 when labelled)
    class_names: tuple[str, ...]  # names of class_column's values
    class_noun: str  # what a class is called in summaries ("leaf")

    def encode(self, values: dict[str, str]) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """One row's raw values -> (normalised raw values, index values); raises ValueError
        (without the file and line: the caller adds them)."""

    def fingerprint(self) -> dict[str, Any]:
        """What changes the encoding (e.g. the taxonomy): part of the cache's fingerprint."""


@dataclass(frozen=True)
class Labels:
    """A labels manifest, validated by its codec.

    ``by``: "path" or "sop_instance_uid". ``table``: key -> (raw values, index values).
    """

    uri: str
    by: str
    codec: LabelCodec
    table: dict[str, tuple[tuple[str, ...], tuple[int, ...]]]
    digest: str

    def lookup(self, path: str, sop_uid: str) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
        return self.table.get(path if self.by == C.PATH else sop_uid)

    def columns(self, path: str, sop_uid: str) -> dict[str, Any]:
        """The label columns of one row: raw values and indices, or empty and UNLABELLED."""
        found = self.lookup(path, sop_uid)
        return unlabelled_columns(self.codec) if found is None else dict(
            zip(self.codec.label_columns + self.codec.index_columns, found[0] + found[1]))


def unlabelled_columns(codec: LabelCodec) -> dict[str, Any]:
    return {**{c: "" for c in codec.label_columns}, **{c: UNLABELLED for c in codec.index_columns}}


def read_labels(uri: str, codec: LabelCodec, storage_cfg: StorageConfig) -> Labels:
    """Read and validate a CSV or Parquet labels manifest: a key column (``path`` or
    ``sop_instance_uid``) and the codec's label columns. Errors name the file, the row and the
    problem."""
    try:
        raw = storage.read_bytes(uri, storage_cfg)
    except FileNotFoundError:
        raise FileNotFoundError(f"labels manifest {uri!r} not found") from None
    parquet = uri.lower().endswith(".parquet")
    try:
        if parquet:
            table = pq.read_table(io.BytesIO(raw))
        else:
            text_columns = {c: pa.string() for c in (C.PATH, C.SOP_INSTANCE_UID, *codec.label_columns)}
            table = pacsv.read_csv(io.BytesIO(raw), convert_options=pacsv.ConvertOptions(strings_can_be_null=False, column_types=text_columns))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"labels manifest {uri!r} could not be parsed: {exc}") from None
    names = table.column_names
    key = C.PATH if C.PATH in names else C.SOP_INSTANCE_UID if C.SOP_INSTANCE_UID in names else None
    missing = [c for c in codec.label_columns if c not in names]
    if key is None or missing:
        need = missing + ([] if key else ["path or sop_instance_uid"])
        raise ValueError(f"labels manifest {uri!r}: missing column(s) {need}; found {names}")
    rows: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {}
    keys = table.column(key).to_pylist()
    values = [table.column(c).to_pylist() for c in codec.label_columns]
    first, where = (0, "row") if parquet else (2, "line")  # CSV: the header is line 1
    for i, (k, *raw_values) in enumerate(zip(keys, *values)):
        pos = f"{uri} {where} {i + first}"
        k = str(k or "").strip()
        if not k:
            raise ValueError(f"{pos}: empty {key}")
        if key == C.PATH:
            k = k.lstrip("/")
        try:
            encoded = codec.encode({c: str(v or "").strip() for c, v in zip(codec.label_columns, raw_values)})
        except ValueError as exc:
            raise type(exc)(f"{pos}: {exc}") from None
        if k in rows:
            raise ValueError(f"{pos}: {key} {k!r} is labelled twice")
        rows[k] = encoded
    return Labels(uri=uri, by=key, codec=codec, table=rows, digest=hashlib.sha256(raw).hexdigest())


def default_labels_uri(archive: str, storage_cfg: StorageConfig) -> str:
    """``<archive>/labels.csv`` when it exists (what ``medhier synth`` writes), else "" (always
    for a PACS, which holds instances only: pass labels keyed by sop_instance_uid)."""
    if storage.is_dicomweb(archive):
        return ""
    candidate = storage.join(storage.normalize(archive), "labels.csv")
    return candidate if storage.exists(candidate, storage_cfg) else ""
