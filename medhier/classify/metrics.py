"""The evaluation clinicians read: per-level metrics, hierarchy measures, plots and loss weights.

Two levels are scored: the main class (``p_main``) and the leaf, i.e. the (main, subclass) pair
(``p_leaf`` = P(main) x P(sub | main)). Each gets accuracy, per-class sensitivity, specificity,
precision, F1 and one-vs-rest ROC AUC, their macro averages and a confusion matrix. The hierarchy
section separates the two heads: how often the subclass is right *given the true main class*,
how often the whole path is right, and whether predictions are coherent (a leaf inside the
predicted main class).

The metric math is scikit-learn's and the plots are matplotlib's. This module imports neither
torch nor Ray, so a report can be recomputed from saved arrays on any machine.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)
from sklearn.utils.class_weight import compute_class_weight

from medhier.classify.taxonomy import Taxonomy

__all__ = [
    "PLOT_FILES",
    "PROB_TOL",
    "balanced_class_weights",
    "evaluate",
    "hierarchical_predictions",
    "subclass_weights",
    "summary_table",
    "write_plots",
]

PROB_TOL = 1e-3  # how far a probability row may sum from 1 (float32 softmax is far inside this)

# File names written by write_plots, in the order it returns them.
PLOT_FILES = ("confusion_main.png", "confusion_leaf.png", "roc_main.png", "roc_leaf.png")

_PER_CLASS_KEYS = ("sensitivity", "specificity", "precision", "f1", "roc_auc")


# -- input checking ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inputs:
    """Validated arrays, predictions filled in."""

    main_true: np.ndarray  # (N,) int64
    leaf_true: np.ndarray  # (N,) int64
    p_main: np.ndarray  # (N, M) float64
    p_leaf: np.ndarray  # (N, L) float64
    main_pred: np.ndarray  # (N,) int64
    leaf_pred: np.ndarray  # (N,) int64


def _labels(name: str, values: Any, n_classes: int, n: int | None = None, allow_empty: bool = False) -> np.ndarray:
    """Check a 1-D array of class indices in [0, n_classes) -> int64 array; errors name ``name``."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of class indices, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name}: expected {n} entries (one per sample, as in main_true), got {arr.shape[0]}")
    if arr.size == 0:
        if not allow_empty:
            raise ValueError(f"{name}: need at least one sample, got an empty array")
        return arr.astype(np.int64)
    # Bools and floats are rejected: a float label usually means probabilities were passed by mistake.
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected integer class indices, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= n_classes)
    if bad.any():
        raise ValueError(
            f"{name}: class indices must lie in [0, {n_classes}); found {np.unique(arr[bad])[:5].tolist()} "
            f"(first at position {int(np.flatnonzero(bad)[0])}); drop unlabelled rows (-1) before evaluating"
        )
    return arr.astype(np.int64)


def _probabilities(name: str, values: Any, n: int, n_classes: int, what: str) -> np.ndarray:
    """Check an (n, n_classes) probability matrix -> float64 array; errors name ``name``."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a numeric (N, {what}) array: {exc}") from None
    if arr.shape != (n, n_classes):
        raise ValueError(f"{name}: expected shape (N, {what}) = ({n}, {n_classes}), got {arr.shape}")
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        raise ValueError(f"{name}: row {int(np.flatnonzero(~finite)[0])} holds NaN or inf")
    negative = (arr < 0).any(axis=1)
    if negative.any():
        raise ValueError(
            f"{name}: probabilities must be non-negative; row {int(np.flatnonzero(negative)[0])} has a negative "
            "entry (were logits passed instead of softmax probabilities?)"
        )
    sums = arr.sum(axis=1)
    off = np.abs(sums - 1.0) > PROB_TOL
    if off.any():
        row = int(np.flatnonzero(off)[0])
        raise ValueError(
            f"{name}: each row must sum to 1 (within {PROB_TOL}); row {row} sums to {sums[row]:.6g} "
            f"({int(off.sum())} rows off)"
        )
    return arr


def _argmax_within(taxonomy: Taxonomy, p_leaf: np.ndarray, mains: np.ndarray) -> np.ndarray:
    """(N, L) leaf probabilities, (N,) main indices -> (N,) the most probable leaf of each row's main."""
    # -inf outside the main class, so a leaf of another main never wins, even when the chosen
    # main's leaves all have probability 0 (argmax then picks its first leaf).
    return np.where(taxonomy.leaf_mask[mains], p_leaf, -np.inf).argmax(axis=1)


