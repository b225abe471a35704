"""The linear models beside the trees: the mean predictor and ridge regression (scikit-learn),
each one per factor, fitted on the training split only.

Both are kept as plain arrays (:class:`LinearModel`: impute, standardise, dot product), so a
saved model holds numbers in JSON, never a pickle: a model read from storage is untrusted input.
The ridge imputes a missing input with its training median (a missing category: the indicator's
median, i.e. the most common category), standardises, and fits ``Ridge(alpha=predict.ridge_alpha)``.
The mean predictor is the same object with no coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.impute import SimpleImputer
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

__all__ = ["LinearModel", "fit_mean", "fit_ridge"]


@dataclass(frozen=True)
class LinearModel:
    """y = intercept + ((x with NaN -> median) - mean) / scale . coef; arrays of shape (features,)."""

    median: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(rows, features) float64 -> (rows,) predictions."""
        filled = np.where(np.isnan(x), self.median, x)
        return self.intercept + ((filled - self.mean) / self.scale) @ self.coef

    def to_dict(self) -> dict:
        return {"median": self.median.tolist(), "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "coef": self.coef.tolist(), "intercept": float(self.intercept)}

    @classmethod
    def from_dict(cls, data: dict) -> LinearModel:
        arrays = {k: np.asarray(data[k], dtype=np.float64) for k in ("median", "mean", "scale", "coef")}
        return cls(**arrays, intercept=float(data["intercept"]))


def fit_mean(x: np.ndarray, y: np.ndarray) -> LinearModel:
    """The training mean of ``y`` for every input."""
    d = x.shape[1]
    return LinearModel(np.zeros(d), np.zeros(d), np.ones(d), np.zeros(d), float(np.mean(y)))


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> LinearModel:
    """Ridge regression of ``y`` (rows,) on ``x`` (rows, features) with NaN for missing values."""
    pipeline = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(), Ridge(alpha=alpha))
    pipeline.fit(x, y)
    imputer, scaler, ridge = pipeline.steps[0][1], pipeline.steps[1][1], pipeline.steps[2][1]
    median = np.nan_to_num(np.asarray(imputer.statistics_, dtype=np.float64))  # an all-missing column is 0
    return LinearModel(median, np.asarray(scaler.mean_, dtype=np.float64), np.asarray(scaler.scale_, dtype=np.float64),
                       np.asarray(ridge.coef_, dtype=np.float64), float(ridge.intercept_))
