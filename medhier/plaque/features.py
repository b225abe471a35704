"""The prediction model's inputs: the earlier visit's measurements and the patient's record, as
one numeric matrix; and the training examples (one per visit pair) that pair them with the
change factors.

Leakage: an example's inputs come from the pair's **earlier** visit alone — the visit table is
joined on ``from_study_instance_uid`` and nothing else — and from the patient's record, which
does not change between visits. The later visit enters only through the targets (its change
from the earlier one). ``tests/plaque/test_features.py`` changes every later visit's
measurements and checks that no input moves.

Columns of the matrix (:attr:`FeatureSpace.names`, in order): each ``predict.features``
measurement (its unit in :data:`medhier.plaque.measure.MEASUREMENTS`); each numeric covariate
(its unit in ``predict.covariates``); each boolean covariate as 0/1; each categorical covariate
one-hot, one column ``<name>=<category>`` per category. A missing value is NaN (a missing
category: NaN in all its columns), which XGBoost treats as missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medhier import columns as C
from medhier.config import CovariateSpec, FactorSpec
from medhier.plaque.change import FROM_STUDY

__all__ = ["FeatureSpace", "examples"]


@dataclass(frozen=True)
class FeatureSpace:
    """How a table of measurements and covariates becomes the model's matrix (module docstring).
    Saved with the model, so prediction encodes exactly as training did."""

    measurements: tuple[str, ...]
    covariates: tuple[tuple[str, str, str, tuple[str, ...]], ...]  # (name, type, unit, categories)

    @classmethod
    def from_config(cls, features: list[str], covariates: Mapping[str, CovariateSpec]) -> FeatureSpace:
        return cls(tuple(features), tuple((n, s.type, s.unit, tuple(s.categories)) for n, s in covariates.items()))

    @property
    def covariate_specs(self) -> dict[str, CovariateSpec]:
        return {n: CovariateSpec(t, u, list(c)) for n, t, u, c in self.covariates}  # type: ignore[arg-type]

    @property
    def names(self) -> list[str]:
        """The matrix's column names."""
        out = list(self.measurements)
        for name, kind, _, categories in self.covariates:
            out += [f"{name}={c}" for c in categories] if kind == "categorical" else [name]
        return out

    @property
    def columns(self) -> list[str]:
        """The table columns :meth:`matrix` reads."""
        return [*self.measurements, *(name for name, *_ in self.covariates)]

    def matrix(self, table: pa.Table) -> np.ndarray:
        """(rows, len(names)) float64 of ``table``'s measurement and covariate columns; NaN
        where a value is missing. A column the space needs and the table lacks is a ValueError."""
        missing = [c for c in self.columns if c not in table.column_names]
        if missing:
            raise ValueError(f"features: the table lacks {missing}")
        parts = [_floats(table[name])[:, None] for name in self.measurements]
        for name, kind, _, categories in self.covariates:
            column = table[name]
            if kind == "categorical":
                values = column.to_pylist()
                onehot = np.array([[np.nan] * len(categories) if v is None else [float(v == c) for c in categories] for v in values])
                parts.append(onehot.reshape(len(values), len(categories)))
            else:
                parts.append(_floats(column)[:, None])
        return np.hstack(parts) if parts else np.zeros((table.num_rows, 0))

    def to_dict(self) -> dict:
        return {"measurements": list(self.measurements),
                "covariates": [{"name": n, "type": t, "unit": u, "categories": list(c)} for n, t, u, c in self.covariates]}

    @classmethod
    def from_dict(cls, data: dict) -> FeatureSpace:
        return cls(tuple(data["measurements"]),
                   tuple((c["name"], c["type"], c["unit"], tuple(c["categories"])) for c in data["covariates"]))


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    """A numeric or boolean column as float64 with NaN for null."""
    if pa.types.is_boolean(column.type):
        column = pc.cast(column, pa.float64())
    return column.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


def examples(pairs: pa.Table, visits: pa.Table, patients: pa.Table, space: FeatureSpace,
             factors: Mapping[str, FactorSpec]) -> tuple[pa.Table, int]:
    """One row per pair whose patient has a record: patient_key, pair, from_study_instance_uid,
    the earlier visit's measurements (``space.measurements``), the covariates, the factors.
    -> (examples, pairs left out because their patient is not in ``patients``)."""
    if C.STATUS in visits.column_names:  # as change_factors: only ok rows have measurements
        visits = visits.filter(pc.fill_null(pc.equal(visits[C.STATUS], C.STATUS_OK), False))
    earlier = visits.select([C.STUDY_INSTANCE_UID, *space.measurements]).rename_columns([FROM_STUDY, *space.measurements])
    # One row per study: the report can hold a study twice (re-measured); change_factors used the latest.
    earlier = _one_per_study(visits, earlier)
    joined = pairs.select([C.PATIENT_KEY, "pair", FROM_STUDY, *factors]).join(earlier, keys=FROM_STUDY, join_type="left outer")
    covariates = [name for name, *_ in space.covariates]
    with_record = joined.join(patients.select([C.PATIENT_KEY, *covariates]), keys=C.PATIENT_KEY, join_type="inner")
    order = [C.PATIENT_KEY, "pair", FROM_STUDY, *space.measurements, *covariates, *factors]
    table = with_record.select(order).sort_by([(C.PATIENT_KEY, "ascending"), ("pair", "ascending")])
    return table, pairs.num_rows - table.num_rows


def _one_per_study(visits: pa.Table, earlier: pa.Table) -> pa.Table:
    """``earlier`` with only each study's latest row (by scored_at when the table has it)."""
    uids = visits[C.STUDY_INSTANCE_UID].to_pylist()
    if len(set(uids)) == len(uids):
        return earlier
    if C.SCORED_AT not in visits.column_names:
        raise ValueError("measurements: a study has two rows and no scored_at to tell which is current")
    stamps = visits[C.SCORED_AT].to_pylist()
    best: dict[str, int] = {}
    for i, (uid, stamp) in enumerate(zip(uids, stamps)):
        if uid not in best or stamp > stamps[best[uid]]:
            best[uid] = i
    return earlier.take(sorted(best.values()))