def hierarchical_predictions(taxonomy: Taxonomy, p_main: np.ndarray, p_leaf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, M) main and (N, L) leaf probabilities -> (main_pred, leaf_pred), each (N,) int64.

    The main class is the argmax of ``p_main``; the leaf is the argmax of ``p_leaf`` among that
    main class's leaves only, so the prediction is always coherent (never "normal" with a
    "burst" subclass) even where the flat argmax of ``p_leaf`` lies in another main class.
    """
    main_pred = np.asarray(p_main).argmax(axis=1).astype(np.int64)
    return main_pred, _argmax_within(taxonomy, np.asarray(p_leaf), main_pred).astype(np.int64)


def _prepare(taxonomy, main_true, leaf_true, p_main, p_leaf, main_pred=None, leaf_pred=None) -> _Inputs:
    if not isinstance(taxonomy, Taxonomy):
        raise TypeError(f"taxonomy: expected a medhier.taxonomy.Taxonomy, got {type(taxonomy).__name__}")
    main_true = _labels("main_true", main_true, taxonomy.num_mains)
    n = main_true.shape[0]
    leaf_true = _labels("leaf_true", leaf_true, taxonomy.num_leaves, n)
    wrong_main = taxonomy.leaf_main[leaf_true] != main_true
    if wrong_main.any():
        i = int(np.flatnonzero(wrong_main)[0])
        raise ValueError(
            f"leaf_true: sample {i} has leaf {taxonomy.leaf_names[leaf_true[i]]!r} but main_true "
            f"{taxonomy.mains[main_true[i]]!r} ({int(wrong_main.sum())} such samples); "
            "labels must come from the same taxonomy"
        )
    p_main = _probabilities("p_main", p_main, n, taxonomy.num_mains, "num_mains")
    p_leaf = _probabilities("p_leaf", p_leaf, n, taxonomy.num_leaves, "num_leaves")
    # p_leaf is defined as P(main) x P(sub | main), so its mass per main class is P(main). A
    # mismatch means the arrays were wired wrongly (e.g. P(sub | main) passed as p_leaf), and every
    # leaf metric would be silently wrong.
    marginal = p_leaf @ taxonomy.leaf_mask.T.astype(np.float64)
    off = np.abs(marginal - p_main).max(axis=1) > PROB_TOL
    if off.any():
        row = int(np.flatnonzero(off)[0])
        raise ValueError(
            f"p_leaf: must be P(main) x P(sub | main), so summing each main class's leaves must give p_main; "
            f"row {row} gives {np.round(marginal[row], 4).tolist()} against p_main {np.round(p_main[row], 4).tolist()}"
        )
    if main_pred is None:
        main_pred = p_main.argmax(axis=1)
    else:
        main_pred = _labels("main_pred", main_pred, taxonomy.num_mains, n)
    if leaf_pred is None:
        leaf_pred = _argmax_within(taxonomy, p_leaf, main_pred)
    else:
        leaf_pred = _labels("leaf_pred", leaf_pred, taxonomy.num_leaves, n)
    return _Inputs(main_true, leaf_true, p_main, p_leaf, main_pred.astype(np.int64), leaf_pred.astype(np.int64))


# -- metrics ----------------------------------------------------------------------------------


def _num(x: float) -> float | None:
    """numpy/Python number -> plain float, NaN -> None (JSON has no NaN)."""
    x = float(x)
    return None if math.isnan(x) else x


def _per_class_auc(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(K,) one-vs-rest ROC AUC; NaN where the class or its complement is absent from y_true."""
    n = y_true.shape[0]
    auc = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        positives = int((y_true == c).sum())
        if 0 < positives < n:  # roc_auc_score raises otherwise: the curve has no points on one axis
            auc[c] = roc_auc_score(y_true == c, scores[:, c])
    return auc


