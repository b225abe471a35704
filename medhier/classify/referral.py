"""Referral: when the model should hand an image to a human reader instead of answering.

An image is referred (``refer`` in the report, the SR and the endpoint's answer) when its
calibrated leaf probability (``leaf_prob``) is below ``score.refer_below``, or when the two most
probable leaves are closer than ``score.refer_margin`` (the model hesitates between two
answers). ``score.refer_below`` left null takes the checkpoint's own threshold, fitted after
training on the validation split: the lowest leaf probability at which the images the model
keeps reach ``train.refer_target_accuracy`` (:func:`threshold_for_accuracy`).

The risk-coverage curve (:func:`risk_coverage`) shows the trade: images sorted by leaf
probability, most confident first, the accuracy of the first share of them (coverage) against
that share. A model whose confidence means something has accuracy rising as coverage falls.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from medhier.config import Config

__all__ = ["REFER_BELOW", "Referral", "refer", "risk_coverage", "risk_coverage_png", "threshold_for_accuracy"]

REFER_BELOW = "refer_below"  # the score setting the checkpoint fits (its defaults["score"])
_CURVE_POINTS = 101  # points of the curve written to metrics.json


@dataclass(frozen=True)
class Referral:
    """Referral thresholds: ``below`` on the leaf probability, ``margin`` on the gap between the
    two most probable leaves; 0 switches either off."""

    below: float = 0.0
    margin: float = 0.0

    @classmethod
    def of(cls, cfg: Config) -> Referral:
        """The thresholds of a run's config (the user's ``score`` section, its null
        ``refer_below`` filled from the checkpoint by ``config_for_checkpoint``)."""
        below = cfg.score.refer_below
        return cls(0.0 if below is None else float(below), float(cfg.score.refer_margin))


def refer(p_leaf: np.ndarray, leaf_prob: np.ndarray, referral: Referral) -> np.ndarray:
    """(N, L) leaf probabilities and (N,) the predicted leaf's -> (N,) bool: refer the image."""
    p_leaf = np.asarray(p_leaf, np.float64)
    out = np.asarray(leaf_prob, np.float64) < referral.below
    if referral.margin > 0 and p_leaf.shape[1] > 1:
        top2 = -np.partition(-p_leaf, 1, axis=1)[:, :2]
        out |= (top2[:, 0] - top2[:, 1]) < referral.margin
    return out


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> dict[str, list[float]]:
    """(N,) confidences and (N,) right/wrong -> the curve at up to 101 coverages, most confident
    first: ``coverage`` (share kept), ``accuracy`` (of those kept), ``threshold`` (the lowest
    confidence kept). Images of equal confidence are kept or dropped together."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, bool)
    if not len(confidence):
        return {"coverage": [], "accuracy": [], "threshold": []}
    order = np.argsort(-confidence, kind="stable")
    conf, hits = confidence[order], np.cumsum(correct[order])
    # The last image of each run of equal confidences: where the curve may stop.
    ends = np.flatnonzero(np.append(conf[1:] != conf[:-1], True))
    picks = ends[np.unique(np.searchsorted(ends, np.linspace(0, len(conf) - 1, _CURVE_POINTS)).clip(0, len(ends) - 1))]
    kept = picks + 1
    return {"coverage": (kept / len(conf)).round(4).tolist(), "accuracy": (hits[picks] / kept).round(4).tolist(),
            "threshold": conf[picks].round(6).tolist()}


def threshold_for_accuracy(confidence: np.ndarray, correct: np.ndarray, target: float) -> dict[str, Any]:
    """The lowest confidence threshold at which the images at or above it reach ``target``
    accuracy (the most coverage that does) -> ``{"threshold", "coverage", "accuracy",
    "reached"}``. 0 when every image together reaches it; when no threshold does, the highest
    confidence plus a hair: every image is referred (``reached`` False)."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, bool)
    if not len(confidence):
        return {"threshold": 0.0, "coverage": 0.0, "accuracy": None, "reached": False}
    order = np.argsort(-confidence, kind="stable")
    conf = confidence[order]
    kept = np.arange(1, len(conf) + 1)
    accuracy = np.cumsum(correct[order]) / kept
    ends = np.flatnonzero(np.append(conf[1:] != conf[:-1], True))
    good = ends[accuracy[ends] >= target]
    if not len(good):
        return {"threshold": float(np.nextafter(conf[0], np.inf)), "coverage": 0.0, "accuracy": None, "reached": False}
    last = int(good[-1])
    threshold = 0.0 if last == len(conf) - 1 else float(conf[last])
    return {"threshold": threshold, "coverage": float(kept[last] / len(conf)), "accuracy": float(accuracy[last]), "reached": True}


def risk_coverage_png(path: str | os.PathLike, curves: dict[str, tuple[np.ndarray, np.ndarray]], threshold: float | None = None,
                      target: float | None = None) -> str:
    """Accuracy against coverage per named (confidence, correct) pair, the referral threshold's
    operating point marked on each and the target accuracy as a line. Writes a PNG -> path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # ~0.5 s: plotting only, never in a model actor
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, (confidence, correct) in curves.items():
        curve = risk_coverage(confidence, correct)
        line, = ax.plot(curve["coverage"], curve["accuracy"], lw=1.8, label=f"{name} (n={len(confidence)})")
        if threshold is not None and len(confidence):
            kept = np.asarray(confidence) >= threshold
            if kept.any():
                ax.plot([kept.mean()], [np.asarray(correct)[kept].mean()], "o", color=line.get_color())
    if target is not None:
        ax.axhline(target, ls="--", lw=1, color="grey", label=f"target accuracy {target:g}")
    title = "Risk-coverage: accuracy of the images the model keeps"
    if threshold is not None:
        title += f"\n(dots: refer below leaf probability {threshold:.3f})"
    ax.set(xlim=(0, 1.01), xlabel="coverage (share of images answered, most confident first)", ylabel="accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    fig.savefig(path, dpi=110)
    return os.fspath(path)
