"""``medhier plaque predict``: for each patient's latest visit in an archive — register, segment,
measure, predict — one Parquet row with the predicted change factors and their intervals,
incrementally and crash-safely, on Ray Data.

    archive ──list──▶ manifest ──headers, groupby StudyInstanceUID (data.series)──▶ study index
    study index ──each patient's latest study──▶ + the patient's record (patients.csv) ──minus the ledger──▶ todo
    todo ──one task per study: volumes, registration, segmentation source, measurements (plaque.study),
           the prediction model (plaque.model)──▶ staging ──commit (infer.ledger)──▶ report + ledger

The latest visit is the patient's study with the latest StudyDate, StudyTime (then the larger
StudyInstanceUID), among the studies of the archive with that patient_key. A visit is predicted
again when its key changes: the study's objects, its segmentation file's version
(``--segmentations``) or the patient's record (a digest of the covariate values); or when the
prediction model, the segmentation source or the measurement's version differs (``model_id``,
``model_version``). So a new visit of a patient is predicted at the next run; its earlier
prediction stays in the report (the history of what was predicted when).

Output (OUTPUT, local or s3://): ``report/run_id=<run>/part-0.parquet`` (columns below),
``ledger/``, ``runs/<run>/`` (config.yaml, summary.json) and ``summary.json``, as for
``medhier score`` (:mod:`medhier.infer.ledger`): a run's rows become visible only at its
commit; a killed run leaves nothing visible and the next run does its work.

Columns (in this order)
-----------------------
=================================  =========  ==================================================
column                             type       meaning
=================================  =========  ==================================================
patient_key .. segmentation_objects           as the measure report (:mod:`medhier.plaque.report`),
                                              with ``visit_number`` (int32: which of the patient's
                                              studies in the archive, 1 = the first, in time)
(every MEASUREMENTS column)        int64 /    the latest visit's measurements
                                   float64
<factor>                           float64    predicted change per year (unit: the model's
                                              ``factor_unit``, e.g. mm/y, pp/y, mm3/y, %/y)
<factor>_lower, <factor>_upper     float64    its prediction interval (split-conformal)
coverage                           float64    the intervals' stated coverage (e.g. 0.9)
status                             string     ok | error
error_reason, error_message        string     a code of :data:`REASONS` and what was wrong
model_id                           string     the prediction model (its content hash)
model_version                      string     ``<segmentation source>|<measurement version>``
segmentation_model_id              string     the segmentation source (``seg:archive``,
                                              ``seg:<URI>``, or the segmentation model's id)
run_id, scored_at                  string,    the run; when the row was made (UTC, ms)
                                   timestamp
=================================  =========  ==================================================

An error row keeps whatever was measured: a visit measured but without a patient record
(``no_patient_record``) has its measurements and no predictions.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from medhier import columns as C
from medhier.config import Config
from medhier.data.manifest import write_manifest
from medhier.data.series import DIGEST, STUDY_DATE, STUDY_TIME, SeriesSettings, Study, map_studies, read_study_keys, write_study_index
from medhier.infer.ledger import Heartbeat, Ledger, new_run_id
from medhier.io import storage
from medhier.plaque.model import PredictionModel, model_folder
from medhier.plaque.patients import covariate_schema, read_patients
from medhier.plaque.report import REASONS as MEASURE_REASONS
from medhier.plaque.report import REPORT_SCHEMA, VISIT_KEY, run_head_lines, run_tail_lines
from medhier.plaque.segmentations import SEGMENTATION_VERSION, ArchiveSegmentations, GivenSegmentations, SegmentationSource
from medhier.plaque.study import VisitSettings, measure_study, measure_version
from medhier.runtime import execute_pipeline

__all__ = ["LEDGER_KEY", "REASONS", "PredictSettings", "PredictSummary", "predict_archive", "predict_schema", "predict_study",
           "seg_model_source"]

LEDGER_KEY = (C.STUDY_INSTANCE_UID, VISIT_KEY)
VISIT_NUMBER, COVERAGE, SEGMENTATION_MODEL_ID = "visit_number", "coverage", "segmentation_model_id"
RECORD = "_record"  # todo column: the patient has a record (its covariates follow)
REASONS: dict[str, str] = {
    **MEASURE_REASONS,
    "no_patient_record": "the visit was measured, but the patients table has no row for its patient_key",
    "internal_error": "an unexpected error in medhier while measuring or predicting (a bug: please report it)",
}
_VISIT_COLUMNS = [f for f in REPORT_SCHEMA if f.name not in (C.STATUS, C.ERROR_REASON, C.ERROR_MESSAGE, C.MODEL_ID,
                                                              C.MODEL_VERSION, C.RUN_ID, C.SCORED_AT)]


def predict_schema(model: PredictionModel) -> pa.Schema:
    """The report's columns for ``model``'s factors (module docstring)."""
    visit = list(_VISIT_COLUMNS)
    visit.insert(4, pa.field(VISIT_NUMBER, pa.int32()))
    predictions = [pa.field(f"{name}{suffix}", pa.float64()) for name in model.factors for suffix in ("", "_lower", "_upper")]
    return pa.schema([
        *visit, *predictions, (COVERAGE, pa.float64()), (C.STATUS, pa.string()), (C.ERROR_REASON, pa.string()),
        (C.ERROR_MESSAGE, pa.string()), (C.MODEL_ID, pa.string()), (C.MODEL_VERSION, pa.string()),
        (SEGMENTATION_MODEL_ID, pa.string()), (C.RUN_ID, pa.string()), (C.SCORED_AT, pa.timestamp("ms", tz="UTC")),
    ])


@dataclass(frozen=True)
class PredictSettings:
    """What the per-study task needs (picklable): the measure step's settings and the model."""

    visit: VisitSettings
    model: PredictionModel
    model_version: str


