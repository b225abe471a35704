"""Change factors: a patient's consecutive visits -> rates of change per year, from the
measurements of :mod:`medhier.plaque.measure` and the time between the visits.

:func:`change_factors` takes one row per visit (the measure job's report, or any table with its
columns: ``patient_key``, ``study_instance_uid``, ``visit_date``, optionally ``visit_time``,
``status`` and ``scored_at``, and the measurement columns the factors name) and the factors of
``predict.factors``; it returns one row per pair of consecutive usable visits of a patient.

Rules
-----
* **Usable visits**: ``status`` ok (an error row has no measurements) and a ``visit_date``.
  Visits are ordered by date, then ``visit_time``, then StudyInstanceUID. A study measured more
  than once (its objects changed, so the ledger holds two rows) counts once: its latest row
  (``scored_at``).
* **Pairs**: visit k and visit k+1 of the same patient, for every k. Two visits on the same date
  make no pair (no time passed: a rate would divide by zero); they are counted as
  ``same_day_pairs``. A patient with fewer than two usable visits makes no pair.
* **Time**: ``years`` = days between the visits' dates / 365.25.
* **Absolute rate** (``kind: absolute``): (m2 - m1) / years, in the measurement's unit per year
  (mm/y, pp/y for percentages, mm3/y).
* **Relative rate** (``kind: relative``, volumes only): 100 * (m2 - m1) / m1 / years, in % of
  the earlier visit's volume per year. **When m1 is 0** (no lipid core, no haemorrhage at the
  earlier visit) the relative rate is undefined and null: growth from nothing has no relative
  size, and the absolute rate of the same volume carries it. Counted per factor in
  ``ChangeSummary.undefined``.
* A null measurement at either visit (e.g. ``min_cap_thickness_mm`` without a lipid core) makes
  that factor null for the pair; the pair's other factors stand.

Columns of the result (``change_factors.parquet`` of ``medhier plaque fit``)
-----------------------------------------------------------------------------
=========================  ========  ==========================================================
column                     type      meaning
=========================  ========  ==========================================================
patient_key                string    the patient
pair                       int32     1 for visits 1 -> 2, 2 for 2 -> 3, ... (usable visits)
from_study_instance_uid    string    the earlier visit (the model's inputs come from it alone)
to_study_instance_uid      string    the later visit
from_date, to_date         date32    their dates
years                      float64   time between them
<factor>                   float64   each ``predict.factors`` rate (unit: :func:`factor_unit`)
=========================  ========  ==========================================================
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from medhier import columns as C
from medhier.config import FactorSpec, StorageConfig
from medhier.io import storage
from medhier.plaque.measure import MEASUREMENTS

__all__ = ["DAYS_PER_YEAR", "PAIR_COLUMNS", "ChangeSummary", "change_factors", "factor_unit", "read_measurements"]

DAYS_PER_YEAR = 365.25
VISIT_DATE, VISIT_TIME = "visit_date", "visit_time"
FROM_STUDY, TO_STUDY = "from_study_instance_uid", "to_study_instance_uid"
PAIR_COLUMNS = (C.PATIENT_KEY, "pair", FROM_STUDY, TO_STUDY, "from_date", "to_date", "years")


def factor_unit(spec: FactorSpec) -> str:
    """A factor's unit: the measurement's unit per year, or % per year for a relative rate."""
    if spec.kind == "relative":
        return "%/y"
    unit = MEASUREMENTS[spec.measurement][0]
    return "pp/y" if unit == "%" else f"{unit}/y"


@dataclass
class ChangeSummary:
    """What :func:`change_factors` did with its visits."""

    visits: int = 0
    visits_used: int = 0
    excluded: dict[str, int] = field(default_factory=dict)  # visits left out, by reason: status_error, undated, remeasured
    patients: int = 0
    patients_one_visit: int = 0  # fewer than two usable visits: no pair
    pairs: int = 0
    same_day_pairs: int = 0
    undefined: dict[str, int] = field(default_factory=dict)  # pairs where a factor is null, by factor


def read_measurements(uri: str, storage_cfg: StorageConfig) -> pa.Table:
    """The visit rows at ``uri``: a ``medhier plaque measure`` output (its committed
    ``report/``), or a Parquet file or folder with the report's columns. A report holding rows
    of several segmentation sources or measurement versions is refused (their measurements
    differ): measure each into its own output."""
    uri = storage.normalize(uri)
    report = storage.join(uri, "report")
    if storage.exists(report, storage_cfg):
        fs, path = storage.filesystem(report, storage_cfg)
        table = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()
        if C.MODEL_ID in table.column_names:
            sources = sorted(set(zip(table[C.MODEL_ID].to_pylist(), table[C.MODEL_VERSION].to_pylist())))
            if len(sources) > 1:
                named = "; ".join(f"{m} {v}" for m, v in sources)
                raise ValueError(f"measurements {uri!r}: the report holds visits of {len(sources)} segmentation sources or "
                                 f"measurement versions ({named}); measure each into its own output")
        return table
    if not storage.exists(uri, storage_cfg):
        raise FileNotFoundError(f"measurements {uri!r} not found")
    fs, path = storage.filesystem(uri, storage_cfg)
    if fs.get_file_info(path).type == storage.pafs.FileType.File:
        with fs.open_input_file(path) as f:
            return pq.read_table(f)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table()


def change_factors(visits: pa.Table, factors: Mapping[str, FactorSpec]) -> tuple[pa.Table, ChangeSummary]:
    """One row per pair of consecutive usable visits with each factor's rate per year (rules
    and columns in the module docstring) and what was left out."""
    measurements = sorted({spec.measurement for spec in factors.values()})
    _require(visits, (C.PATIENT_KEY, C.STUDY_INSTANCE_UID, VISIT_DATE, *measurements))
    summary = ChangeSummary(visits=visits.num_rows)
    rows = _usable(visits, measurements, summary)
    by_patient: dict[str, list[dict]] = {}
    for row in rows:
        by_patient.setdefault(row[C.PATIENT_KEY], []).append(row)
    out: dict[str, list] = {name: [] for name in (*PAIR_COLUMNS, *factors)}
    summary.patients = len(by_patient)
    for patient in sorted(by_patient):
        ordered = sorted(by_patient[patient], key=lambda r: (r[VISIT_DATE], r.get(VISIT_TIME) or "", r[C.STUDY_INSTANCE_UID]))
        if len(ordered) < 2:
            summary.patients_one_visit += 1
            continue
        pair = 0
        for first, second in zip(ordered, ordered[1:]):
            days = (second[VISIT_DATE] - first[VISIT_DATE]).days
            if days <= 0:
                summary.same_day_pairs += 1
                continue
            pair += 1
            years = days / DAYS_PER_YEAR
            for name, value in zip(PAIR_COLUMNS, (patient, pair, first[C.STUDY_INSTANCE_UID], second[C.STUDY_INSTANCE_UID],
                                                  first[VISIT_DATE], second[VISIT_DATE], years)):
                out[name].append(value)
            for name, spec in factors.items():
                rate = _rate(first[spec.measurement], second[spec.measurement], years, spec.kind)
                out[name].append(rate)
                if rate is None:
                    summary.undefined[name] = summary.undefined.get(name, 0) + 1
    summary.pairs = len(out[C.PATIENT_KEY])
    schema = pa.schema([
        (C.PATIENT_KEY, pa.string()), ("pair", pa.int32()), (FROM_STUDY, pa.string()), (TO_STUDY, pa.string()),
        ("from_date", pa.date32()), ("to_date", pa.date32()), ("years", pa.float64()),
        *((name, pa.float64()) for name in factors),
    ])
    return pa.table(out, schema=schema), summary


def _rate(m1: float | None, m2: float | None, years: float, kind: str) -> float | None:
    if m1 is None or m2 is None or not (np.isfinite(m1) and np.isfinite(m2)):
        return None
    if kind == "absolute":
        return (m2 - m1) / years
    if m1 == 0:
        return None  # growth from nothing has no relative rate (module docstring)
    return 100.0 * (m2 - m1) / m1 / years


def _require(table: pa.Table, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"measurements: missing column(s) {missing}; a visit row needs patient_key, study_instance_uid, "
                         f"visit_date and the measurements the factors name (the measure job's report has them all)")


def _usable(visits: pa.Table, measurements: list[str], summary: ChangeSummary) -> list[dict]:
    """The ok, dated visit rows (latest row per study) as dicts with dates as datetime.date."""
    excluded: Counter = Counter()
    if C.STATUS in visits.column_names:
        ok = pc.fill_null(pc.equal(visits[C.STATUS], C.STATUS_OK), False)
        excluded["status_error"] = visits.num_rows - int(pc.sum(ok).as_py() or 0)
        visits = visits.filter(ok)
    dates = _dates(visits[VISIT_DATE])
    excluded["undated"] = dates.null_count
    keep = [c for c in (C.PATIENT_KEY, C.STUDY_INSTANCE_UID, VISIT_TIME, C.SCORED_AT, *measurements) if c in visits.column_names]
    rows = visits.select(keep).append_column(f"_{VISIT_DATE}", dates).to_pylist()
    latest: dict[str, dict] = {}
    for row in rows:
        row[VISIT_DATE] = row.pop(f"_{VISIT_DATE}")
        if row[VISIT_DATE] is None:
            continue
        uid = row[C.STUDY_INSTANCE_UID]
        if uid in latest:
            if C.SCORED_AT not in row:
                raise ValueError(f"measurements: study {uid} has two rows and no scored_at to tell which is current")
            excluded["remeasured"] += 1
            if row[C.SCORED_AT] <= latest[uid][C.SCORED_AT]:
                continue
        latest[uid] = row
    summary.excluded = {k: v for k, v in sorted(excluded.items()) if v}
    summary.visits_used = len(latest)
    return list(latest.values())


def _dates(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A date column as date32: dates, timestamps, or ISO / DICOM (YYYYMMDD) strings."""
    if pa.types.is_date(column.type):
        return column.cast(pa.date32())
    if pa.types.is_timestamp(column.type):
        return pc.cast(column, pa.date32())
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        values = []
        for text in column.to_pylist():
            values.append(_parse_date(text))
        return pa.chunked_array([pa.array(values, pa.date32())])
    raise ValueError(f"measurements: {VISIT_DATE} must be a date, a timestamp or a YYYY-MM-DD string, got {column.type}")


def _parse_date(text: str | None) -> dt.date | None:
    if not text:
        return None
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return dt.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise ValueError(f"measurements: {VISIT_DATE} {text!r} is neither YYYY-MM-DD nor YYYYMMDD")