def _level(names: tuple[str, ...], y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    labels = np.arange(len(names))
    n = y_true.shape[0]
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    precision, sensitivity, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    # Specificity = TN / (TN + FP), and TN + FP is every sample not of the class. When there is no
    # such sample it is undefined; 0, as zero_division=0 does for precision and sensitivity.
    negatives = n - support
    false_pos = cm.sum(axis=0) - np.diag(cm)
    specificity = np.divide(negatives - false_pos, negatives, out=np.zeros(len(names)), where=negatives > 0)
    auc = _per_class_auc(y_true, scores)
    per_class = {
        name: {
            "sensitivity": _num(sensitivity[c]),
            "specificity": _num(specificity[c]),
            "precision": _num(precision[c]),
            "f1": _num(f1[c]),
            "roc_auc": _num(auc[c]),
            "support": int(support[c]),
        }
        for c, name in enumerate(names)
    }
    defined = auc[~np.isnan(auc)]
    macro = {
        "sensitivity": _num(sensitivity.mean()),
        "specificity": _num(specificity.mean()),
        "precision": _num(precision.mean()),
        "f1": _num(f1.mean()),
        # Over the classes where AUC exists: an absent class says nothing about ranking.
        "roc_auc": _num(defined.mean()) if defined.size else None,
    }
    return {
        "classes": list(names),
        "accuracy": _num(accuracy_score(y_true, y_pred)),
        "per_class": per_class,
        "macro": macro,
        "confusion_matrix": cm.astype(int).tolist(),
    }


def evaluate(
    taxonomy: Taxonomy,
    main_true: np.ndarray,
    leaf_true: np.ndarray,
    p_main: np.ndarray,
    p_leaf: np.ndarray,
    main_pred: np.ndarray | None = None,
    leaf_pred: np.ndarray | None = None,
) -> dict[str, Any]:
    """Score a hierarchical classifier -> a JSON-serialisable dict (NaN written as None).

    Args:
        main_true: (N,) int main-class indices; N >= 1.
        leaf_true: (N,) int global leaf indices, inside main_true's class.
        p_main: (N, M) main-class probabilities; rows sum to 1.
        p_leaf: (N, L) leaf probabilities P(main) x P(sub | main); rows sum to 1.
        main_pred, leaf_pred: (N,) int predictions. When None, derived hierarchically
            (:func:`hierarchical_predictions`: argmax of p_main, then the best leaf inside it).

    Returns ``{"n", "main": level, "leaf": level, "hierarchy"}`` where each level is
    ``{"classes", "accuracy", "per_class": {name: {sensitivity, specificity, precision, f1,
    roc_auc, support}}, "macro": {sensitivity, specificity, precision, f1, roc_auc},
    "confusion_matrix"}`` (rows true, columns predicted, taxonomy order; leaf names "main/sub"),
    and hierarchy is ``{"sub_accuracy_given_main", "sub_support", "path_accuracy",
    "consistency"}``. ROC AUC is None for a class absent from (or filling all of) main_true /
    leaf_true; the macro AUC averages the others and is None when none has one.

    Raises ValueError naming the argument for wrong shapes, out-of-range indices,
    negative or non-normalised probabilities, or p_leaf that does not sum to p_main per main.
    """
    x = _prepare(taxonomy, main_true, leaf_true, p_main, p_leaf, main_pred, leaf_pred)
    # Subclass head alone: choose inside the TRUE main class, so main-head mistakes don't count.
    # Mains with one subclass are left out: there the subclass is right by construction.
    multi = np.array([len(s) > 1 for s in taxonomy.subs])[x.main_true]
    if multi.any():
        within = _argmax_within(taxonomy, x.p_leaf[multi], x.main_true[multi])
        sub_accuracy = _num(np.mean(within == x.leaf_true[multi]))
    else:
        sub_accuracy = None
    return {
        "n": int(x.main_true.shape[0]),
        "main": _level(taxonomy.mains, x.main_true, x.main_pred, x.p_main),
        "leaf": _level(taxonomy.leaf_names, x.leaf_true, x.leaf_pred, x.p_leaf),
        "hierarchy": {
            "sub_accuracy_given_main": sub_accuracy,
            "sub_support": int(multi.sum()),  # samples behind sub_accuracy_given_main
            "path_accuracy": _num(np.mean(x.leaf_pred == x.leaf_true)),
            "consistency": _num(np.mean(taxonomy.leaf_main[x.leaf_pred] == x.main_pred)),
        },
    }


# -- plots ------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    # A bare Figure on an Agg canvas, not pyplot: nothing is registered in pyplot's global figure
    # list (so nothing leaks across a long run or Tune trials), no GUI backend is ever touched,
    # and the process-wide backend a notebook user chose is left alone.
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plot_confusion(path: str, title: str, names: tuple[str, ...], y_true: np.ndarray, y_pred: np.ndarray) -> None:
    k = len(names)
    side = 3.0 + 0.8 * k  # inches: cells stay legible and rotated "main/sub" labels fit from 2 to ~12 classes
    fig = _figure(side + 1.5, side + 0.8)
    ax = fig.add_subplot()
    cm = confusion_matrix(y_true, y_pred, labels=np.arange(k))
    ConfusionMatrixDisplay(cm, display_labels=list(names)).plot(ax=ax, cmap="Blues", values_format="d", colorbar=True)
    for label in ax.get_xticklabels():  # anchored at the tick so long names don't drift off their column
        label.set(rotation=40, ha="right", rotation_mode="anchor")
    accuracy = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(f"{title} — n={int(cm.sum())}, accuracy {accuracy:.3f}")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.savefig(path, dpi=110)


def _plot_roc(path: str, title: str, names: tuple[str, ...], y_true: np.ndarray, scores: np.ndarray) -> None:
    fig = _figure(7.5, 6.5)
    ax = fig.add_subplot()
    auc = _per_class_auc(y_true, scores)
    skipped = []
    for c, name in enumerate(names):
        if np.isnan(auc[c]):
            skipped.append(name)
            continue
        fpr, tpr, _ = roc_curve(y_true == c, scores[:, c])
        ax.plot(fpr, tpr, lw=1.8, label=f"{name} (AUC {auc[c]:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="grey", label="chance")
    for name in skipped:  # listed in the legend, without a line, so the reader sees it was not forgotten
        ax.plot([], [], ls="none", label=f"{name}: no ROC (class absent or alone)")
    ax.set(
        xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal", title=f"{title} — one-vs-rest ROC",
        xlabel="false-positive rate (1 − specificity)", ylabel="true-positive rate (sensitivity)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.savefig(path, dpi=110)


def write_plots(taxonomy: Taxonomy, *arrays: np.ndarray | None, out_dir: str | os.PathLike) -> list[str]:
    """Write confusion matrices and ROC curves as PNGs -> their paths (see :data:`PLOT_FILES`).

    ``arrays``: :func:`evaluate`'s main_true, leaf_true, p_main, p_leaf and optionally main_pred,
    leaf_pred, in that order (same checks, same derived predictions), so
    ``write_plots(taxonomy, *arrays, out_dir=d)`` draws exactly what ``evaluate(taxonomy, *arrays)``
    reports. ``out_dir`` is a local directory, created if missing. Classes without a ROC curve
    (absent from the labels, or the only class present) are listed on the plot instead of drawn.
    """
    if not 4 <= len(arrays) <= 6:
        raise TypeError(
            "write_plots takes evaluate's arrays: main_true, leaf_true, p_main, p_leaf[, main_pred, leaf_pred]; "
            f"got {len(arrays)}"
        )
    x = _prepare(taxonomy, *arrays)
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(os.fspath(out_dir), name) for name in PLOT_FILES]
    _plot_confusion(paths[0], "Main class", taxonomy.mains, x.main_true, x.main_pred)
    _plot_confusion(paths[1], "Main/subclass", taxonomy.leaf_names, x.leaf_true, x.leaf_pred)
    _plot_roc(paths[2], "Main class", taxonomy.mains, x.main_true, x.p_main)
    _plot_roc(paths[3], "Main/subclass", taxonomy.leaf_names, x.leaf_true, x.p_leaf)
    return paths


# -- summary ----------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summary_table(metrics: dict[str, Any]) -> str:
    """:func:`evaluate`'s dict (or the same loaded from JSON) -> a few printable lines.

    One row per level: accuracy and the macro sensitivity, specificity, F1 and ROC AUC; then the
    hierarchy measures. "n/a" marks a value that is undefined for this data.
    """
    columns = ("accuracy", "sensitivity", "specificity", "f1", "roc_auc")
    header = ("level", "accuracy", "sens", "spec", "F1", "AUC")
    rows = [header]
    for level in ("main", "leaf"):
        m = metrics[level]
        values = [m["accuracy"]] + [m["macro"][c] for c in columns[1:]]
        rows.append((f"{level} ({len(m['classes'])})", *(_fmt(v) for v in values)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    h = metrics["hierarchy"]
    lines += [
        "(sens/spec/F1/AUC: macro averages over classes)",
        f"path accuracy {_fmt(h['path_accuracy'])} | subclass accuracy given true main "
        f"{_fmt(h['sub_accuracy_given_main'])} (n={h['sub_support']}) | consistency {_fmt(h['consistency'])}",
        f"n = {metrics['n']} samples",
    ]
    return "\n".join(lines)


# -- class weights for the loss ---------------------------------------------------------------


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(n,) int labels in [0, n_classes) -> (n_classes,) float32 loss weights.

    scikit-learn's ``compute_class_weight("balanced")`` over the classes present:
    n_samples / (n_present * count[c]), so every present class carries the same total weight.
    A class absent from ``labels`` gets 1.0: it contributes no term to the loss, so its weight
    changes nothing, and 1.0 (rather than inf from a zero count, or an error) keeps the vector
    finite and neutral should the weights be reused on data that does contain it.
    """
    if not isinstance(n_classes, (int, np.integer)) or isinstance(n_classes, bool) or n_classes < 1:
        raise ValueError(f"n_classes: expected a positive integer, got {n_classes!r}")
    y = _labels("labels", labels, int(n_classes), allow_empty=True)
    weights = np.ones(int(n_classes), dtype=np.float32)
    present = np.unique(y)
    if present.size:
        weights[present] = compute_class_weight("balanced", classes=present, y=y)
    return weights


def subclass_weights(taxonomy: Taxonomy, leaf_labels: np.ndarray) -> np.ndarray:
    """(n,) int global leaf labels -> (L,) float32 weights for the subclass loss given the true main.

    Balanced within each main class separately (:func:`balanced_class_weights` over that main's
    samples), because the subclass head only ever competes among one main's subclasses: a rare
    main class must not inflate its subclasses' weights. Single-subclass mains get 1.0.
    """
    if not isinstance(taxonomy, Taxonomy):
        raise TypeError(f"taxonomy: expected a medhier.taxonomy.Taxonomy, got {type(taxonomy).__name__}")
    y = _labels("leaf_labels", leaf_labels, taxonomy.num_leaves, allow_empty=True)
    weights = np.ones(taxonomy.num_leaves, dtype=np.float32)
    mains = taxonomy.leaf_main[y]
    for m, subs in enumerate(taxonomy.subs):
        if len(subs) > 1:
            weights[taxonomy.leaf_mask[m]] = balanced_class_weights(taxonomy.leaf_sub[y[mains == m]], len(subs))
    return weights