def predict_study(study: Study, settings: PredictSettings) -> dict[str, Any]:
    """One study -> its prediction row, ok or error; never raises (an unexpected error is an
    ``internal_error`` row naming the study)."""
    row = measure_study(study, settings.visit)
    row[SEGMENTATION_MODEL_ID] = settings.visit.model_id
    row.update({C.MODEL_ID: settings.model.model_id, C.MODEL_VERSION: settings.model_version,
                VISIT_NUMBER: study.extra.get(VISIT_NUMBER), COVERAGE: settings.model.coverage})
    for name in settings.model.factors:
        row.update({name: None, f"{name}_lower": None, f"{name}_upper": None})
    if row[C.STATUS] != C.STATUS_OK:
        return row
    if not study.extra.get(RECORD):
        row.update(status=C.STATUS_ERROR, error_reason="no_patient_record",
                   error_message=f"study {study.study_instance_uid}: no row for patient_key {study.patient_key} in the patients table")
        return row
    try:
        inputs = _inputs(row, study.extra, settings.model)
        for name, prediction in settings.model.predict(inputs).items():
            row.update({name: float(prediction.value[0]), f"{name}_lower": float(prediction.lower[0]),
                        f"{name}_upper": float(prediction.upper[0])})
    except Exception as exc:  # a bug must cost one visit, not the run
        row.update(status=C.STATUS_ERROR, error_reason="internal_error",
                   error_message=f"study {study.study_instance_uid}: predicting: {type(exc).__name__}: {exc}")
    return row


def _inputs(row: dict[str, Any], extra: dict[str, Any], model: PredictionModel) -> pa.Table:
    """One row of the model's inputs: the visit's measurements and the patient's covariates."""
    space = model.space
    schema = covariate_schema(space.covariate_specs)
    columns = {name: pa.array([row[name]], pa.float64()) for name in space.measurements}
    for f in schema:
        if f.name != C.PATIENT_KEY:
            columns[f.name] = pa.array([extra.get(f.name)], f.type)
    return pa.table(columns)


@dataclass
class PredictSummary:
    """What a predict run did: summary.json and the printed table."""

    run_id: str
    archive: str
    output: str
    model: str
    model_id: str
    segmentation_model_id: str
    model_version: str
    listed: int = 0
    excluded: int = 0
    objects_in_no_study: dict[str, int] = field(default_factory=dict)
    studies: int = 0
    patients: int = 0
    patients_without_record: int = 0
    already_predicted: int = 0
    predicted: int = 0  # latest visits done in this run
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    recovered_runs: list[str] = field(default_factory=list)
    removed_runs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    predict_seconds: float = 0.0
    patients_per_s: float = 0.0

    def table(self) -> str:
        lines = run_head_lines(f"{self.run_id}  (model {self.model_id}, segmentations {self.segmentation_model_id})", self.archive,
                               self.listed, self.excluded, self.objects_in_no_study)
        lines += [
            f"patients         {self.patients:,} in {self.studies:,} studies ({self.patients_without_record:,} without a record)",
            f"latest visits    {self.predicted:,} predicted now ({self.ok:,} ok), {self.already_predicted:,} already predicted",
        ]
        lines += [f"  error {reason:<24}{n:,}" for reason, n in sorted(self.errors.items())]
        lines += run_tail_lines(self.recovered_runs, self.seconds, f"{self.patients_per_s:,.2f} patients/s while predicting", self.output)
        return "\n".join(lines)


