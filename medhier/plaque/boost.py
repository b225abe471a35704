"""Gradient-boosted trees on Ray Train: one XGBoost booster per change factor, trained by
``ray.train.xgboost.XGBoostTrainer`` (data-parallel over ``predict.num_workers`` workers).

Each worker gets its share of the training rows and the whole validation split
(``DataConfig(datasets_to_split=["train"])``), and trains the factors' boosters one after the
other in one worker group (one start-up for all factors). With several workers XGBoost's
collective (set up by the trainer's backend) all-reduces the histograms, so every worker grows
the same trees; early stopping watches the validation RMSE (``predict.early_stopping_rounds``)
and the booster is cut at its best round. A second booster per factor learns the first one's
absolute error (the local scale of the prediction intervals, :mod:`medhier.plaque.intervals`).
Rank 0 returns the boosters (XGBoost's UBJSON) and
every worker reports the validation metrics, which reach Ray Tune when a search runs this.

The targets are residuals: the factor's value minus the base model's prediction
(``predict.base``: the ridge or the training mean, :mod:`medhier.plaque.linear`), so the trees
learn what the base misses; the prediction is base + trees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray.train
import xgboost
from ray.train.xgboost import XGBoostTrainer

from medhier.config import Config
from medhier.data.tabular import table_dataset
from medhier.io import storage
from medhier.runtime import verbose

__all__ = ["BoostResult", "booster_from_bytes", "train_boosters", "xgboost_params"]

TARGET = "target:"  # the residual target columns of the tables handed to the trainer


@dataclass
class BoostResult:
    """Boosters by factor (UBJSON bytes), their error-scale boosters, the rounds each point
    booster kept, and the validation metrics the workers reported (``val_rmse:<factor>``, ``val_r2:<factor>``, ``val_r2_mean``)."""

    boosters: dict[str, bytes]
    scales: dict[str, bytes]
    rounds: dict[str, int]
    metrics: dict[str, float]


def xgboost_params(cfg: Config) -> dict[str, Any]:
    """The booster parameters of ``predict``: squared error on residuals (base score 0)."""
    p = cfg.predict
    return {
        "objective": "reg:squarederror", "tree_method": "hist", "eval_metric": "rmse", "base_score": 0.0,
        "max_depth": p.max_depth, "learning_rate": p.learning_rate, "min_child_weight": p.min_child_weight,
        "subsample": p.subsample, "colsample_bytree": p.colsample_bytree, "reg_lambda": p.reg_lambda,
        "seed": p.seed, "nthread": max(1, int(p.cpus_per_worker)),
    }


def booster_from_bytes(data: bytes) -> xgboost.Booster:
    booster = xgboost.Booster()
    booster.load_model(bytearray(data))
    return booster


def train_boosters(cfg: Config, train: pa.Table, val: pa.Table, features: list[str], factors: list[str],
                   val_sd: dict[str, float], output: str, callbacks: tuple = ()) -> BoostResult:
    """Train one booster per factor on ``train`` (columns: ``features`` as float64 with NaN for
    missing, ``target:<factor>`` residuals with NaN where the factor is undefined), stopping on
    ``val``. ``val_sd``: each factor's standard deviation on the validation split (R² = 1 -
    RMSE² / sd²). Ray Train's run folder goes under ``output``/train. Needs Ray initialised."""
    p = cfg.predict
    fs, root = storage.filesystem(output, cfg.storage)
    trainer = XGBoostTrainer(
        _train_per_worker,
        train_loop_config={"params": xgboost_params(cfg), "features": features, "factors": factors, "val_sd": val_sd,
                           "rounds": p.num_boost_round, "early_stopping": p.early_stopping_rounds},
        scaling_config=ray.train.ScalingConfig(num_workers=p.num_workers, resources_per_worker={"CPU": p.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name="train", storage_path=root, storage_filesystem=fs, callbacks=list(callbacks),
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
        datasets={"train": table_dataset(train, blocks=p.num_workers), "val": table_dataset(val)},
        # Validation is not split: every worker stops on the same, whole validation split.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    out = result.return_value
    if not out:
        raise RuntimeError(f"XGBoost training returned nothing; see {result.path}")
    return BoostResult(out["boosters"], out["scales"], out["rounds"], dict(result.metrics or {}))


def _shard(name: str) -> pa.Table:
    batches = list(ray.train.get_dataset_shard(name).iter_batches(batch_format="pyarrow", batch_size=None))
    return pa.concat_tables(batches) if batches else pa.table({})


def _train_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """One worker: every factor's booster in turn; rank 0 returns them."""
    train, val = _shard("train"), _shard("val")
    features, params = config["features"], config["params"]
    x_train, x_val = _matrix(train, features), _matrix(val, features)
    boosters, scales, rounds, metrics, r2 = {}, {}, {}, {}, []
    for factor in config["factors"]:
        y_train, y_val = _column(train, TARGET + factor), _column(val, TARGET + factor)
        keep_t, keep_v = ~np.isnan(y_train), ~np.isnan(y_val)
        dtrain = xgboost.DMatrix(x_train[keep_t], label=y_train[keep_t], feature_names=features)
        dval = xgboost.DMatrix(x_val[keep_v], label=y_val[keep_v], feature_names=features)
        history: dict = {}
        booster = xgboost.train(
            params, dtrain, num_boost_round=config["rounds"], evals=[(dval, "val")], evals_result=history,
            early_stopping_rounds=config["early_stopping"] or None, verbose_eval=False,
        )
        kept = booster.best_iteration + 1 if config["early_stopping"] else booster.num_boosted_rounds()
        booster = booster[:kept]
        rmse = float(history["val"]["rmse"][kept - 1])
        scale = _scale_booster(params, config, dtrain, dval, booster)
        sd = config["val_sd"][factor]
        metrics[f"val_rmse:{factor}"] = rmse
        metrics[f"val_r2:{factor}"] = 1.0 - rmse**2 / sd**2 if sd > 0 else math.nan
        r2.append(metrics[f"val_r2:{factor}"])
        boosters[factor], rounds[factor] = bytes(booster.save_raw("ubj")), kept
        scales[factor] = bytes(scale.save_raw("ubj"))
    metrics["val_r2_mean"] = float(np.nanmean(r2)) if r2 else math.nan
    ray.train.report(metrics)
    if ray.train.get_context().get_world_rank() == 0:
        return {"boosters": boosters, "scales": scales, "rounds": rounds}
    return None


def _scale_booster(params: dict[str, Any], config: dict[str, Any], dtrain: xgboost.DMatrix, dval: xgboost.DMatrix,
                   booster: xgboost.Booster) -> xgboost.Booster:
    """A booster of the point booster's absolute error (its expected size for an input), for
    the intervals' local scale (:mod:`medhier.plaque.intervals`); early stopping on the
    validation split's absolute errors."""
    for data in (dtrain, dval):
        data.set_label(np.abs(data.get_label() - booster.predict(data)))
    scale_params = {k: v for k, v in params.items() if k != "base_score"}  # its intercept: the mean error, estimated
    scale = xgboost.train(scale_params, dtrain, num_boost_round=config["rounds"], evals=[(dval, "val")],
                          early_stopping_rounds=config["early_stopping"] or None, verbose_eval=False)
    return scale[: scale.best_iteration + 1] if config["early_stopping"] else scale


def _matrix(table: pa.Table, features: list[str]) -> np.ndarray:
    if not table.num_rows:
        return np.zeros((0, len(features)))
    return np.column_stack([_column(table, f) for f in features])


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table[name].to_numpy(zero_copy_only=False).astype(np.float64)
