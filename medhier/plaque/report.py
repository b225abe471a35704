"""The measure job's report: one Parquet row per visit (a study), its columns and its error reasons.

Columns (``OUTPUT/report/run_id=<run>/part-0.parquet``, in this order)
-----------------------------------------------------------------------
=========================  =========  ==========================================================
column                     type       meaning
=========================  =========  ==========================================================
patient_key                string     :func:`medhier.io.dicom.patient_key` of the PatientID
study_instance_uid         string     the study (the visit)
visit_date                 date32     StudyDate; null when absent or malformed
visit_time                 string     StudyTime (DICOM TM), "" when absent
visit_key                  string     sha256 of the study's objects (path, size, ETag, mtime)
                                      and of the segmentation object's version: with the study
                                      UID, the ledger's key (a changed study is measured again)
objects                    int64      DICOM objects of the study in the archive
reference_series_uid       string     the reference sequence's series (null: none formed a volume)
segmentation               string     the label map's object: an archive path (a SEG in the
                                      study) or a path under ``--segmentations``; null: none
segmentation_format        string     ``dicom-seg`` or ``nifti``; null: none
series                     string     JSON list, one entry per series of the study
                                      (:func:`medhier.plaque.visits.series_entry`): sequence,
                                      outcome (used, superseded, rejected, unmatched), reason,
                                      the rigid transform onto the reference
segmentation_objects       string     JSON list, one entry per segmentation object considered
                                      (path, outcome used/superseded/rejected/unused, reason,
                                      unmapped segments, resampled, voxels outside the grid)
(every MEASUREMENTS column) int64 /   :data:`medhier.plaque.measure.MEASUREMENTS`, units in
                           float64    its table (mm, mm2, mm3, %, 1); null on error rows
status                     string     ok | error
error_reason               string     a code from :data:`REASONS`; null on ok rows
error_message              string     what was wrong, naming the objects; null on ok rows
model_id                   string     the segmentation source (``seg:archive``, ``seg:<URI>``,
                                      or a model's id)
model_version              string     the measurement's version: code format and the plaque
                                      config that changes results (sequences, reference,
                                      register, seg_labels)
run_id                     string     the run that measured the visit
scored_at                  timestamp  when the visit was measured (UTC, ms)
=========================  =========  ==========================================================

A series that forms no volume, or whose registration fails, is a ``rejected`` entry of its
visit's ``series`` (counted by reason in the summary); the visit row stays ok unless the
reference sequence has no volume. Objects in no study are counted in the summary
(:mod:`medhier.data.series`).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from medhier import columns as C
from medhier.io import storage
from medhier.io.seg import REASONS as SEG_REASONS
from medhier.io.volume import REASONS as VOLUME_REASONS
from medhier.plaque.measure import MEASUREMENTS
from medhier.plaque.register import REASONS as REGISTER_REASONS

__all__ = [
    "REASONS",
    "REGISTRATION_REASONS",
    "REPORT_SCHEMA",
    "VISIT_KEY",
    "VisitRejected",
    "VisitTally",
    "measurement_values",
    "to_json",
    "visit_date",
    "run_head_lines",
    "run_tail_lines",
]

VISIT_KEY = "visit_key"

# Why a visit row is an error (error_reason).
REASONS: dict[str, str] = {
    "no_reference_series": "no series of the study matches the reference sequence (plaque.reference)",
    **{code: f"the reference sequence formed no volume: {text}" for code, text in VOLUME_REASONS.items() if code != "segmentation"},
    "read_error": "an object of the study could not be read from storage",
    "no_segmentation": "no segmentation object for the visit (none in the study on its reference series, none under --segmentations)",
    "several_segmentations": "more than one file under --segmentations names the study",
    **{f"seg_{code}": f"the segmentation: {text}" for code, text in SEG_REASONS.items()},
    "missing_sequence": "a sequence the segmentation model needs (seg.sequences) has no volume, or could not be registered onto the reference",
    "internal_error": "an unexpected error in medhier while measuring (a bug: please report it)",
}
# Why a non-reference sequence is not registered (its series entry is rejected; the visit stays ok).
REGISTRATION_REASONS: dict[str, str] = {
    **{f"registration_{code}": text for code, text in REGISTER_REASONS.items()},
    "registration_implausible": "the transform found moves the anatomy further than one session's motion can "
                                "(medhier.plaque.study.MAX_ROTATION_DEG, MAX_SHIFT_MM): the optimiser went astray",
}


class VisitRejected(Exception):
    """A visit that cannot be measured: ``reason`` from :data:`REASONS`; ``segmentation_objects``:
    the entries for the report's JSON column, when the segmentation step got that far."""

    def __init__(self, reason: str, message: str, *, segmentation_objects: list[dict[str, Any]] | None = None):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message
        self.segmentation_objects = segmentation_objects or []


