"""Results sent to a PACS after each commit, with a record of every attempt: nothing lost, nothing
stored twice.

    committed report rows ──a path column (sr_path)──▶ minus what the destination already stored
        ──▶ STOW-RS in batches (medhier.io.dicomweb.store) ──▶ OUTPUT/deliveries/*.parquet

A task names what it sends (:class:`Delivery`: a report column of files relative to OUTPUT, and a
DICOMweb destination); :func:`deliver` runs after the run's commit, on the driver. A file is
sent only once the row naming it is committed, so a run that dies never sends results that no
report holds. What to send is every committed file of that column not yet stored at that
destination: this run's new ones, the failures of earlier runs, and those a run never got to
(it died between its commit and the sending, or ran without a destination). The objects' SOP
Instance UIDs are deterministic (:mod:`medhier.io.sr`), so a store repeated after a crash
replaces the object in the PACS rather than adding a second one.

``OUTPUT/deliveries/run_id=<run>-<part>.parquet`` holds one row per attempt, written after each
chunk of ``CHUNK`` files (a run killed while sending keeps the record of what it sent):

==================  =========================  ===================================================
column              type                       meaning
==================  =========================  ===================================================
``path``            string                     the file, relative to OUTPUT (the report column's value)
``column``          string                     the report column that names it, e.g. ``sr_path``
``destination``     string                     the DICOMweb URI (canonical; never credentials)
``sop_instance_uid`` string                    the sent object's SOP Instance UID ("" if unreadable)
``status``          string                     ``stored`` or ``failed``
``message``         string                     the PACS's warning or failure reason, or why it was
                                               not sent; "" when stored cleanly
``run_id``          string                     the run that tried
``attempted_at``    timestamp[ms, UTC]         when
==================  =========================  ===================================================

A file's delivery status at a destination is its latest row there (:meth:`Outbox.status`).
When the destination stops answering, the files not yet tried in this run are recorded as
``failed`` with the reason, without waiting on every batch's retries.
"""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from medhier.config import StorageConfig
from medhier.infer.ledger import Ledger
from medhier.io import dicomweb, storage

__all__ = ["CHUNK", "DELIVERY_SCHEMA", "FAILED", "STORED", "Delivery", "DeliveryStats", "Outbox", "deliver"]

log = logging.getLogger(__name__)

STORED, FAILED = "stored", "failed"
CHUNK = 1000  # files per record file: what a run killed while sending can lose the record of
DELIVERY_SCHEMA = pa.schema([
    ("path", pa.string()), ("column", pa.string()), ("destination", pa.string()), ("sop_instance_uid", pa.string()),
    ("status", pa.string()), ("message", pa.string()), ("run_id", pa.string()), ("attempted_at", pa.timestamp("ms", tz="UTC")),
])


@dataclass(frozen=True)
class Delivery:
    """What a task sends after each commit: the files named by a report ``column`` (relative to
    OUTPUT) to a DICOMweb ``destination`` (``dicomweb+http(s)://``)."""

    column: str
    destination: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "destination", dicomweb.normalize(self.destination))  # ValueError naming a bad URI


@dataclass
class DeliveryStats:
    """What one run's delivery did (in the run's summary)."""

    column: str
    destination: str
    pending: int = 0  # files to send in this run
    earlier: int = 0  # of which an earlier run committed (failed, or never sent)
    stored: int = 0
    failed: int = 0
    examples: list[str] = field(default_factory=list)  # a few failure messages

    def line(self) -> str:
        text = f"{self.column} -> {self.destination}: {self.stored:,} stored, {self.failed:,} failed"
        if self.earlier:
            text += f" ({self.earlier:,} from earlier runs)"
        if self.failed:
            text += f"; next run retries; e.g. {self.examples[0]}"
        return text


