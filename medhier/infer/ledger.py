"""What a batch job has done, and how its results become visible: the ledger and the commit.

Output layout (OUTPUT is local or s3://)::

    report/run_id=<run>/part-0.parquet   one file per committed run (hive-partitioned by run)
    ledger/run_id=<run>.parquet          what each committed run did (one row per object version and model)
    runs/<run>/                          a run's working folder: manifest, todo, staging, config, summary

Crash safety: a run writes only under runs/<run>/ until the end. It then commits in an order
that a crash at any point leaves recoverable: (1) the report file, written atomically (a local
rename, or a single S3 upload that becomes visible only when complete); (2) the ledger file,
which the next run rebuilds from the report if the crash fell between the two. Until (1)
nothing is visible; after it the rows are visible exactly once. (3) The run's staging copy is
removed: the report holds every row, and recovery needs only the report.

A run that dies (killed, stopped, crashed) leaves its completed staging files behind; the next
run of the same model, version and config adopts their rows (:meth:`Ledger.staged`, used by
medhier.infer.batch) instead of doing that work again, so a kill loses only the work in flight.
A run is dead when it never committed and its heartbeat (``runs/<run>/_ALIVE``) is gone (its
process ended with an error or a stop signal), stale, or names a process of this host that no
longer exists (killed outright).

A run's todo list is its manifest minus the ledger of the same model and version: a unit of work
is identified by its version key — for archive scoring an object's path, size, ETag and mtime, so
a changed object is done again; a job over other units (a visit's series) names its own key.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from medhier import columns as C
from medhier.config import StorageConfig
from medhier.io import storage

__all__ = ["VERSION_KEY", "CommitStats", "Heartbeat", "Ledger", "mtime_column", "new_run_id"]

VERSION_KEY = (C.PATH, C.SIZE, C.ETAG, C.MTIME)  # an object version: a changed object is done again
COMMITTED = "_COMMITTED"  # in runs/<run>/: written last, once the run's results are visible
ALIVE = "_ALIVE"  # in runs/<run>/: refreshed while the run works (see Heartbeat)
STALE_AFTER_S = 600.0  # a run whose heartbeat is older than this has died
# What stays in runs/<run>/ after a commit: a record of the run, not a second copy of its rows.
_KEEP_AFTER_COMMIT = ("config.yaml", "summary.json", COMMITTED, ALIVE, "int8")


def new_run_id() -> str:
    """A sortable, unique run id: UTC time and 6 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def mtime_column(seconds: np.ndarray) -> pa.Array:
    """Listing mtimes (float seconds) -> the report's UTC millisecond timestamps. The ledger
    compares object versions through this one conversion, so it must stay the only one."""
    ms = (np.asarray(seconds, dtype=np.float64) * 1000).astype(np.int64)
    return pa.array(ms.astype("datetime64[ms]"), pa.timestamp("ms", tz="UTC"))


@dataclass
class CommitStats:
    """What a commit made visible."""

    rows: int = 0
    ok_rows: int = 0
    error_files: int = 0  # units of work (objects, for archive scoring) with an error row
    errors: dict[str, int] = field(default_factory=dict)  # error rows per reason


