"""The patients' structured record (seed 003: sex, age, weight, smoking, drinking, blood pressure,
glucose, heart rate, medication): a CSV or Parquet table, one row per patient, read and typed by
``predict.covariates``.

Key column: ``patient_key`` (the pseudonymous key of :func:`medhier.io.dicom.patient_key`, as
``medhier plaque synth`` writes it), **or** ``patient_id`` with an optional
``issuer_of_patient_id``: the raw ID is hashed on read with the same salt as the DICOM headers
(``dicom.patient_salt`` / ``$MEDHIER_PATIENT_SALT``) and dropped at once, so it never reaches a
table, a log or an output. Every other column must be a configured covariate, and every
configured covariate must be present: a file that does not match fails before any work starts,
naming the column.

Values, by the covariate's ``type``:

* ``numeric``: a number (or its text); the unit is the one the config states (``unit``).
* ``categorical``: one of ``categories`` (case-sensitive text).
* ``boolean``: true/false, yes/no, 1/0 (any case), or a Parquet boolean.

An empty cell (CSV) or a null (Parquet) is a **missing value**: kept as null here; the
prediction model's trees route it down their learned default branch, the ridge baseline uses the
training median (numeric, boolean) or no category (categorical). Any other value that does not
fit its type is an error naming the column, the row and the value. Two rows for one patient are
an error (which record is right is for a person to say).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from medhier import columns as C
from medhier.config import CovariateSpec, StorageConfig
from medhier.io import storage
from medhier.io.dicom import patient_key

__all__ = ["ID_COLUMNS", "PatientsError", "covariate_schema", "read_patients"]

PATIENT_ID, ISSUER = "patient_id", "issuer_of_patient_id"
ID_COLUMNS = (C.PATIENT_KEY, PATIENT_ID, ISSUER)
_TRUE, _FALSE = ("true", "yes", "1", "t", "y"), ("false", "no", "0", "f", "n")


class PatientsError(ValueError):
    """The patients table does not match ``predict.covariates``; the message names the column."""


def covariate_schema(covariates: Mapping[str, CovariateSpec]) -> pa.Schema:
    """The typed table :func:`read_patients` returns: patient_key, then each covariate as
    float64 (numeric), string (categorical) or bool (boolean)."""
    types = {"numeric": pa.float64(), "categorical": pa.string(), "boolean": pa.bool_()}
    return pa.schema([(C.PATIENT_KEY, pa.string()), *((name, types[spec.type]) for name, spec in covariates.items())])


def read_patients(uri: str, covariates: Mapping[str, CovariateSpec], storage_cfg: StorageConfig, patient_salt: str = "") -> pa.Table:
    """The patients table at ``uri`` (``.csv`` or Parquet), keyed by patient_key, typed by
    ``covariates`` (:func:`covariate_schema`). Raises :class:`PatientsError` (module docstring)
    or FileNotFoundError."""
    uri = storage.normalize(uri)
    try:
        data = storage.read_bytes(uri, storage_cfg)
    except FileNotFoundError:
        raise FileNotFoundError(f"patients {uri!r} not found") from None
    names, rows = _csv(data, uri) if uri.lower().endswith(".csv") else _parquet(data, uri)
    keys = _keys(names, rows, uri, patient_salt)
    unknown = [n for n in names if n not in ID_COLUMNS and n not in covariates]
    if unknown:
        raise PatientsError(f"patients {uri}: column {unknown[0]!r} is not a covariate of predict.covariates "
                            f"({', '.join(covariates) or 'none'}); add it there with its type, or drop it from the file")
    missing = [n for n in covariates if n not in names]
    if missing:
        raise PatientsError(f"patients {uri}: no column {missing[0]!r}, a covariate of predict.covariates; "
                            f"the file has {', '.join(names)}")
    out: dict[str, list] = {C.PATIENT_KEY: keys}
    for name, spec in covariates.items():
        out[name] = [_value(row.get(name), spec, name, i, uri) for i, row in enumerate(rows, start=1)]
    seen: dict[str, int] = {}
    for i, key in enumerate(keys, start=1):
        if key in seen:
            raise PatientsError(f"patients {uri}: rows {seen[key]} and {i} are the same patient; keep one record per patient")
        seen[key] = i
    return pa.table(out, schema=covariate_schema(covariates))


def _csv(data: bytes, uri: str) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PatientsError(f"patients {uri}: not UTF-8 text ({exc})") from None
    reader = csv.DictReader(io.StringIO(text))
    names = [n.strip() for n in reader.fieldnames or []]
    if not names:
        raise PatientsError(f"patients {uri}: empty file (need a header row)")
    if len(set(names)) != len(names):
        raise PatientsError(f"patients {uri}: a column name appears twice in the header: {names}")
    rows = []
    for i, raw in enumerate(reader, start=1):
        if None in raw:
            raise PatientsError(f"patients {uri}: row {i} has more fields than the header")
        rows.append({k.strip(): (v.strip() if v is not None and v.strip() != "" else None) for k, v in raw.items()})
    return names, rows


def _parquet(data: bytes, uri: str) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowInvalid as exc:
        raise PatientsError(f"patients {uri}: neither a .csv file nor Parquet ({exc})") from None
    return table.column_names, table.to_pylist()


def _keys(names: list[str], rows: list[dict[str, Any]], uri: str, salt: str) -> list[str]:
    """Each row's patient_key; a raw patient_id is hashed here and removed from the row."""
    if (C.PATIENT_KEY in names) == (PATIENT_ID in names):
        raise PatientsError(f"patients {uri}: need exactly one key column, patient_key or patient_id (found "
                            f"{[n for n in names if n in ID_COLUMNS] or 'neither'})")
    if ISSUER in names and PATIENT_ID not in names:
        raise PatientsError(f"patients {uri}: {ISSUER} goes with patient_id, not patient_key")
    keys = []
    for i, row in enumerate(rows, start=1):
        if C.PATIENT_KEY in names:
            key = row.get(C.PATIENT_KEY)
        else:
            raw, issuer = row.pop(PATIENT_ID, None), row.pop(ISSUER, None)
            key = patient_key(str(raw), str(issuer or ""), salt) if raw not in (None, "") else None
        if not key:
            raise PatientsError(f"patients {uri}: row {i} has no {C.PATIENT_KEY if C.PATIENT_KEY in names else PATIENT_ID}")
        keys.append(str(key))
    return keys


def _value(value: Any, spec: CovariateSpec, name: str, row: int, uri: str) -> Any:
    if value is None:
        return None
    bad = f"patients {uri}: column {name!r} ({spec.type}"
    if spec.type == "numeric":
        if isinstance(value, bool):
            raise PatientsError(f"{bad}{', ' + spec.unit if spec.unit else ''}), row {row}: {value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise PatientsError(f"{bad}{', ' + spec.unit if spec.unit else ''}), row {row}: {value!r} is not a number") from None
    if spec.type == "boolean":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise PatientsError(f"{bad}), row {row}: {value!r} is not true/false, yes/no or 1/0")
    text = str(value)
    if text not in spec.categories:
        raise PatientsError(f"{bad}), row {row}: {text!r} is not one of its categories {spec.categories}")
    return text
