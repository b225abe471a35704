"""Archive-scale batch jobs: whole archives into Parquet reports, incrementally and crash-safely.

    list ─▶ manifest ─▶ minus the ledger (what this model already did) ─▶ todo
    todo ─▶ decode + preprocess (CPU tasks) ─▶ model actors (GPU, or CPU) ─▶ the task's extra stages
         (e.g. SR files) ─▶ report rows ─▶ staging Parquet under runs/<run_id>/ ─▶ commit
    committed files the task sends (e.g. SRs) ─▶ a PACS over STOW-RS (:mod:`medhier.infer.deliver`)

The task (the classifier) hands the platform its report columns, its extra stages and what to
do after a commit (the study roll-up); the listing, the todo list, the pipeline, the commit and
the ledger (:mod:`medhier.infer.ledger`) are the same for every task.

Resuming a killed run: before scoring, a run adopts the rows that dead runs of the same model,
version and resolved config had completed (their staging files with a Parquet footer), for the
objects still on its todo list and only for objects whose rows are all there (one row per
object, or ``num_frames`` rows with ``dicom.frames=all``): they are copied into its own staging
under its run id and left out of the pipeline. A kill then loses only the files in flight, and
no object version gets two rows for one model: adopted objects leave the todo list, and an
object adopted from one dead run is not adopted again from another.

Each run also compares its images with the checkpoint's training profile (:mod:`medhier.infer.drift`,
from the report's modality, body part, manufacturer, pixel spacing and intensity columns and the
task's class counts) and writes the population stability index per feature into the summary
(``drift``), warning above ``score.drift_warn_psi``.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
import torch
from ray.data import ActorPoolStrategy

from medhier import columns as C
from medhier.config import Config, StorageConfig
from medhier.data.ingest import DecodeSettings, build_ingest, decode_batch, decode_settings
from medhier.data.manifest import write_manifest
from medhier.infer.actor import (SCORED_MS, ActorSettings, Annotator, InferTask, Int8Settings, ModelActor, actor_resources,
                                 compiled_variant, model_cache)
from medhier.infer.deliver import Delivery, DeliveryStats, deliver
from medhier.infer.drift import DriftCounter
from medhier.infer.ledger import Heartbeat, Ledger, mtime_column, new_run_id
from medhier.io import storage
from medhier.runtime import execute_pipeline
from medhier.stopping import Stopped, deferred
from medhier.train.checkpoint import Loaded, config_for_checkpoint, load_checkpoint
from medhier.train.precision import precision_name

__all__ = ["RunInfo", "ScoreSummary", "ScoreTask", "Stage", "report_schema", "report_table", "score_archive", "to_report"]

log = logging.getLogger(__name__)

# The report's columns before and after the task's own (see report_schema and the README).
_HEAD = [
    (C.PATH, pa.string()), (C.SIZE, pa.int64()), (C.ETAG, pa.string()), (C.MTIME, pa.timestamp("ms", tz="UTC")),
    (C.SOP_INSTANCE_UID, pa.string()), (C.STUDY_INSTANCE_UID, pa.string()), (C.SERIES_INSTANCE_UID, pa.string()),
    (C.FRAME, pa.int32()), (C.NUM_FRAMES, pa.int32()), (C.MODALITY, pa.string()), (C.BODY_PART, pa.string()), (C.MANUFACTURER, pa.string()),
    (C.PIXEL_SPACING, pa.float32()), (C.INTENSITY_MEAN, pa.float32()), (C.INTENSITY_STD, pa.float32()), (C.PATIENT_KEY, pa.string()),
    (C.STATUS, pa.string()), (C.ERROR_REASON, pa.string()), (C.ERROR_MESSAGE, pa.string()),
]
_TAIL = [(C.MODEL_ID, pa.string()), (C.MODEL_VERSION, pa.string()), (C.RUN_ID, pa.string()), (C.SCORED_AT, pa.timestamp("ms", tz="UTC"))]


class ScoreTask(InferTask, Protocol):
    """A task whose models score archives."""

    def report_columns(self, cfg: Config) -> list[tuple[str, pa.DataType]]:
        """The task's own report columns and types, for a checkpoint's config."""

    def report_values(self, cfg: Config, batch: dict[str, np.ndarray], ok: np.ndarray) -> dict[str, pa.Array]:
        """Scored rows (the actor's output) -> the task's report columns; null on error rows."""

    def tally(self, cfg: Config) -> Callable[[pa.Table], None] | Any:
        """A fresh counter of committed report rows: called on each batch of the commit; its
        ``counts`` attribute ({class name: rows}) goes into the summary."""

    def after_commit(self, cfg: Config, ledger: Ledger, model_id: str, version: str) -> None:
        """Work on the committed report (the classifier's study roll-up)."""


@dataclass(frozen=True)
class Stage:
    """An extra map stage a task adds between the model actors and the report, over scored rows:
    ``fn(batch, run=RunInfo, **kwargs)``, numpy batches in, the same with more columns out (e.g.
    writing one DICOM SR per row)."""

    fn: Callable[..., dict[str, np.ndarray]]
    kwargs: dict[str, Any] = field(default_factory=dict)


def report_schema(task: ScoreTask, cfg: Config) -> pa.Schema:
    """The report's columns and types for a checkpoint's config; documented in the README."""
    return pa.schema(_HEAD + task.report_columns(cfg) + _TAIL)


def to_report(batch: dict[str, np.ndarray], task: ScoreTask, cfg: Config, model_id: str, model_version: str, run_id: str) -> pa.Table:
    """Scored rows (decode columns + the task's predictions) -> report rows (:func:`report_schema`)."""
    n = len(batch[C.PATH])
    ok = batch[C.STATUS] == C.STATUS_OK
    # the model actor's stamp: the report stage runs behind it by a varying lag
    stamps = batch[SCORED_MS].astype(np.int64) if SCORED_MS in batch else np.full(n, int(time.time() * 1000), np.int64)

    def strings(values, mask=None):
        arr = pa.array([str(v) for v in values], pa.string())
        return arr if mask is None else pc.if_else(pa.array(mask), arr, pa.nulls(n, pa.string()))

    columns = {
        C.PATH: strings(batch[C.PATH]),
        C.SIZE: pa.array(batch[C.SIZE].astype(np.int64)),
        C.ETAG: strings(batch[C.ETAG]),
        C.MTIME: mtime_column(batch[C.MTIME]),
        **{k: strings(batch[k]) for k in (C.SOP_INSTANCE_UID, C.STUDY_INSTANCE_UID, C.SERIES_INSTANCE_UID)},
        C.FRAME: pa.array(batch[C.FRAME].astype(np.int32)),
        C.NUM_FRAMES: pa.array(batch[C.NUM_FRAMES].astype(np.int32)),
        **{k: strings(batch[k]) for k in (C.MODALITY, C.BODY_PART, C.MANUFACTURER)},
        # NaN (no PixelSpacing; error rows) becomes null
        **{k: pa.array(batch[k].astype(np.float32), pa.float32(), from_pandas=True) for k in (C.PIXEL_SPACING, C.INTENSITY_MEAN, C.INTENSITY_STD)},
        **{k: strings(batch[k]) for k in (C.PATIENT_KEY, C.STATUS)},
        C.ERROR_REASON: strings(batch[C.REASON], ~ok),
        C.ERROR_MESSAGE: strings(batch[C.ERROR], ~ok),
        **task.report_values(cfg, batch, ok),
        C.MODEL_ID: pa.array([model_id] * n, pa.string()),
        C.MODEL_VERSION: pa.array([model_version] * n, pa.string()),
        C.RUN_ID: pa.array([run_id] * n, pa.string()),
        C.SCORED_AT: pa.array(stamps.astype("datetime64[ms]"), pa.timestamp("ms", tz="UTC")),
    }
    return pa.table(columns, schema=report_schema(task, cfg))


def report_table(output: str, scfg: StorageConfig | None = None, columns: list[str] | None = None) -> pa.Table:
    """All committed report rows (every run), e.g. for tests and small analyses."""
    return Ledger(output, scfg or StorageConfig()).report(columns)


@dataclass
class ScoreSummary:
    """What a run did: written as summary.json and printed as a table."""

    run_id: str
    archive: str
    output: str
    model_id: str
    model_version: str
    listed: int = 0
    already_scored: int = 0
    adopted: int = 0  # objects whose rows this run took over from dead runs (not scored again)
    adopted_from: list[str] = field(default_factory=list)
    files: int = 0  # objects scored in this run
    rows: int = 0
    images_ok: int = 0
    error_files: int = 0
    classes: dict[str, int] = field(default_factory=dict)  # ok rows per predicted class (the classifier's leaves)
    errors: dict[str, int] = field(default_factory=dict)
    excluded: int = 0
    recovered_runs: list[str] = field(default_factory=list)
    removed_runs: list[str] = field(default_factory=list)  # folders of dead runs cleared after the commit
    seconds: float = 0.0
    images_per_s: float = 0.0
    compiled: bool = False
    precision: str = ""  # what the model ran in: int8, bf16, fp16 or fp32
    int8: dict[str, Any] = field(default_factory=dict)  # int8's comparison with fp32 (medhier/infer/int8.py)
    drift: dict[str, Any] = field(default_factory=dict)  # PSI per feature against the training profile (medhier/infer/drift.py)
    # how the compiled actors got their model: {"cache": hit|built|not kept|mixed, "actors", "folder", "built_at",
    # "start_s": the slowest actor's start-up, "build_s", "ready_at": when the first actor's model was ready (Unix s)}
    compiled_model: dict[str, Any] = field(default_factory=dict)
    deliveries: list[dict[str, Any]] = field(default_factory=list)  # DeliveryStats per Delivery (medhier/infer/deliver.py)

    @property
    def error_rate(self) -> float:
        return self.error_files / self.files if self.files else 0.0

    @property
    def undelivered(self) -> int:
        """Files this run tried to send to a PACS and could not (the next run retries them)."""
        return sum(d["failed"] for d in self.deliveries)

    def table(self) -> str:
        lines = [
            f"run              {self.run_id}  (model {self.model_id}, {self.model_version})",
            f"archive          {self.archive}",
            f"listed           {self.listed:,} objects ({self.excluded:,} excluded by data.exclude"
            f"{' or storage.dicomweb_exclude_modalities' if storage.is_dicomweb(self.archive) else ''})",
            f"already scored   {self.already_scored:,}",
            *([f"adopted          {self.adopted:,} files scored by stopped run(s) {', '.join(self.adopted_from)} (not scored again)"]
              if self.adopted else []),
            f"scored now       {self.files:,} files -> {self.rows:,} rows ({self.images_ok:,} images, {self.error_files:,} error files, error rate {self.error_rate:.1%})",
        ]
        width = max([22, *(len(name) + 2 for name in self.classes)])
        lines += [f"  {name:<{width}}{n:,}" for name, n in self.classes.items()]
        if self.errors:
            lines.append("errors by reason")
            width = max([22, *(len(reason) + 2 for reason in self.errors)])
            lines += [f"  {reason:<{width}}{n:,}" for reason, n in sorted(self.errors.items())]
        if self.recovered_runs:
            lines.append(f"recovered        ledger of interrupted commit(s): {', '.join(self.recovered_runs)}")
        if self.precision:
            lines.append(f"precision        {self.precision}{', compiled' if self.compiled else ''}")
        if self.compiled_model:
            cm = self.compiled_model
            how = {"hit": f"loaded from the model cache (built {cm['built_at']})", "built": "compiled now and kept in the model cache",
                   "not kept": "compiled now (no model cache)"}.get(cm["cache"], "some actors loaded it from the cache, some compiled it")
            lines.append(f"compiled model   {how}; actor start-up {cm['start_s']:.1f} s")
        if self.int8.get("images"):
            lines.append(f"int8 vs fp32     same leaf on {self.int8['leaf_agreement']:.1%} of {self.int8['images']} check images "
                         f"(largest probability difference {self.int8['max_abs_diff']:.3f}; "
                         f"{self.int8['calibration_images']} calibration images"
                         f"{'; measured when the cached model was built' if self.int8.get('cached') else ''})")
        elif self.int8:
            lines.append(f"int8 vs fp32     not compared (score.int8_check_images=0; {self.int8['calibration_images']} calibration images)")
        if self.drift.get("psi"):
            worst = max(self.drift["psi"].items(), key=lambda kv: kv[1])
            lines.append(f"drift            largest PSI {worst[1]:.3f} ({worst[0]}) over {self.drift['images']:,} images against "
                         f"{self.drift['reference_images']:,} training images")
            lines += [f"  WARNING {w}" for w in self.drift["warnings"]]
        lines += [f"sent to PACS     {DeliveryStats(**d).line()}" for d in self.deliveries]
        lines.append(f"wall time        {self.seconds:,.1f} s  ({self.images_per_s:,.1f} images/s{', compiled' if self.compiled else ''})")
        lines.append(f"report           {storage.join(self.output, 'report')}")
        return "\n".join(lines)


@dataclass(frozen=True)
class RunInfo:
    """One run's fixed facts, shared by its steps and handed to the task's annotator factory and
    stages (picklable: it travels to the workers)."""

    cfg: Config  # the user's config with the checkpoint's model sections
    user: Config
    task: ScoreTask
    checkpoint: str
    archive: str
    ledger: Ledger
    run_id: str
    model_id: str
    version: str

    @property
    def dir(self) -> str:
        return self.ledger.run_dir(self.run_id)

    @property
    def output(self) -> str:
        return self.ledger.output

    @property
    def storage(self) -> StorageConfig:
        return self.ledger.storage


def score_archive(cfg: Config, archive: str, checkpoint: str, output: str, task: ScoreTask, *, full: bool = False,
                  annotator: Callable[[RunInfo], Annotator] | None = None, stages: tuple[Stage, ...] = (),
                  deliveries: tuple[Delivery, ...] = ()) -> ScoreSummary:
    """Score the new or changed objects of ``archive`` (all of them with ``full``) into ``output``.

    ``annotator``: makes, for this run, the model actors' extra per-batch columns (Grad-CAM);
    ``stages``: extra map stages over the scored rows (SR files); ``deliveries``: files named by
    report columns, sent to a PACS after the commit (with the earlier runs' unsent ones). Needs
    Ray initialised. Raises on failure; report rows become visible only if the run commits.
    """
    start = time.perf_counter()
    archive, output = storage.normalize(archive), storage.normalize(output)
    loaded = load_checkpoint(checkpoint, task, cfg.storage, build=False)  # the driver never runs the model: its actors do
    run = RunInfo(config_for_checkpoint(cfg, loaded), cfg, task, checkpoint, archive, Ledger(output, cfg.storage), new_run_id(),
               loaded.model_id, cfg.score.model_version or f"epoch-{loaded.epoch}")
    summary = ScoreSummary(run.run_id, archive, output, run.model_id, run.version)
    try:
        with Heartbeat(run.dir, cfg.storage):
            summary.recovered_runs = run.ledger.recover()
            storage.write_text(storage.join(run.dir, "config.yaml"), run.cfg.to_yaml(), cfg.storage)
            listing = write_manifest(archive, storage.join(run.dir, "manifest"), run.cfg.data, cfg.storage)
            summary.listed, summary.excluded = listing.objects, listing.excluded
            summary.files, summary.already_scored, adopted_ok = _write_todo(run, summary, full)
            if summary.files or summary.adopted:
                _score(run, summary, full, annotator, stages, loaded, adopted_ok)
            summary.deliveries = [asdict(deliver(run.ledger, run.run_id, d)) for d in deliveries]
            with deferred():  # a few small files: a stop signal waits for them
                summary.removed_runs = run.ledger.remove_dead_runs(keep=(run.run_id,))
                summary.seconds = time.perf_counter() - start
                run.ledger.finish(run.run_id, asdict(summary))
    except Stopped as stop:
        stop.note(f"nothing of run {run.run_id} is in the report yet; {run.ledger.staged_rows(run.run_id):,} scored rows are "
                  f"staged in {run.dir}/staging and the next run of this model adopts them instead of scoring them again")
        raise
    return summary


def _write_todo(run: RunInfo, summary: ScoreSummary, full: bool) -> tuple[int, int, int]:
    """Write the objects still to score as the run's todo manifest, less those adopted from dead
    runs -> (to score, already scored, ok rows adopted)."""
    fs, path = storage.filesystem(storage.join(run.dir, "manifest"), run.cfg.storage)
    listed = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    remaining = run.ledger.todo(listed, run.model_id, run.version, full)
    remaining, adopted_ok = _adopt(run, summary, remaining)
    todo = storage.join(run.dir, "todo")
    storage.makedirs(todo, run.cfg.storage)
    if remaining.num_rows:
        tfs, tpath = storage.filesystem(todo, run.cfg.storage)
        with tfs.open_output_stream(f"{tpath}/part-00000.parquet") as f:
            pq.write_table(remaining, f, row_group_size=run.cfg.data.decode_batch_size)
    return remaining.num_rows, listed.num_rows - remaining.num_rows - summary.adopted, adopted_ok


def _adopt(run: RunInfo, summary: ScoreSummary, todo: pa.Table) -> tuple[pa.Table, int]:
    """Copy the completed rows of dead runs of this model, version and config, for objects on
    ``todo`` whose rows are all there, into this run's staging (under this run's id). Sets
    ``summary.adopted``/``adopted_from``. -> (todo less the adopted objects, ok rows adopted)."""
    ledger, schema, mine = run.ledger, report_schema(run.task, run.cfg), run.cfg.to_yaml()
    adopted_ok = 0
    for dead in ledger.dead_runs():
        if not todo.num_rows:
            break
        if dead == run.run_id or ledger.run_config(dead) != mine:  # another model, version or config
            continue
        todo_ids = _unit_ids(todo, ledger.key)
        wanted = pc.filter(todo_ids, pc.is_in(todo_ids, _complete_units(ledger, dead, schema, run))).combine_chunks()
        if not len(wanted):
            continue
        for name, table in ledger.staged(dead, schema):
            rows = table.filter(pc.is_in(_unit_ids(table, ledger.key), wanted))
            if not rows.num_rows:
                continue
            rows = rows.set_column(rows.schema.get_field_index(C.RUN_ID), C.RUN_ID, pa.array([run.run_id] * rows.num_rows, pa.string()))
            sink = pa.BufferOutputStream()
            pq.write_table(rows.cast(schema), sink, compression="zstd")
            storage.write_bytes(storage.join(run.dir, "staging", f"adopted-{dead}-{name}"), sink.getvalue().to_pybytes(), run.cfg.storage)
            adopted_ok += pc.sum(pc.equal(rows[C.STATUS], C.STATUS_OK)).as_py() or 0
        summary.adopted += len(wanted)
        summary.adopted_from.append(dead)
        todo = todo.filter(pc.invert(pc.is_in(todo_ids, wanted)))
    return todo, adopted_ok


def _unit_ids(table: pa.Table, key: tuple[str, ...]) -> pa.Array:
    """One string per row naming its unit version (the key columns joined); a listing's float
    mtime is taken as the report stores it, so listings and report rows compare."""
    parts = []
    for k in key:
        column = table[k]
        if k == C.MTIME and not pa.types.is_timestamp(column.type):
            column = mtime_column(column.to_numpy())
        parts.append(pc.cast(pc.cast(column, pa.int64()) if pa.types.is_timestamp(column.type) else column, pa.string()))
    return pc.binary_join_element_wise(*parts, "\x1f")


def _complete_units(ledger: Ledger, run_id: str, schema: pa.Schema, run: RunInfo) -> pa.Array:
    """The unit versions (:func:`_unit_ids`) of which a dead run staged every row, scored by this
    run's model and version. An error is one row; an image one row per selected frame."""
    columns = [*ledger.key, C.STATUS, C.NUM_FRAMES, C.MODEL_ID, C.MODEL_VERSION]
    parts = [t for _, t in ledger.staged(run_id, schema, columns)]
    if not parts:
        return pa.array([], pa.string())
    rows = pa.concat_tables(parts)
    rows = rows.filter(pc.and_(pc.equal(rows[C.MODEL_ID], run.model_id), pc.equal(rows[C.MODEL_VERSION], run.version)))
    every_frame = run.cfg.dicom.frames == "all"
    expected = pc.if_else(pc.and_(pc.equal(rows[C.STATUS], C.STATUS_OK), pa.scalar(every_frame)), rows[C.NUM_FRAMES],
                          pa.scalar(1, pa.int32()))
    counted = pa.table({"unit": _unit_ids(rows, ledger.key), "expected": expected}).group_by("unit").aggregate(
        [("expected", "count"), ("expected", "max")])
    whole = pc.equal(counted["expected_count"], pc.cast(counted["expected_max"], pa.int64()))
    return counted.filter(whole)["unit"].combine_chunks()


def _score(run: RunInfo, summary: ScoreSummary, full: bool, annotator: Callable[[RunInfo], Annotator] | None,
           stages: tuple[Stage, ...], loaded: Loaded, adopted_ok: int = 0) -> None:
    """The pipeline into staging (when anything is left to score), then the commit (counting the
    task's classes and the drift features against the checkpoint's training profile)."""
    seconds = _run_pipeline(run, summary, annotator, stages, loaded) if summary.files else 0.0
    tally, drift = run.task.tally(run.cfg), DriftCounter(loaded.profile)

    def count(table: pa.Table) -> None:
        tally(table)
        drift(table)

    with deferred():  # the report file, then the ledger: a stop signal waits for both
        stats = run.ledger.commit(run.run_id, report_schema(run.task, run.cfg), count,
                                  replace=(run.model_id, run.version) if full else None)
    summary.rows, summary.images_ok, summary.error_files, summary.errors = stats.rows, stats.ok_rows, stats.error_files, stats.errors
    summary.classes = dict(tally.counts)
    drift.add_classes(summary.classes)
    summary.drift = drift.result(run.user.score.drift_warn_psi, run.user.score.drift_min_images)
    for warning in summary.drift.get("warnings", []):
        log.warning("drift: %s", warning)
    summary.images_per_s = (summary.images_ok - adopted_ok) / max(seconds, 1e-9) if seconds else 0.0
    run.task.after_commit(run.cfg, run.ledger, run.model_id, run.version)


def _run_pipeline(run: RunInfo, summary: ScoreSummary, annotator: Callable[[RunInfo], Annotator] | None,
                  stages: tuple[Stage, ...], loaded: Loaded) -> float:
    """Decode, score and report the todo list into the run's staging -> the seconds it took."""
    cfg, scfg = run.user, run.cfg.storage
    gpus, cpus = actor_resources(cfg.score.use_gpu)
    actors = _actors(cfg, gpus)
    settings = decode_settings(run.cfg, run.archive, None)
    device = torch.device("cuda" if gpus else "cpu")
    actor = ActorSettings(precision=cfg.score.precision, channels_last=cfg.train.channels_last, threads=0 if gpus else int(cpus),
                          compile=True, batch_size=cfg.score.batch_size,
                          model_cache=cfg.score.model_cache or storage.join(run.output, "compiled"), report=storage.join(run.dir, "actors"))
    precision, int8 = cfg.score.precision, None
    if precision == "int8":
        int8 = _int8_settings(run, settings, gpus, _warm(run, actor, device, loaded))
        precision = "int8" if int8 else "auto"
    actor = replace(actor, precision=precision)
    # Compiling pays once each actor has enough images to amortise it, or at once when the model
    # cache already holds the compiled model (loading it takes about a second).
    compiled = precision == "int8" or cfg.score.compile == "true" or (cfg.score.compile == "auto" and (
        summary.files / actors >= cfg.score.compile_min_images or _warm(run, actor, device, loaded)))
    actor = replace(actor, compile=compiled)
    summary.compiled, summary.precision = compiled, precision_name(precision, device)

    def run_pipeline() -> float:
        scored = build_ingest(storage.join(run.dir, "todo"), settings, run.cfg.data).map_batches(
            ModelActor,
            fn_constructor_kwargs={"task": run.task, "checkpoint": run.checkpoint, "storage_cfg": scfg, "settings": actor,
                                   "int8": int8, "annotator": annotator(run) if annotator else None},
            batch_size=max(cfg.score.batch_size, run.cfg.data.decode_batch_size),
            batch_format="numpy", compute=ActorPoolStrategy(size=actors), num_gpus=gpus, num_cpus=cpus)
        for stage in stages:
            scored = scored.map_batches(stage.fn, fn_kwargs={"run": run, **stage.kwargs}, batch_size=None, batch_format="numpy")
        report = scored.map_batches(to_report, fn_kwargs={"task": run.task, "cfg": run.cfg, "model_id": run.model_id,
                                                          "model_version": run.version, "run_id": run.run_id},
                                    batch_size=None, batch_format="numpy", zero_copy_batch=True)
        fs, staging = storage.filesystem(storage.join(run.dir, "staging"), scfg)
        started = time.perf_counter()
        report.write_parquet(staging, filesystem=fs, compression="zstd")
        return time.perf_counter() - started

    seconds = execute_pipeline(run_pipeline)
    if compiled:
        summary.compiled_model, summary.int8 = _actor_reports(actor.report, actor.model_cache, scfg)
    return seconds


def _actors(cfg: Config, gpus: int) -> int:
    if cfg.score.actors:
        return cfg.score.actors
    return max(1, int(ray.cluster_resources().get("GPU", 0))) if gpus else 1


def _warm(run: RunInfo, actor: ActorSettings, device: torch.device, loaded: Loaded) -> bool:
    """Whether the model cache holds the compiled model ``actor`` settings ask for. CPU actors:
    one built for this machine's fingerprint (local runs and clusters of one CPU type). GPU
    actors: one built on a GPU with this torch and code, since the driver may have no GPU to
    fingerprint; an actor on another GPU type compiles its own."""
    calibration = run.user.score.int8_calibration_images
    variant = compiled_variant(run.task.predictor(loaded).preset, run.cfg.preprocess.image_size, actor, device, calibration)
    cache = model_cache(actor.model_cache, run.cfg.storage, torch.device("cpu"), run.task)
    if device.type == "cpu":
        return cache.meta(run.model_id, variant) is not None
    return any(fp.get("device") == "cuda" and fp.get("torch") == torch.__version__ and fp.get("code") == cache.fingerprint["code"]
               for fp in cache.fingerprints(run.model_id, variant))


def _int8_settings(run: RunInfo, settings: DecodeSettings, gpus: int, warm: bool) -> Int8Settings | None:
    """The actors' int8 settings. ``warm`` (the model cache holds the int8 model): no images
    now; an actor that misses anyway (another CPU type) samples them itself. Otherwise sample,
    decode and store the calibration and check images now, or return None (scoring in ``auto``
    precision, with a warning) when no sampled object decodes."""
    cfg = run.user
    if gpus:
        raise ValueError("score.precision=int8 is a CPU path, but the cluster has GPUs and score.use_gpu=auto "
                         "would score there: set score.use_gpu=false to score on CPUs, or use bf16 or fp16")
    todo = storage.join(run.dir, "todo")
    if warm:
        return Int8Settings(images="", min_agreement=cfg.score.int8_min_agreement, calibration_images=cfg.score.int8_calibration_images,
                            sample=functools.partial(_int8_images, todo, settings, cfg))
    images = _int8_images(todo, settings, cfg)
    if not len(images["calibration"]):
        log.warning("score.precision=int8: none of the sampled objects decoded to an image to calibrate on; scoring with precision auto")
        return None
    # Through storage, not the actor's arguments: megabytes of constructor arguments would sit in
    # the object store, which a restarted actor cannot count on.
    buffer = io.BytesIO()
    np.savez(buffer, **images)
    int8 = Int8Settings(images=storage.join(run.dir, "int8", "images.npz"), min_agreement=cfg.score.int8_min_agreement,
                        calibration_images=cfg.score.int8_calibration_images)
    storage.write_bytes(int8.images, buffer.getvalue(), cfg.storage)
    return int8


def _int8_images(todo: str, settings: DecodeSettings, cfg: Config) -> dict[str, np.ndarray]:
    """Images to calibrate int8 scoring on, and others to check it against fp32: objects spread
    evenly over the todo list (not the first folder's), decoded as the pipeline decodes them.
    -> {"calibration": (N, S, S) uint8, "check": (K, S, S) uint8}; both empty when no sampled
    object decodes."""
    want = cfg.score.int8_calibration_images + cfg.score.int8_check_images
    fs, path = storage.filesystem(todo, cfg.storage)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    total = dataset.count_rows()  # from the Parquet footers: the driver never holds the whole todo list
    # twice as many objects as images wanted: some will be error files
    rows = dataset.take(np.unique(np.linspace(0, total - 1, min(total, 2 * want)).round().astype(np.int64)))
    decoded = decode_batch({c: rows.column(c).to_numpy(zero_copy_only=False) for c in rows.column_names}, settings)
    blobs = [b for b in decoded[C.IMAGE] if len(b)][:want]
    size = settings.image_size
    images = np.frombuffer(b"".join(blobs), np.uint8).reshape(-1, size, size)
    checks = min(cfg.score.int8_check_images, len(images) // 3)  # at least 2/3 calibrate when the sample is short
    is_check = np.zeros(len(images), bool)
    if checks:
        is_check[np.unique(np.linspace(0, len(images) - 1, checks).round().astype(np.int64))] = True
    return {"calibration": images[~is_check][: cfg.score.int8_calibration_images], "check": images[is_check]}


def _actor_reports(folder: str, cache: str, scfg: StorageConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The compiled actors' reports (one JSON each, medhier.infer.actor.ActorReport) -> the
    summary's (``compiled_model``, ``int8``). int8: the least agreement over the actors (they
    calibrate on the same images, so they agree)."""
    reports = [json.loads(storage.read_bytes(storage.join(folder, o.path), scfg))
               for page in storage.list_objects(folder, scfg) for o in page if o.path.endswith(".json")] if storage.exists(folder, scfg) else []
    if not reports:
        return {}, {}
    ways = {r["cache"] for r in reports}
    compiled = {"cache": ways.pop() if len(ways) == 1 else "mixed", "actors": len(reports), "folder": cache,
                "built_at": max(r["built_at"] for r in reports), "start_s": max(r["seconds"] for r in reports),
                "build_s": max(r["build_seconds"] for r in reports), "ready_at": min(r["ready_at"] for r in reports)}
    checks = [{**r["int8"], "cached": r["cache"] == "hit"} for r in reports if r["int8"]]
    int8 = {**min(checks, key=lambda c: c["leaf_agreement"] if c["images"] else 2.0), "actors": len(checks)} if checks else {}
    return compiled, int8
