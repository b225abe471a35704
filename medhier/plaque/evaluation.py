"""How well the change factors are predicted: MAE, RMSE and R² per factor and model on held-out
patients (scikit-learn's metrics), interval coverage, and the plots ``medhier plaque fit``
writes (matplotlib).

R² is 1 - SSE / SST around the **evaluated split's own mean** (sklearn's ``r2_score``): the
mean predictor's R² on held-out patients is therefore slightly below 0, and a factor is
learnable from the inputs when a model's R² is clearly above 0.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

__all__ = ["LEARNABLE_R2", "errors", "importance_png", "predicted_vs_true_png"]

# A factor counts as learnable from the inputs when the best model explains at least this share
# of its variance on held-out patients.
LEARNABLE_R2 = 0.1


def errors(y: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """MAE, RMSE and R² of ``prediction`` against ``y`` (both (n,)); NaN when n < 2."""
    if len(y) < 2:
        return {"mae": math.nan, "rmse": math.nan, "r2": math.nan, "n": int(len(y))}
    return {"mae": float(mean_absolute_error(y, prediction)), "rmse": float(math.sqrt(mean_squared_error(y, prediction))),
            "r2": float(r2_score(y, prediction)), "n": int(len(y))}


def _panels(n: int, width: float, height: float) -> tuple[Figure, int, int]:
    """A figure for ``n`` panels of ``width`` x ``height`` inches, three to a row -> (figure, rows, columns)."""
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows))
    FigureCanvasAgg(fig)
    return fig, rows, cols


def predicted_vs_true_png(truth: Mapping[str, np.ndarray], predictions: Mapping[str, Mapping[str, np.ndarray]],
                          half_widths: Mapping[str, np.ndarray], units: Mapping[str, str], coverage: float) -> bytes:
    """One panel per factor: every model's prediction against the true value on the test split;
    the boosted model with its interval (error bars), the identity line."""
    names = list(truth)
    fig, rows, cols = _panels(len(names), 4.3, 4.0)
    for i, name in enumerate(names, 1):
        ax = fig.add_subplot(rows, cols, i)
        y = truth[name]
        for model, style in (("mean", dict(marker=".", alpha=0.35, color="0.6")), ("ridge", dict(marker="^", alpha=0.45, s=14))):
            if model in predictions[name]:
                ax.scatter(y, predictions[name][model], label=model, **style)
        boosted = predictions[name]["xgboost"]
        ax.errorbar(y, boosted, yerr=half_widths[name], fmt="o", ms=3, alpha=0.6, elinewidth=0.5,
                    label=f"xgboost ± {coverage:.0%} interval")
        lo, hi = _limits(y, boosted)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"true ({units[name]})")
        ax.set_ylabel(f"predicted ({units[name]})")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        if i == 1:
            ax.legend(fontsize=7)
    fig.suptitle("Change factors on held-out patients (test split)")
    fig.tight_layout()
    return _png(fig)


def importance_png(gains: Mapping[str, Mapping[str, float]], top: int = 12) -> bytes:
    """One panel per factor: the boosters' total gain per input (XGBoost's ``total_gain``), the
    ``top`` largest, as a share of the factor's total."""
    names = list(gains)
    fig, rows, cols = _panels(len(names), 4.6, 3.8)
    for i, name in enumerate(names, 1):
        ax = fig.add_subplot(rows, cols, i)
        ranked = sorted(gains[name].items(), key=lambda kv: kv[1], reverse=True)[:top]
        total = sum(gains[name].values()) or 1.0
        labels = [k for k, _ in ranked][::-1]
        ax.barh(range(len(labels)), [v / total for _, v in ranked][::-1])
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("share of total gain")
        ax.set_title(name, fontsize=9)
    fig.suptitle("What the boosted trees use (on top of the base model)")
    fig.tight_layout()
    return _png(fig)


def _limits(*arrays: np.ndarray) -> tuple[float, float]:
    values = np.concatenate([np.asarray(a, dtype=float) for a in arrays])
    values = values[np.isfinite(values)]
    if not len(values):
        return 0.0, 1.0
    return float(values.min()), float(values.max())


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