class Ledger:
    """The report, ledger and run folders under ``output`` (see the module docstring). ``key``:
    the report columns that identify a version of a unit of work (their values must be equal
    for the same version; a ``mtime`` column is compared at the report's millisecond precision)."""

    def __init__(self, output: str, storage_cfg: StorageConfig, key: tuple[str, ...] = VERSION_KEY):
        self.output, self.storage, self.key = storage.normalize(output), storage_cfg, tuple(key)

    @property
    def columns(self) -> tuple[str, ...]:
        """What a ledger row holds: the key, the model, the run, and how it went."""
        return (*self.key, C.MODEL_ID, C.MODEL_VERSION, C.RUN_ID, C.STATUS, C.SCORED_AT)

    def run_dir(self, run_id: str) -> str:
        return storage.join(self.output, "runs", run_id)

    # -- reading -------------------------------------------------------------------------

    def table(self) -> pa.Table | None:
        """Every committed ledger row, or None before the first commit."""
        fs, path = storage.filesystem(storage.join(self.output, "ledger"), self.storage)
        if fs.get_file_info(path).type == storage.pafs.FileType.NotFound:
            return None
        return pads.dataset(path, filesystem=fs, format="parquet").to_table()

    def report(self, columns: list[str] | None = None) -> pa.Table:
        """All committed report rows (every run)."""
        fs, path = storage.filesystem(storage.join(self.output, "report"), self.storage)
        return pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table(columns=columns)

    def todo(self, listed: pa.Table, model_id: str, version: str, full: bool = False) -> pa.Table:
        """The listed unit versions this model and version has not done (all with ``full``).
        ``listed`` has the key columns (a listing's mtime as float seconds)."""
        ledger = None if full else self.table()
        if ledger is None or not ledger.num_rows:
            return listed
        mine = ledger.filter(pc.and_(pc.equal(ledger[C.MODEL_ID], model_id), pc.equal(ledger[C.MODEL_VERSION], version)))
        keys = [("_mtime_ms" if k == C.MTIME else k) for k in self.key]
        done = mine.select(list(self.key)).group_by(list(self.key)).aggregate([]).rename_columns(keys)
        keyed = listed.append_column("_mtime_ms", mtime_column(listed[C.MTIME].to_numpy())) if C.MTIME in self.key else listed
        remaining = keyed.join(done, keys=keys, join_type="left anti")
        return remaining.select(listed.column_names)

    # -- committing ----------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Roll forward commits interrupted between the report and the ledger: rebuild the
        ledger of every visible report partition that has none. -> the recovered run ids."""
        recovered = []
        for run_id in self._report_runs():
            if storage.exists(self._ledger_uri(run_id), self.storage):
                continue
            fs, path = storage.filesystem(storage.join(self.output, "report", f"run_id={run_id}"), self.storage)
            table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=list(self.columns))
            self._write_ledger(run_id, self._ledger_rows(table))
            recovered.append(run_id)
        return recovered

    def commit(self, run_id: str, schema: pa.Schema, tally: Callable[[pa.Table], None] | None = None,
               replace: tuple[str, str] | None = None) -> CommitStats:
        """Make a run's staged rows visible (report file, then ledger) and drop its staging copy.

        Streams the staging files batch by batch (memory holds one batch, not the run), calling
        ``tally(batch_table)`` on each for the caller's own counts. ``replace``: (model id,
        version) whose earlier runs this one supersedes (a full rescore): they are removed.
        """
        run_dir = self.run_dir(run_id)
        fs, staging = storage.filesystem(storage.join(run_dir, "staging"), self.storage)
        staged = pads.dataset(staging, filesystem=fs, format="parquet", schema=schema)
        stats, error_units, ledger_parts = CommitStats(), set(), []
        with _atomic_file(storage.join(self.output, "report", f"run_id={run_id}", "part-0.parquet"), self.storage) as sink, \
                pq.ParquetWriter(sink, schema, compression="zstd") as writer:
            for batch in staged.to_batches():
                table = pa.Table.from_batches([batch], schema=schema)
                writer.write_table(table)
                _count(stats, error_units, table, self.key)
                if tally is not None:
                    tally(table)
                ledger_parts.append(self._ledger_rows(table))
        stats.error_files = len(error_units)
        if ledger_parts:
            self._write_ledger(run_id, pa.concat_tables(ledger_parts))
        if replace:
            self._drop_older_runs(run_id, *replace)
        self._drop_staging(run_id)
        return stats

    def finish(self, run_id: str, summary: dict) -> None:
        """Write the run's summary (in its folder and as OUTPUT/summary.json), then mark it
        committed. A run that had nothing to commit leaves no working files behind either."""
        self._drop_staging(run_id)
        text = json.dumps(summary, indent=2)
        storage.write_text(storage.join(self.run_dir(run_id), "summary.json"), text, self.storage)
        storage.write_text(storage.join(self.output, "summary.json"), text, self.storage)
        storage.write_text(storage.join(self.run_dir(run_id), COMMITTED), run_id, self.storage)

    def dead_runs(self, now: float | None = None) -> list[str]:
        """Runs that never committed and whose heartbeat stopped (killed, crashed)."""
        now = time.time() if now is None else now
        fs, path = storage.filesystem(storage.join(self.output, "runs"), self.storage)
        if fs.get_file_info(path).type == storage.pafs.FileType.NotFound:
            return []
        dead = []
        for info in fs.get_file_info(storage.pafs.FileSelector(path)):
            if info.type != storage.pafs.FileType.Directory:
                continue
            run = info.base_name
            if storage.exists(storage.join(self.run_dir(run), COMMITTED), self.storage):
                continue
            beat = Heartbeat.read(self.run_dir(run), self.storage)
            if beat is None or now - beat["time"] > STALE_AFTER_S or _gone(beat):
                dead.append(run)
        return sorted(dead)

    def run_config(self, run_id: str) -> str:
        """The resolved config a run wrote into its folder ('' when it has none)."""
        try:
            return storage.read_bytes(storage.join(self.run_dir(run_id), "config.yaml"), self.storage).decode("utf-8")
        except FileNotFoundError:
            return ""

    def staged_rows(self, run_id: str) -> int:
        """Rows in a run's completed staging files, from their Parquet footers alone."""
        fs, staging = storage.filesystem(storage.join(self.run_dir(run_id), "staging"), self.storage)
        try:
            infos = fs.get_file_info(storage.pafs.FileSelector(staging))
        except FileNotFoundError:
            return 0
        rows = 0
        for info in (i for i in infos if i.type == storage.pafs.FileType.File and i.base_name.endswith(".parquet")):
            try:
                with fs.open_input_file(info.path) as f:
                    rows += pq.ParquetFile(f).metadata.num_rows
            except (OSError, pa.ArrowInvalid):  # in flight: not counted, as it is not adopted
                continue
        return rows

    def staged(self, run_id: str, schema: pa.Schema, columns: list[str] | None = None) -> Iterator[tuple[str, pa.Table]]:
        """A run's completed staging files with ``schema``'s columns -> (file name, rows; only
        ``columns`` when given). A file cut short by a kill (no Parquet footer) or of another
        layout is passed over: its work is done again."""
        fs, staging = storage.filesystem(storage.join(self.run_dir(run_id), "staging"), self.storage)
        try:
            infos = fs.get_file_info(storage.pafs.FileSelector(staging))
        except FileNotFoundError:
            return
        for info in sorted((i for i in infos if i.type == storage.pafs.FileType.File and i.base_name.endswith(".parquet")),
                           key=lambda i: i.base_name):
            try:
                with fs.open_input_file(info.path) as f:
                    parquet = pq.ParquetFile(f)
                    found = parquet.schema_arrow
                    if any(found.get_field_index(n) < 0 or not found.field(n).type.equals(schema.field(n).type) for n in schema.names):
                        continue
                    table = parquet.read(columns=columns or schema.names)
            except (OSError, pa.ArrowInvalid):  # in flight when the run died: no footer
                continue
            yield info.base_name, table

    def remove_dead_runs(self, keep: tuple[str, ...] = ()) -> list[str]:
        """Delete the folders of dead runs (their rows were never visible; a later run did them again)."""
        removed = [run for run in self.dead_runs() if run not in keep]
        for run in removed:
            storage.delete(self.run_dir(run), self.storage)
        return removed

    # -- internals -----------------------------------------------------------------------

    def _ledger_uri(self, run_id: str) -> str:
        return storage.join(self.output, "ledger", f"run_id={run_id}.parquet")

    def _write_ledger(self, run_id: str, ledger: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(ledger, sink, compression="zstd")
        storage.write_bytes(self._ledger_uri(run_id), sink.getvalue().to_pybytes(), self.storage)

    def _report_runs(self) -> list[str]:
        fs, path = storage.filesystem(storage.join(self.output, "report"), self.storage)
        if fs.get_file_info(path).type == storage.pafs.FileType.NotFound:
            return []
        infos = fs.get_file_info(storage.pafs.FileSelector(path))
        return sorted(i.base_name[len("run_id="):] for i in infos if i.base_name.startswith("run_id=") and i.type == storage.pafs.FileType.Directory)

    def _drop_older_runs(self, keep_run: str, model_id: str, version: str) -> None:
        """After a full rescore commits, earlier runs of the same model and version are
        superseded: remove them, so that no object version has two rows for one model."""
        ledger = self.table()
        if ledger is None:
            return
        mine = ledger.filter(pc.and_(pc.equal(ledger[C.MODEL_ID], model_id), pc.equal(ledger[C.MODEL_VERSION], version)))
        for run_id in sorted(set(mine[C.RUN_ID].to_pylist()) - {keep_run}):
            storage.delete(storage.join(self.output, "report", f"run_id={run_id}"), self.storage)
            storage.delete(self._ledger_uri(run_id), self.storage)

    def _ledger_rows(self, report: pa.Table) -> pa.Table:
        """One ledger row per unit version and model (the frames of one object collapse into one)."""
        keys = [*self.key, C.MODEL_ID, C.MODEL_VERSION, C.RUN_ID]
        # a unit is an error when any of its rows is (a decode rejection has exactly one row)
        grouped = report.select(list(self.columns)).group_by(keys).aggregate([(C.STATUS, "min"), (C.SCORED_AT, "max")])
        return grouped.rename_columns([*keys, C.STATUS, C.SCORED_AT])

    def _drop_staging(self, run_id: str) -> None:
        fs, path = storage.filesystem(self.run_dir(run_id), self.storage)
        for info in fs.get_file_info(storage.pafs.FileSelector(path)):
            if info.base_name not in _KEEP_AFTER_COMMIT:
                storage.delete(storage.join(self.run_dir(run_id), info.base_name), self.storage)


def _count(stats: CommitStats, error_units: set, table: pa.Table, key: tuple[str, ...]) -> None:
    status = table[C.STATUS].to_pylist()
    stats.rows += table.num_rows
    stats.ok_rows += sum(s == C.STATUS_OK for s in status)
    units = zip(*(table[k].to_pylist() for k in key))
    for unit, reason, s in zip(units, table[C.ERROR_REASON].to_pylist(), status):
        if s == C.STATUS_ERROR:
            stats.errors[reason] = stats.errors.get(reason, 0) + 1
            error_units.add(unit)


class _atomic_file:
    """A writable file that appears at ``uri`` only when closed without error: a local
    temporary file renamed into place, or one S3 multipart upload (visible once complete)."""

    def __init__(self, uri: str, storage_cfg: StorageConfig):
        self.uri, self.storage, self.tmp = uri, storage_cfg, None

    def __enter__(self):
        fs, path = storage.filesystem(self.uri, self.storage)
        if storage.is_s3(self.uri):
            self.sink = fs.open_output_stream(path)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.path, self.tmp = path, f"{path}.tmp-{uuid.uuid4().hex}"
            self.sink = open(self.tmp, "wb")
        return self.sink

    def __exit__(self, kind, exc, tb):
        self.sink.close()
        if self.tmp is not None:
            if kind is None:
                os.replace(self.tmp, self.path)
            else:
                os.unlink(self.tmp)
        return False


class Heartbeat:
    """Marks a run alive while it works: ``runs/<run>/_ALIVE`` is rewritten every ``every_s``
    seconds from a daemon thread, so another process can tell a running run from a dead one
    (on S3 as locally). It names the host and process; when the run's block ends with an error
    or a stop signal the file is removed: the run is over and its staged work can be adopted."""

    def __init__(self, run_dir: str, storage_cfg: StorageConfig, every_s: float = 60.0):
        self.uri, self.storage, self.every_s = storage.join(run_dir, ALIVE), storage_cfg, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="medhier-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._write()
        self._thread.start()
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        self._stop.set()
        self._thread.join(timeout=5)
        if kind is not None:
            try:
                storage.delete(self.uri, self.storage)
            except Exception:  # storage unreachable: the heartbeat goes stale instead
                pass
        return False

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self._write()
            except Exception:  # storage hiccup: the next beat tries again
                pass

    def _write(self) -> None:
        storage.write_text(self.uri, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}), self.storage)

    @staticmethod
    def read(run_dir: str, storage_cfg: StorageConfig) -> dict | None:
        """The run's last heartbeat ({host, pid, time: seconds since the epoch}), or None."""
        try:
            beat = json.loads(storage.read_bytes(storage.join(run_dir, ALIVE), storage_cfg))
            return {"host": str(beat.get("host", "")), "pid": int(beat.get("pid", 0)), "time": float(beat["time"])}
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def last(run_dir: str, storage_cfg: StorageConfig) -> float | None:
        """When the run's heartbeat was last written (seconds since the epoch), or None."""
        beat = Heartbeat.read(run_dir, storage_cfg)
        return beat["time"] if beat else None


def _gone(beat: dict) -> bool:
    """Whether a heartbeat names a process of this host that no longer exists (killed outright)."""
    if beat["host"] != socket.gethostname() or beat["pid"] <= 0:
        return False
    try:
        os.kill(beat["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's process: alive
        return False
    return False