def seg_model_source(cfg: Config, checkpoint: str) -> SegmentationSource:
    """The segmentation model at ``checkpoint`` (a ``medhier plaque train-seg`` checkpoint, its
    directory or ``model.pt``) as the job's segmentation source: each per-study task segments its
    visit with it on the reference grid (:class:`medhier.plaque.segmenter.ModelSegmentations`).
    The model's input settings (``seg``) come from the checkpoint; its sequences must be
    ``plaque.sequences`` names, the reference among them (as for ``plaque segment``). Raises
    ValueError (:class:`~medhier.train.checkpoint.CheckpointError`) naming the checkpoint for
    another task's checkpoint or a file that is not a checkpoint, and naming the setting for
    sequences the config does not have: before any Ray work."""
    # Deferred on purpose: torch and MONAI load only when a model segments; the archive's own
    # SEGs (the default source) need neither.
    from medhier.plaque.seg_inputs import check_sequences
    from medhier.plaque.seg_task import PLAQUE_SEG
    from medhier.plaque.segmenter import ModelSegmentations
    from medhier.train.checkpoint import config_for_checkpoint, load_checkpoint

    loaded = load_checkpoint(checkpoint, PLAQUE_SEG, cfg.storage)
    run_cfg = config_for_checkpoint(cfg, loaded)
    try:
        check_sequences(run_cfg.seg, run_cfg.plaque)
    except ValueError as exc:
        raise ValueError(f"--seg-checkpoint {checkpoint!r} (model {loaded.model_id}): {exc}") from None
    return ModelSegmentations(storage.normalize(checkpoint), loaded.model_id, run_cfg.plaque.reference, cfg.storage)


def predict_archive(cfg: Config, archive: str, patients: str, model: str, output: str, *,
                    source: SegmentationSource | None = None, segmentations: str = "", seg_checkpoint: str = "",
                    full: bool = False) -> PredictSummary:
    """Predict the change factors of every patient's latest visit in ``archive`` that the ledger
    of ``output`` has not seen (all with ``full``). The label maps come from ``source``, else
    from the segmentation model at ``seg_checkpoint`` (:func:`seg_model_source`), else from
    files under ``segmentations``, else from the study's own DICOM SEGs. ``model``: a
    ``medhier plaque fit`` output or its model/ folder. Needs Ray initialised; raises on failure
    (the run's rows then never become visible)."""
    if sum(map(bool, (source, segmentations, seg_checkpoint))) > 1:
        raise ValueError("name one segmentation source: source, --segmentations or --seg-checkpoint")
    start = time.perf_counter()
    archive, output = storage.normalize(archive), storage.normalize(output)
    model_uri = model_folder(model, cfg.storage)
    predictor = PredictionModel.load(model_uri, cfg.storage)
    # The model's own covariates decide the record's columns: it was trained on them.
    records = read_patients(patients, predictor.space.covariate_specs, cfg.storage, cfg.dicom.patient_salt)
    if seg_checkpoint:
        source = seg_model_source(cfg, seg_checkpoint)
    if source is None:
        source = GivenSegmentations(segmentations, cfg.storage) if segmentations else ArchiveSegmentations()
    version = f"{source.model_id}|{measure_version(cfg.plaque)}"
    ledger = Ledger(output, cfg.storage, key=LEDGER_KEY)
    run_id = new_run_id()
    summary = PredictSummary(run_id, archive, output, model_uri, predictor.model_id, source.model_id, version)
    run_dir = ledger.run_dir(run_id)
    settings = SeriesSettings(archive, cfg.storage, cfg.dicom.patient_salt)
    with Heartbeat(run_dir, cfg.storage):
        summary.recovered_runs = ledger.recover()
        storage.write_text(storage.join(run_dir, "config.yaml"), cfg.to_yaml(), cfg.storage)
        listing = write_manifest(archive, storage.join(run_dir, "manifest"), cfg.data, cfg.storage)
        summary.listed, summary.excluded = listing.objects, listing.excluded
        index = storage.join(run_dir, "studies")
        found = write_study_index(storage.join(run_dir, "manifest"), index, settings, cfg.data)
        summary.objects_in_no_study, summary.studies = found.rejected, found.studies
        listed = _latest_visits(read_study_keys(index, cfg.storage), records, source, summary)
        todo = ledger.todo(listed, predictor.model_id, version, full)
        summary.already_predicted = listed.num_rows - todo.num_rows
        if todo.num_rows:
            visit = VisitSettings(cfg.plaque, source, source.model_id, measure_version(cfg.plaque), run_id, cfg.dicom.patient_salt)
            _predict(ledger, run_id, index, todo, settings, PredictSettings(visit, predictor, version), summary, full)
        summary.removed_runs = ledger.remove_dead_runs(keep=(run_id,))
        summary.seconds = time.perf_counter() - start
        ledger.finish(run_id, asdict(summary))
    return summary


