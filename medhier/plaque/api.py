"""``medhier plaque measure``: an archive's visits measured into a Parquet report, incrementally and
crash-safely, on Ray Data.

    archive ──list──▶ manifest ──headers, groupby StudyInstanceUID (data.series)──▶ study index
    study index + segmentation source ──▶ visit keys ──minus the ledger──▶ todo
    todo ──one task per study (plaque.study: volumes, registration, label map, measurements)──▶
         staging Parquet under runs/<run>/ ──commit (infer.ledger)──▶ report + ledger
    report ──▶ visits.parquet (the visit manifest, plaque.visits)

Output (OUTPUT is a folder or s3://): ``report/run_id=<run>/part-0.parquet`` (one row per visit
measured, columns in :mod:`medhier.plaque.report`), ``ledger/`` and ``runs/<run>/`` as for
``medhier score`` (:mod:`medhier.infer.ledger`: a run's rows become visible only at its commit; a
crash leaves nothing visible and the next run does the work), ``visits.parquet`` (rewritten after
every run from the committed report: :func:`medhier.plaque.visits.visit_manifest`) and
``summary.json``.

A visit is measured again when its key changes: the study UID with a digest of its objects'
(path, size, ETag, mtime) and of its segmentation file's version under ``--segmentations``; or
when the segmentation source (``model_id``) or the measurement's version (code format, plaque
config) differs. An error row is final for its key, as in ``medhier score`` (``--full`` measures
everything again).

Accounting: every listed object is either excluded by ``data.exclude`` (``excluded``), in no
study (``objects_in_no_study``, by reason), or a member of a study; every study has one visit
row (this run's or an earlier one's); every series of a study is an entry of its row's ``series``
(used, superseded, rejected with a reason, unmatched), every SEG object an entry of its
``segmentation_objects``; every file under ``--segmentations`` is used by a visit row, or
counted as ``segmentation_files_no_study`` or ``segmentation_files_ignored``.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from medhier import columns as C
from medhier.config import Config
from medhier.data.manifest import write_manifest
from medhier.data.series import DIGEST, SeriesSettings, map_studies, read_study_keys, write_study_index
from medhier.infer.ledger import Heartbeat, Ledger, new_run_id
from medhier.io import storage
from medhier.plaque.report import REPORT_SCHEMA, VISIT_KEY, VisitTally, run_head_lines, run_tail_lines
from medhier.plaque.segmentations import (
    SEGMENTATION_PATHS,
    SEGMENTATION_VERSION,
    ArchiveSegmentations,
    GivenSegmentations,
    SegmentationSource,
)
from medhier.plaque.study import VisitSettings, measure_study, measure_version
from medhier.plaque.visits import too_few_visits, visit_manifest
from medhier.runtime import execute_pipeline
from medhier.stopping import Stopped

__all__ = ["MeasureSummary", "StudyTasks", "VisitPipeline", "measure_archive", "visits_table"]

LEDGER_KEY = (C.STUDY_INSTANCE_UID, VISIT_KEY)


@dataclass
class MeasureSummary:
    """What a measure run did: written as summary.json and printed as a table. Counts of visits,
    series and segmentation objects are this run's; ``patients`` and ``patients_too_few_visits``
    cover every committed visit of this source and version."""

    run_id: str
    archive: str
    output: str
    segmentations: str
    model_id: str
    model_version: str
    listed: int = 0
    excluded: int = 0
    objects_in_no_study: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)  # a few objects in no study: path -> why
    studies: int = 0
    already_measured: int = 0
    visits: int = 0  # measured in this run
    visits_ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # error visits by reason
    series: dict[str, int] = field(default_factory=dict)  # series by outcome
    series_rejected: dict[str, int] = field(default_factory=dict)  # rejected series by reason
    instances_rejected: dict[str, int] = field(default_factory=dict)  # instances rejected on their own, by reason
    segmentation_objects: dict[str, int] = field(default_factory=dict)  # by outcome
    segmentation_files_no_study: int = 0
    segmentation_files_ignored: int = 0
    patients: int = 0
    patients_too_few_visits: int = 0
    min_visits: int = 2
    recovered_runs: list[str] = field(default_factory=list)
    removed_runs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    measure_seconds: float = 0.0
    visits_per_s: float = 0.0

    def table(self) -> str:
        lines = run_head_lines(f"{self.run_id}  (segmentations {self.model_id}, {self.model_version})", self.archive, self.listed,
                               self.excluded, self.objects_in_no_study)
        lines += [
            f"studies          {self.studies:,} ({self.already_measured:,} already measured)",
            f"measured now     {self.visits:,} visits ({self.visits_ok:,} ok, {self.visits - self.visits_ok:,} errors)",
        ]
        if self.errors:
            lines.append("errors by reason")
            lines += [f"  {reason:<22}{n:,}" for reason, n in sorted(self.errors.items())]
        if self.series:
            lines.append("series           " + ", ".join(f"{n:,} {outcome}" for outcome, n in sorted(self.series.items())))
        lines += [f"  rejected {reason:<26}{n:,}" for reason, n in sorted(self.series_rejected.items())]
        if self.segmentation_objects:
            lines.append("segmentations    " + ", ".join(f"{n:,} {o}" for o, n in sorted(self.segmentation_objects.items())))
        if self.segmentation_files_no_study or self.segmentation_files_ignored:
            lines.append(f"  files: {self.segmentation_files_no_study:,} name no study of the archive, "
                         f"{self.segmentation_files_ignored:,} ignored (not <StudyInstanceUID>.dcm/.nii/.nii.gz)")
        lines.append(f"patients         {self.patients:,} ({self.patients_too_few_visits:,} with fewer than "
                     f"{self.min_visits} usable visits)")
        lines += run_tail_lines(self.recovered_runs, self.seconds, f"{self.visits_per_s:,.2f} visits/s while measuring", self.output)
        return "\n".join(lines)


class VisitPipeline(Protocol):
    """How a run turns its todo studies into report rows (:data:`REPORT_SCHEMA`)."""

    def rows(self, index: str, todo: pa.Table, settings: SeriesSettings, visit: VisitSettings):
        """A Ray dataset of one report row per todo study (``todo``: study_instance_uid,
        digest, visit_key and the source's columns; ``index``: the run's study index)."""


class StudyTasks:
    """The default pipeline: one Ray task per study (a few without registration) that measures
    it whole (:func:`medhier.plaque.study.measure_study`)."""

    def rows(self, index: str, todo: pa.Table, settings: SeriesSettings, visit: VisitSettings):
        # A task of about a second amortises Ray Data's scheduling lag (~0.1 s per task); with
        # registration one visit alone takes seconds.
        per_task = 1 if visit.plaque.register else 4
        return map_studies(index, todo, measure_study, REPORT_SCHEMA, settings, fn_kwargs={"settings": visit}, studies_per_task=per_task)


def measure_archive(cfg: Config, archive: str, output: str, *, segmentations: str = "",
                    source: SegmentationSource | None = None, full: bool = False, pipeline: VisitPipeline | None = None,
                    version: str = "") -> MeasureSummary:
    """Measure the new or changed visits of ``archive`` (all of them with ``full``) into ``output``.

    The label maps come from ``source`` when given (a plug-in, e.g. a segmentation model), else
    from the files under ``segmentations`` (:class:`~medhier.plaque.segmentations.GivenSegmentations`),
    else from the DICOM SEG objects in each study. ``pipeline``: how the studies become rows
    (default :class:`StudyTasks`; the segment job's runs its model on actors); ``version``: the
    report's model_version (default :func:`~medhier.plaque.study.measure_version`). Needs Ray
    initialised. Raises on failure (the run's rows then never become visible).
    """
    start = time.perf_counter()
    archive, output = storage.normalize(archive), storage.normalize(output)
    if source is None:
        source = GivenSegmentations(segmentations, cfg.storage) if segmentations else ArchiveSegmentations()
    ledger = Ledger(output, cfg.storage, key=LEDGER_KEY)
    run_id, version = new_run_id(), version or measure_version(cfg.plaque)
    summary = MeasureSummary(run_id, archive, output, storage.normalize(segmentations) if segmentations else "", source.model_id,
                             version, min_visits=cfg.plaque.min_visits)
    run_dir = ledger.run_dir(run_id)
    settings = SeriesSettings(archive, cfg.storage, cfg.dicom.patient_salt)
    try:
        with Heartbeat(run_dir, cfg.storage):
            summary.recovered_runs = ledger.recover()
            storage.write_text(storage.join(run_dir, "config.yaml"), cfg.to_yaml(), cfg.storage)
            listing = write_manifest(archive, storage.join(run_dir, "manifest"), cfg.data, cfg.storage)
            summary.listed, summary.excluded = listing.objects, listing.excluded
            index = storage.join(run_dir, "studies")
            found = write_study_index(storage.join(run_dir, "manifest"), index, settings, cfg.data)
            summary.objects_in_no_study, summary.examples, summary.studies = found.rejected, found.examples, found.studies
            listed = _visit_keys(read_study_keys(index, cfg.storage), source, summary)
            todo = ledger.todo(listed, source.model_id, version, full)
            summary.already_measured = listed.num_rows - todo.num_rows
            if todo.num_rows:
                visit = VisitSettings(cfg.plaque, source, source.model_id, version, run_id, cfg.dicom.patient_salt)
                _measure(ledger, run_id, index, todo, settings, visit, summary, full, pipeline or StudyTasks())
            _write_visits(ledger, source.model_id, version, summary, cfg)
            summary.removed_runs = ledger.remove_dead_runs(keep=(run_id,))
            summary.seconds = time.perf_counter() - start
            ledger.finish(run_id, asdict(summary))
    except Stopped as stop:  # medhier.stopping: the CLI prints this in its one line
        stop.note(f"nothing of run {run_id} is in the report yet ({ledger.staged_rows(run_id):,} measured rows were staged); "
                  "a re-run measures the visits not committed")
        raise
    return summary


def _visit_keys(keys: pa.Table, source: SegmentationSource, summary: MeasureSummary) -> pa.Table:
    """The studies (study uid, digest) with their visit key and the source's columns for them."""
    studies = keys.filter(pc.equal(keys[C.STATUS], C.STATUS_OK)).select([C.STUDY_INSTANCE_UID, DIGEST])
    located = source.locate()
    summary.segmentation_files_ignored = len(located.ignored)
    if located.table is not None:
        known = set(studies[C.STUDY_INSTANCE_UID].to_pylist())
        summary.segmentation_files_no_study = sum(
            len(paths.split("\n")) for uid, paths in zip(located.table[C.STUDY_INSTANCE_UID].to_pylist(), located.table[SEGMENTATION_PATHS].to_pylist())
            if uid not in known
        )
        studies = studies.join(located.table, keys=C.STUDY_INSTANCE_UID, join_type="left outer")
    versions = studies[SEGMENTATION_VERSION].to_pylist() if SEGMENTATION_VERSION in studies.column_names else [None] * studies.num_rows
    visit_keys = [
        hashlib.sha256(f"{digest}\0{seg or ''}".encode()).hexdigest()
        for digest, seg in zip(studies[DIGEST].to_pylist(), versions)
    ]
    studies = studies.append_column(VISIT_KEY, pa.array(visit_keys, pa.string()))
    return studies.drop_columns([c for c in (SEGMENTATION_VERSION,) if c in studies.column_names])


def _measure(ledger: Ledger, run_id: str, index: str, todo: pa.Table, settings: SeriesSettings, visit: VisitSettings,
             summary: MeasureSummary, full: bool, pipeline: VisitPipeline) -> None:
    """The pipeline into staging, then the commit."""
    scfg = settings.storage

    def run_pipeline() -> float:
        rows = pipeline.rows(index, todo, settings, visit)
        fs, staging = storage.filesystem(storage.join(ledger.run_dir(run_id), "staging"), scfg)
        started = time.perf_counter()
        rows.write_parquet(staging, filesystem=fs, compression="zstd")
        return time.perf_counter() - started

    seconds = execute_pipeline(run_pipeline)
    tally = VisitTally()
    ledger.commit(run_id, REPORT_SCHEMA, tally, replace=(visit.model_id, visit.model_version) if full else None)
    summary.visits, summary.visits_ok, summary.errors = tally.visits, tally.ok, tally.errors
    summary.series, summary.series_rejected = tally.series, tally.series_rejected
    summary.instances_rejected, summary.segmentation_objects = tally.instances_rejected, tally.segmentation_objects
    summary.measure_seconds = seconds
    summary.visits_per_s = tally.visits / max(seconds, 1e-9)


def visits_table(output: str, cfg: Config, model_id: str, version: str) -> pa.Table:
    """The visit manifest of ``output``'s committed report for one source and version."""
    ledger = Ledger(output, cfg.storage, key=LEDGER_KEY)
    if ledger.table() is None:
        return visit_manifest(REPORT_SCHEMA.empty_table())
    report = ledger.report(list(REPORT_SCHEMA.names))
    mine = report.filter(pc.and_(pc.equal(report[C.MODEL_ID], model_id), pc.equal(report[C.MODEL_VERSION], version)))
    return visit_manifest(mine)


def _write_visits(ledger: Ledger, model_id: str, version: str, summary: MeasureSummary, cfg: Config) -> None:
    """OUTPUT/visits.parquet from the committed report (one write: readers see the old or the new)."""
    visits = visits_table(ledger.output, cfg, model_id, version)
    summary.patients, summary.patients_too_few_visits = too_few_visits(visits, cfg.plaque.min_visits)
    buffer = io.BytesIO()
    pq.write_table(visits, buffer, compression="zstd")
    storage.write_bytes(storage.join(ledger.output, "visits.parquet"), buffer.getvalue(), cfg.storage)