class Outbox:
    """The delivery records under ``output`` (see the module docstring)."""

    def __init__(self, output: str, storage_cfg: StorageConfig):
        self.output, self.storage = storage.normalize(output), storage_cfg
        self.folder = storage.join(self.output, "deliveries")

    def table(self) -> pa.Table:
        """Every recorded attempt (empty before the first)."""
        fs, path = storage.filesystem(self.folder, self.storage)
        if fs.get_file_info(path).type == storage.pafs.FileType.NotFound:
            return DELIVERY_SCHEMA.empty_table()
        return pads.dataset(path, filesystem=fs, format="parquet", schema=DELIVERY_SCHEMA).to_table()

    def status(self) -> pa.Table:
        """The latest attempt per (path, destination): each file's delivery status."""
        attempts = self.table()
        if attempts.num_rows < 2:
            return attempts
        order = pc.sort_indices(attempts, [("path", "ascending"), ("destination", "ascending"), ("attempted_at", "descending")])
        attempts = attempts.take(order)
        path, destination = attempts["path"].combine_chunks(), attempts["destination"].combine_chunks()
        changed = pc.or_(pc.not_equal(path[1:], path[:-1]), pc.not_equal(destination[1:], destination[:-1]))
        first = pa.concat_arrays([pa.array([True]), changed])  # the first row of each (path, destination): its latest
        return attempts.filter(first)

    def pending(self, ledger: Ledger, delivery: Delivery) -> tuple[list[str], int]:
        """-> (the committed files of ``delivery.column`` not yet stored at its destination,
        sorted; how many of them an earlier attempt failed)."""
        if not storage.exists(storage.join(ledger.output, "report"), ledger.storage):
            return [], 0  # nothing committed yet
        paths = set(pc.drop_null(ledger.report([delivery.column])[delivery.column]).to_pylist())
        attempts = self.table().filter(pc.equal(pc.field("destination"), delivery.destination))
        stored = set(attempts.filter(pc.equal(pc.field("status"), STORED))["path"].to_pylist())
        todo = sorted(paths - stored)
        tried = set(attempts["path"].to_pylist())
        return todo, sum(p in tried for p in todo)

    def send(self, run_id: str, delivery: Delivery, paths: list[str]) -> DeliveryStats:
        """STOW ``paths`` (relative to OUTPUT) to the destination in batches of
        ``storage.dicomweb_stow_batch``, ``storage.dicomweb_stow_threads`` requests at a time,
        recording every outcome -> the counts."""
        stats = DeliveryStats(delivery.column, delivery.destination, pending=len(paths))
        down: list[str] = []  # why the destination stopped answering, once it has
        for part, start in enumerate(range(0, len(paths), CHUNK)):
            rows = self._send_chunk(delivery, paths[start:start + CHUNK], down)
            self._record(run_id, part, delivery, rows)
            for _, uid, ok, message in rows:
                stats.stored += ok
                stats.failed += not ok
                if not ok and len(stats.examples) < 3:
                    stats.examples.append(message)
        if stats.failed:
            log.warning("%s: %d of %d files not stored (recorded under %s; the next run retries them)",
                        delivery.destination, stats.failed, len(paths), self.folder)
        return stats

    def _send_chunk(self, delivery: Delivery, paths: list[str], down: list[str]) -> list[tuple[str, str, bool, str]]:
        """-> (path, SOP Instance UID, stored, message) per path."""
        scfg = self.storage
        size = scfg.dicomweb_stow_batch
        batches = [paths[i:i + size] for i in range(0, len(paths), size)]

        def send_batch(batch: list[str]) -> list[tuple[str, str, bool, str]]:
            if down:
                return [(p, "", False, f"not sent: {down[0]}") for p in batch]
            blobs, out = {}, {}
            for p in batch:
                try:
                    blobs[p] = storage.read_bytes(storage.join(self.output, p), scfg)
                except FileNotFoundError:
                    out[p] = (p, "", False, f"{p}: the file is gone from OUTPUT")
            try:
                results = dicomweb.store(delivery.destination, list(blobs.values()), scfg)
            except storage.ArchiveUnavailable as exc:
                down.append(str(exc))
                return [out.get(p, (p, "", False, f"not sent: {exc}")) for p in batch]
            out.update({p: (p, r.sop_instance_uid, r.stored, r.message) for p, r in zip(blobs, results)})
            return [out[p] for p in batch]

        with ThreadPoolExecutor(max_workers=scfg.dicomweb_stow_threads, thread_name_prefix="medhier-stow") as pool:
            return [row for rows in pool.map(send_batch, batches) for row in rows]

    def _record(self, run_id: str, part: int, delivery: Delivery, rows: list[tuple[str, str, bool, str]]) -> None:
        n, now = len(rows), int(time.time() * 1000)
        table = pa.table({
            "path": [r[0] for r in rows], "column": [delivery.column] * n, "destination": [delivery.destination] * n,
            "sop_instance_uid": [r[1] for r in rows], "status": [STORED if r[2] else FAILED for r in rows],
            "message": [r[3] for r in rows], "run_id": [run_id] * n,
            "attempted_at": pa.array([now] * n, pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
        }, schema=DELIVERY_SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        # a run may deliver to several destinations: one file per (run, delivery, chunk)
        name = f"run_id={run_id}-{delivery.column}-{_short(delivery.destination)}-{part:05d}.parquet"
        storage.write_bytes(storage.join(self.folder, name), sink.getvalue().to_pybytes(), self.storage)


def _short(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def deliver(ledger: Ledger, run_id: str, delivery: Delivery) -> DeliveryStats:
    """Send every committed file of ``delivery`` not yet stored at its destination, recording each
    attempt (see the module docstring) -> the counts. Never raises for an unreachable PACS: the
    files stay pending for the next run."""
    outbox = Outbox(ledger.output, ledger.storage)
    paths, earlier = outbox.pending(ledger, delivery)
    stats = outbox.send(run_id, delivery, paths)
    stats.earlier = earlier
    return stats
