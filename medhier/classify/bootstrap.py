"""95 % confidence intervals for the evaluation, by resampling patients.

Images of one patient are not independent (the same spine, the same scanner), so the bootstrap
resamples *patients* with replacement, each drawn patient bringing all its images, and
recomputes the metrics of :func:`medhier.classify.metrics.evaluate` with the same definitions
(a class absent from a resample has sensitivity and specificity 0 there and no AUC, as in the
point estimate). The interval is the 2.5th-97.5th percentile of the resampled values (percentile
bootstrap; B = ``train.bootstrap_samples``, seeded by ``train.seed``). A resample is a vector of
patient multiplicities, so each metric is a weighted sum over images: B resamples cost a few
matrix products, not B calls to scikit-learn.

Covered: accuracy, and per class and macro-averaged sensitivity, specificity and one-vs-rest ROC
AUC, for the main and the leaf level. With few patients the intervals are wide, as they should
be; with one patient there is nothing to resample and no interval.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from medhier.classify.metrics import hierarchical_predictions
from medhier.classify.taxonomy import Taxonomy

__all__ = ["LEVEL", "bootstrap_intervals"]

LEVEL = 0.95
_CHUNK = 64  # resamples per block of (B, N) weights: bounds memory at 64 x N floats


def _weighted_auc(weights: np.ndarray, positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """(B, N) weights, (N,) bool, (N,) scores -> (B,) one-vs-rest AUC (ties count half); NaN
    where a resample has no positive or no negative weight."""
    order = np.argsort(score, kind="stable")
    s, pos = score[order], positive[order]
    w = weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    wp = np.add.reduceat(w * pos, starts, axis=1)
    wn = np.add.reduceat(w * ~pos, starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn
    total_p, total_n = wp.sum(1), wn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (wp * (below + 0.5 * wn)).sum(1) / (total_p * total_n)
    auc[(total_p == 0) | (total_n == 0)] = np.nan
    return auc


def _level_draws(weights: np.ndarray, y: np.ndarray, pred: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
    """One level's metrics over a block of resamples -> {name: (B,) or (B, K) values}."""
    k = scores.shape[1]
    total = weights.sum(1)
    onehot_y, onehot_pred = np.eye(k, dtype=bool)[y], np.eye(k, dtype=bool)[pred]
    support = weights @ onehot_y  # (B, K)
    negatives = total[:, None] - support
    true_pos = weights @ (onehot_y & onehot_pred)
    true_neg = weights @ (~onehot_y & ~onehot_pred)
    sensitivity = np.divide(true_pos, support, out=np.zeros_like(support), where=support > 0)
    specificity = np.divide(true_neg, negatives, out=np.zeros_like(negatives), where=negatives > 0)
    auc = np.stack([_weighted_auc(weights, y == c, scores[:, c]) for c in range(k)], axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample where no class has an AUC: NaN, left out below
        macro_auc = np.nanmean(auc, axis=1)
    return {"accuracy": (weights @ (y == pred)) / total, "sensitivity": sensitivity, "specificity": specificity, "roc_auc": auc,
            "macro_sensitivity": sensitivity.mean(1), "macro_specificity": specificity.mean(1), "macro_roc_auc": macro_auc}


def _interval(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return None
    lo, hi = np.percentile(values, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    return [round(float(lo), 4), round(float(hi), 4)]


def bootstrap_intervals(taxonomy: Taxonomy, patients: np.ndarray, main_true: np.ndarray, leaf_true: np.ndarray, p_main: np.ndarray,
                        p_leaf: np.ndarray, samples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Patient-level bootstrap intervals of :func:`medhier.classify.metrics.evaluate`'s metrics.

    ``patients``: (N,) each image's patient key; the other arrays as ``evaluate`` takes them
    (predictions derived hierarchically). -> ``{"level", "samples", "patients", "main": ci,
    "leaf": ci}`` with ci = ``{"accuracy": [lo, hi], "macro": {metric: [lo, hi]}, "per_class":
    {class: {metric: [lo, hi]}}}``, metric in sensitivity, specificity, roc_auc; None where
    the metric has no interval. {} for ``samples`` 0 or fewer than two patients."""
    names, group = np.unique(np.asarray(patients, dtype=object).astype(str), return_inverse=True)
    if samples <= 0 or len(names) < 2:
        return {}
    main_true, leaf_true = np.asarray(main_true, np.int64), np.asarray(leaf_true, np.int64)
    p_main, p_leaf = np.asarray(p_main, np.float64), np.asarray(p_leaf, np.float64)
    main_pred, leaf_pred = hierarchical_predictions(taxonomy, p_main, p_leaf)
    levels = {"main": (taxonomy.mains, main_true, main_pred, p_main), "leaf": (taxonomy.leaf_names, leaf_true, leaf_pred, p_leaf)}
    rng = np.random.default_rng(seed)
    draws: dict[str, dict[str, list[np.ndarray]]] = {lv: {} for lv in levels}
    for start in range(0, samples, _CHUNK):
        b = min(_CHUNK, samples - start)
        multiplicity = rng.multinomial(len(names), np.full(len(names), 1.0 / len(names)), size=b).astype(np.float64)
        weights = multiplicity[:, group]  # (b, N): each image weighs as often as its patient was drawn
        for lv, (_, y, pred, scores) in levels.items():
            for key, values in _level_draws(weights, y, pred, scores).items():
                draws[lv].setdefault(key, []).append(values)
    out: dict[str, Any] = {"level": LEVEL, "samples": int(samples), "patients": int(len(names)), "seed": int(seed)}
    for lv, (class_names, *_rest) in levels.items():
        d = {key: np.concatenate(parts) for key, parts in draws[lv].items()}
        out[lv] = {
            "accuracy": _interval(d["accuracy"]),
            "macro": {m: _interval(d[f"macro_{m}"]) for m in ("sensitivity", "specificity", "roc_auc")},
            "per_class": {name: {m: _interval(d[m][:, c]) for m in ("sensitivity", "specificity", "roc_auc")}
                          for c, name in enumerate(class_names)},
        }
    return out
