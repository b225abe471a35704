"""``medhier plaque fit``: visit measurements and the patients' records -> change factors -> the
prediction model, compared side by side with the mean predictor and ridge regression on the same
patient-level split, with split-conformal intervals.

    measurements ──change.change_factors──▶ pairs (rates per year)
    pairs + earlier visit + patients.csv ──features.examples──▶ one example per pair, split by patient
    train ──linear: mean, ridge──▶ baselines; base (ridge or mean) ──▶ residuals
    residuals ──boost: XGBoostTrainer (Ray Train)──▶ one booster per factor (early stopping on val)
    train errors ──boost──▶ scale boosters; val errors / scale ──intervals──▶ conformal quantiles
    test ──evaluation──▶ metrics.json, PNGs

Splits are by patient (:func:`medhier.data.splits.assign_split` with ``data.train_fraction``,
``data.val_fraction``, ``data.split_seed``): all of a patient's pairs land in one split, so the
test metrics are for patients the model never saw. The validation split stops the boosting and
calibrates the intervals; the test split is touched only for the metrics.

Output (OUTPUT, local or s3://): ``model/`` (:mod:`medhier.plaque.model`, for ``medhier plaque
predict --model OUTPUT/model``), ``metrics.json``, ``predicted_vs_true.png``,
``feature_importance.png``, ``config.yaml`` (the resolved config), ``change_factors.parquet``
(:mod:`medhier.plaque.change`), ``examples.parquet`` (every example's inputs, factors and
split) and ``train/`` (Ray Train's run folder).

``metrics.json``::

    {"coverage": 0.9, "splits": {"train": {"patients": n, "pairs": n}, "val": ..., "test": ...},
     "factors": {"<factor>": {"unit": "mm/y", "measurement": ..., "kind": ...,
                 "test": {"mean": {"mae", "rmse", "r2", "n"}, "ridge": {...}, "xgboost": {...}},
                 "val": {...the same...},
                 "interval": {"quantile": q, "scale_floor": f, "test_coverage": c, "n_test": n,
                              "test_mean_half_width": w (in the factor's unit)},
                 "rounds": boosting rounds kept, "learnable": bool, "best": "xgboost" | "ridge" | "mean"}},
     "interval_coverage": {"stated": 0.9, "test": share of every (pair, factor) covered, "n": n},
     "change": ChangeSummary, "pairs_without_record": n, "model_id": ...}
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from medhier import columns as C
from medhier.config import Config
from medhier.data.splits import assign_split
from medhier.io import storage
from medhier.plaque.boost import TARGET, booster_from_bytes, train_boosters, xgboost_params
from medhier.plaque.change import ChangeSummary, change_factors, factor_unit, read_measurements
from medhier.plaque.evaluation import LEARNABLE_R2, errors, importance_png, predicted_vs_true_png
from medhier.plaque.features import FeatureSpace, examples
from medhier.plaque.intervals import SCALE_FLOOR, conformal_quantile, covered, local_scale
from medhier.plaque.linear import LinearModel, fit_mean, fit_ridge
from medhier.plaque.model import Prediction, PredictionModel
from medhier.plaque.patients import read_patients

__all__ = ["Design", "FitSummary", "design", "fit_examples", "fit_model", "prepare_examples"]

MODELS = ("mean", "ridge", "xgboost")
MIN_TRAIN_PAIRS = 10  # per factor: fewer is no model


@dataclass
class Prepared:
    """The examples of a fit (with their ``split`` column) and how they were made."""

    examples: pa.Table
    pairs: pa.Table
    change: ChangeSummary
    without_record: int


def prepare_examples(cfg: Config, measurements: str, patients: str) -> Prepared:
    """Read the inputs, compute the change factors and build the examples, split by patient.
    Raises ValueError (PatientsError) naming a bad input before anything trains."""
    p = cfg.predict
    records = read_patients(patients, p.covariates, cfg.storage, cfg.dicom.patient_salt)
    visits = read_measurements(measurements, cfg.storage)
    pairs, change = change_factors(visits, p.factors)
    if not pairs.num_rows:
        raise ValueError(f"measurements {measurements!r}: no patient has two usable visits on different dates "
                         f"({change.visits} visit rows, {change.visits_used} usable, {change.patients} patients)")
    space = FeatureSpace.from_config(p.features, p.covariates)
    table, without = examples(pairs, visits, records, space, p.factors)
    if not table.num_rows:
        raise ValueError(f"patients {patients!r}: none of the {change.patients} measured patients has a record there; "
                         f"are both keyed with the same salt (dicom.patient_salt / $MEDHIER_PATIENT_SALT)?")
    split = [assign_split(k, cfg.data.split_seed, cfg.data.train_fraction, cfg.data.val_fraction) for k in table[C.PATIENT_KEY].to_pylist()]
    return Prepared(table.append_column(C.SPLIT, pa.array(split, pa.string())), pairs, change, without)


@dataclass
class Design:
    """The examples as arrays: inputs (rows, features), each factor's values (rows,) with NaN
    where undefined, the split masks, and per factor the fitted baselines and the residual
    targets of the trees."""

    space: FeatureSpace
    x: np.ndarray
    y: dict[str, np.ndarray]
    split: np.ndarray
    baselines: dict[str, dict[str, LinearModel]]  # factor -> {"mean": ..., "ridge": ...}

    def mask(self, factor: str, split: str) -> np.ndarray:
        return (self.split == split) & ~np.isnan(self.y[factor])

    def base(self, cfg: Config, factor: str) -> LinearModel:
        return self.baselines[factor][cfg.predict.base]

    def boost_tables(self, cfg: Config) -> tuple[pa.Table, pa.Table, dict[str, float]]:
        """(train, val) tables for :func:`medhier.plaque.boost.train_boosters` and each factor's
        validation standard deviation."""
        names = self.space.names
        tables, sd = [], {}
        for split in ("train", "val"):
            rows = self.split == split
            columns = {n: self.x[rows, i] for i, n in enumerate(names)}
            for factor, y in self.y.items():
                columns[TARGET + factor] = (y - self.base(cfg, factor).predict(self.x))[rows]
            tables.append(pa.table(columns))
        for factor in self.y:
            values = self.y[factor][self.mask(factor, "val")]
            sd[factor] = float(np.std(values)) if len(values) > 1 else math.nan
        return tables[0], tables[1], sd


def design(cfg: Config, table: pa.Table) -> Design:
    """Arrays of ``table`` (examples with a split) and the baselines fitted on its train split.
    ValueError when a factor has too few training or validation pairs."""
    p = cfg.predict
    space = FeatureSpace.from_config(p.features, p.covariates)
    x = space.matrix(table)
    split = np.asarray(table[C.SPLIT].to_pylist(), dtype=object)
    y = {f: pc.fill_null(table[f], math.nan).to_numpy().astype(np.float64) for f in p.factors}
    out = Design(space, x, y, split, {})
    for factor in p.factors:
        train, val = out.mask(factor, "train"), out.mask(factor, "val")
        if train.sum() < MIN_TRAIN_PAIRS or val.sum() < 2:
            raise ValueError(f"predict.factors.{factor}: {int(train.sum())} training and {int(val.sum())} validation pairs; "
                             f"need at least {MIN_TRAIN_PAIRS} and 2 (more patients, or other data.*_fraction)")
        out.baselines[factor] = {"mean": fit_mean(x[train], y[factor][train]),
                                 "ridge": fit_ridge(x[train], y[factor][train], p.ridge_alpha)}
    return out


@dataclass
class FitSummary:
    """What a fit made: the model and its metrics (as in metrics.json)."""

    output: str
    model: str
    model_id: str
    metrics: dict[str, Any]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        m = self.metrics
        splits = ", ".join(f"{s} {v['patients']} patients / {v['pairs']} pairs" for s, v in m["splits"].items())
        lines = [f"model            {self.model}  (model_id {self.model_id})", f"splits           {splits}",
                 f"{'factor':<36}{'unit':>7}{'n':>6}{'R² mean':>9}{'ridge':>8}{'xgboost':>9}{'RMSE xgb':>10}{'cover':>7}"]
        for name, f in m["factors"].items():
            t = f["test"]
            lines.append(f"{name:<36}{f['unit']:>7}{t['xgboost']['n']:>6}{_f(t['mean']['r2']):>9}{_f(t['ridge']['r2']):>8}"
                         f"{_f(t['xgboost']['r2']):>9}{_f(t['xgboost']['rmse']):>10}{_f(f['interval']['test_coverage']):>7}")
        ic = m["interval_coverage"]
        lines.append(f"intervals        stated {ic['stated']:.0%}, held-out coverage {_f(ic['test'])} over {ic['n']} predictions")
        lines += [f"note             {n}" for n in self.notes]
        lines.append(f"wall time        {self.seconds:,.1f} s; metrics, plots and config in {self.output}")
        return "\n".join(lines)


def _f(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def fit_model(cfg: Config, measurements: str, patients: str, output: str, callbacks: tuple = ()) -> FitSummary:
    """Fit the prediction model (module docstring) into ``output``. Needs Ray initialised."""
    start = time.perf_counter()
    output = storage.normalize(output)
    prepared = prepare_examples(cfg, measurements, patients)
    storage.write_text(storage.join(output, "config.yaml"), cfg.to_yaml(), cfg.storage)
    _write_parquet(storage.join(output, "change_factors.parquet"), prepared.pairs, cfg)
    _write_parquet(storage.join(output, "examples.parquet"), prepared.examples, cfg)
    summary = fit_examples(cfg, prepared.examples, output, callbacks=callbacks,
                           extra={"change": dataclasses.asdict(prepared.change), "pairs_without_record": prepared.without_record})
    summary.seconds = time.perf_counter() - start
    return summary


def fit_examples(cfg: Config, table: pa.Table, output: str, callbacks: tuple = (), extra: dict | None = None) -> FitSummary:
    """Fit on examples that carry their split; write model/, metrics.json and the plots."""
    p = cfg.predict
    d = design(cfg, table)
    train, val, val_sd = d.boost_tables(cfg)
    boosted = train_boosters(cfg, train, val, d.space.names, list(p.factors), val_sd, output, callbacks=callbacks)
    facts = {"splits": _split_sizes(table), "examples": table.num_rows}
    model = PredictionModel(dict(p.factors), d.space, p.base, {f: d.base(cfg, f) for f in p.factors}, boosted.boosters,
                            boosted.scales, boosted.rounds, {}, {}, p.coverage, xgboost_params(cfg), facts)
    quantile, floor = {}, {}
    for f in p.factors:  # the intervals (medhier.plaque.intervals): scale floor from training, quantile from validation
        point = model.point(f, d.x)
        train, val = d.mask(f, "train"), d.mask(f, "val")
        floor[f] = SCALE_FLOOR * float(np.mean(np.abs(d.y[f][train] - point[train])))
        scale = local_scale(model.raw_scale(f, d.x[val]), floor[f])
        quantile[f] = conformal_quantile(np.abs(d.y[f][val] - point[val]) / scale, p.coverage)
    model = dataclasses.replace(model, quantile=quantile, scale_floor=floor, model_id="")
    model_uri = storage.join(output, "model")
    model.save(model_uri, cfg.storage)
    predictions = model.predict_matrix(d.x)
    metrics, notes = _metrics(cfg, d, predictions, boosted.rounds, facts["splits"], quantile, floor)
    metrics.update(extra or {})
    metrics["model_id"] = model.model_id
    storage.write_text(storage.join(output, "metrics.json"), json.dumps(metrics, indent=2, allow_nan=True), cfg.storage)
    _plots(cfg, d, predictions, model, output)
    return FitSummary(output, model_uri, model.model_id, metrics, notes=notes)


def _metrics(cfg: Config, d: Design, predictions: dict[str, Prediction], rounds: dict[str, int], splits: dict[str, dict[str, int]],
             quantile: dict[str, float], floor: dict[str, float]) -> tuple[dict[str, Any], list[str]]:
    p = cfg.predict
    out: dict[str, Any] = {"coverage": p.coverage, "base": p.base, "splits": splits, "factors": {}}
    hits, notes = [], []
    for factor, spec in p.factors.items():
        pred = predictions[factor]
        entry: dict[str, Any] = {"unit": factor_unit(spec), "measurement": spec.measurement, "kind": spec.kind, "rounds": rounds[factor]}
        for split in ("val", "test"):
            rows = d.mask(factor, split)
            y = d.y[factor][rows]
            entry[split] = {"mean": errors(y, d.baselines[factor]["mean"].predict(d.x[rows])),
                            "ridge": errors(y, d.baselines[factor]["ridge"].predict(d.x[rows])),
                            "xgboost": errors(y, pred.value[rows])}
        rows = d.mask(factor, "test")
        inside = covered(d.y[factor][rows], pred.lower[rows], pred.upper[rows])
        hits.append(inside)
        half = (pred.upper[rows] - pred.lower[rows]) / 2
        entry["interval"] = {"quantile": quantile[factor], "scale_floor": floor[factor],
                             "test_coverage": float(inside.mean()) if len(inside) else math.nan, "n_test": int(len(inside)),
                             "test_mean_half_width": float(half.mean()) if len(half) else math.nan}
        r2 = {m: entry["test"][m]["r2"] for m in MODELS}
        finite = {m: v for m, v in r2.items() if not math.isnan(v)}
        entry["best"] = max(finite, key=finite.get) if finite else None
        entry["learnable"] = bool(finite) and max(finite.values()) >= LEARNABLE_R2
        out["factors"][factor] = entry
    every = np.concatenate(hits) if hits else np.array([])
    out["interval_coverage"] = {"stated": p.coverage, "test": float(every.mean()) if len(every) else math.nan, "n": int(len(every))}
    if not every.size:
        notes.append("no test pairs: raise the number of patients or lower data.train_fraction + data.val_fraction")
    return out, notes


def _split_sizes(table: pa.Table) -> dict[str, dict[str, int]]:
    sizes = {}
    for split in ("train", "val", "test"):
        rows = table.filter(pc.equal(table[C.SPLIT], split))
        sizes[split] = {"patients": len(set(rows[C.PATIENT_KEY].to_pylist())), "pairs": rows.num_rows}
    return sizes


def _plots(cfg: Config, d: Design, predictions: dict[str, Prediction], model: PredictionModel, output: str) -> None:
    truth, points, halves, gains = {}, {}, {}, {}
    for factor in cfg.predict.factors:
        rows = d.mask(factor, "test")
        if not rows.any():  # too few patients for a test split: plot validation instead
            rows = d.mask(factor, "val")
        pred = predictions[factor]
        truth[factor] = d.y[factor][rows]
        points[factor] = {"mean": d.baselines[factor]["mean"].predict(d.x[rows]),
                          "ridge": d.baselines[factor]["ridge"].predict(d.x[rows]), "xgboost": pred.value[rows]}
        halves[factor] = (pred.upper[rows] - pred.lower[rows]) / 2
        gains[factor] = booster_from_bytes(model.boosters[factor]).get_score(importance_type="total_gain")
    png = predicted_vs_true_png(truth, points, halves, model.units(), cfg.predict.coverage)
    storage.write_bytes(storage.join(output, "predicted_vs_true.png"), png, cfg.storage)
    storage.write_bytes(storage.join(output, "feature_importance.png"), importance_png(gains), cfg.storage)


def _write_parquet(uri: str, table: pa.Table, cfg: Config) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(uri, buf.getvalue(), cfg.storage)