def _latest_visits(keys: pa.Table, records: pa.Table, source: SegmentationSource, summary: PredictSummary) -> pa.Table:
    """Each patient's latest study (uid, digest, visit_key) with its visit number, the
    patient's covariates and the source's columns: the todo candidates."""
    studies = keys.filter(pc.equal(keys[C.STATUS], C.STATUS_OK)).select([C.STUDY_INSTANCE_UID, DIGEST, C.PATIENT_KEY, STUDY_DATE, STUDY_TIME])
    by_patient: dict[str, list[dict]] = {}
    for row in studies.to_pylist():
        # A study without a patient ID is its own patient (it will have no record).
        by_patient.setdefault(row[C.PATIENT_KEY] or f"study:{row[C.STUDY_INSTANCE_UID]}", []).append(row)
    covariates = {r[C.PATIENT_KEY]: r for r in records.to_pylist()}
    names = [n for n in records.column_names if n != C.PATIENT_KEY]
    rows = []
    for patient, visits in sorted(by_patient.items()):
        visits.sort(key=lambda r: (r[STUDY_DATE] or "", r[STUDY_TIME] or "", r[C.STUDY_INSTANCE_UID]))
        latest, record = visits[-1], covariates.get(patient)
        rows.append({C.STUDY_INSTANCE_UID: latest[C.STUDY_INSTANCE_UID], DIGEST: latest[DIGEST], VISIT_NUMBER: len(visits),
                     RECORD: record is not None, **{n: (record or {}).get(n) for n in names},
                     "_record_digest": hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()})
    summary.patients = len(rows)
    summary.patients_without_record = sum(not r[RECORD] for r in rows)
    schema = pa.schema([(C.STUDY_INSTANCE_UID, pa.string()), (DIGEST, pa.string()), (VISIT_NUMBER, pa.int32()), (RECORD, pa.bool_()),
                        *(f for f in records.schema if f.name != C.PATIENT_KEY), ("_record_digest", pa.string())])
    table = pa.Table.from_pylist(rows, schema=schema)
    located = source.locate()
    if located.table is not None:
        table = table.join(located.table, keys=C.STUDY_INSTANCE_UID, join_type="left outer")
    seg_versions = table[SEGMENTATION_VERSION].to_pylist() if SEGMENTATION_VERSION in table.column_names else [None] * table.num_rows
    visit_keys = [hashlib.sha256(f"{digest}\0{seg or ''}\0{record}".encode()).hexdigest()
                  for digest, seg, record in zip(table[DIGEST].to_pylist(), seg_versions, table["_record_digest"].to_pylist())]
    table = table.append_column(VISIT_KEY, pa.array(visit_keys, pa.string()))
    return table.drop_columns([c for c in (SEGMENTATION_VERSION, "_record_digest") if c in table.column_names])


def _predict(ledger: Ledger, run_id: str, index: str, todo: pa.Table, settings: SeriesSettings, predict: PredictSettings,
             summary: PredictSummary, full: bool) -> None:
    """The per-study pipeline into staging, then the commit."""
    schema = predict_schema(predict.model)
    # As the measure job: with registration one visit alone takes seconds; without, a few
    # visits per task amortise Ray Data's scheduling lag.
    per_task = 1 if predict.visit.plaque.register else 4

    def run_pipeline() -> float:
        rows = map_studies(index, todo, predict_study, schema, settings, fn_kwargs={"settings": predict}, studies_per_task=per_task)
        fs, staging = storage.filesystem(storage.join(ledger.run_dir(run_id), "staging"), settings.storage)
        started = time.perf_counter()
        rows.write_parquet(staging, filesystem=fs, compression="zstd")
        return time.perf_counter() - started

    seconds = execute_pipeline(run_pipeline)
    stats = ledger.commit(run_id, schema, replace=(predict.model.model_id, predict.model_version) if full else None)
    summary.predicted, summary.ok, summary.errors = stats.rows, stats.ok_rows, stats.errors
    summary.predict_seconds = seconds
    summary.patients_per_s = stats.rows / max(seconds, 1e-9)