def _measurement_type(unit: str) -> pa.DataType:
    return pa.int64() if unit in ("count", "index") else pa.float64()


REPORT_SCHEMA = pa.schema(
    [
        (C.PATIENT_KEY, pa.string()), (C.STUDY_INSTANCE_UID, pa.string()), ("visit_date", pa.date32()), ("visit_time", pa.string()),
        (VISIT_KEY, pa.string()), ("objects", pa.int64()), ("reference_series_uid", pa.string()), ("segmentation", pa.string()),
        ("segmentation_format", pa.string()), ("series", pa.string()), ("segmentation_objects", pa.string()),
        *[(name, _measurement_type(unit)) for name, (unit, _) in MEASUREMENTS.items()],
        (C.STATUS, pa.string()), (C.ERROR_REASON, pa.string()), (C.ERROR_MESSAGE, pa.string()),
        (C.MODEL_ID, pa.string()), (C.MODEL_VERSION, pa.string()), (C.RUN_ID, pa.string()),
        (C.SCORED_AT, pa.timestamp("ms", tz="UTC")),
    ]
)


def visit_date(study_date: str) -> dt.date | None:
    """A DICOM DA (YYYYMMDD, or the old YYYY.MM.DD) -> a date; None when absent or malformed."""
    text = (study_date or "").strip().replace(".", "")
    try:
        return dt.datetime.strptime(text, "%Y%m%d").date() if len(text) == 8 else None
    except ValueError:
        return None


def measurement_values(values: dict[str, Any] | None) -> dict[str, Any]:
    """The MEASUREMENTS columns of a row: ``values`` with NaN as null (a missing value, e.g. no
    lipid core), or all null (error rows)."""
    out = {}
    for name in MEASUREMENTS:
        value = None if values is None else values[name]
        out[name] = None if value is None or (isinstance(value, float) and math.isnan(value)) else value
    return out


def to_json(value: Any) -> str:
    """The report's JSON columns: compact, NaN and infinity as null (JSON has neither)."""
    return json.dumps(_plain(value), separators=(",", ":"), allow_nan=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class VisitTally:
    """Counts over committed report rows, for the summary: visits by status, errors by reason,
    series by outcome and rejection reason, segmentation objects by outcome."""

    visits: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    series: dict[str, int] = field(default_factory=dict)
    series_rejected: dict[str, int] = field(default_factory=dict)
    instances_rejected: dict[str, int] = field(default_factory=dict)
    segmentation_objects: dict[str, int] = field(default_factory=dict)

    def __call__(self, table: pa.Table) -> None:
        for status, reason, series, segs in zip(
            table[C.STATUS].to_pylist(), table[C.ERROR_REASON].to_pylist(),
            table["series"].to_pylist(), table["segmentation_objects"].to_pylist(),
        ):
            self.visits += 1
            if status == C.STATUS_OK:
                self.ok += 1
            else:
                _add(self.errors, reason)
            for entry in json.loads(series or "[]"):
                _add(self.series, entry["outcome"])
                if entry["outcome"] == "rejected":
                    _add(self.series_rejected, entry["reason"])
                for instance_reason in entry.get("rejected_instances", {}).values():
                    _add(self.instances_rejected, instance_reason)
            for entry in json.loads(segs or "[]"):
                _add(self.segmentation_objects, entry["outcome"])


def _add(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def run_head_lines(run: str, archive: str, listed: int, excluded: int, in_no_study: dict[str, int]) -> list[str]:
    """The first lines of a plaque job's printed summary: the run (``run``: its id and what it
    ran with), the archive, its listing and the objects in no study by reason."""
    return [
        f"run              {run}",
        f"archive          {archive}",
        f"listed           {listed:,} objects ({excluded:,} excluded by data.exclude, {sum(in_no_study.values()):,} in no study)",
        *(f"  {reason:<22}{n:,}" for reason, n in sorted(in_no_study.items())),
    ]


def run_tail_lines(recovered_runs: list[str], seconds: float, rate: str, output: str) -> list[str]:
    """The last lines of a plaque job's printed summary: recovered commits, wall time (with
    ``rate``, e.g. "1.20 visits/s while measuring") and where the report is."""
    return ([f"recovered        ledger of interrupted commit(s): {', '.join(recovered_runs)}"] if recovered_runs else []) + [
        f"wall time        {seconds:,.1f} s  ({rate})",
        f"report           {storage.join(output, 'report')}",
    ]

