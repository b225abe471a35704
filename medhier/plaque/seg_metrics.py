"""How good the segmentation model is, per visit of a held-out split: overlap (Dice), boundary
distance (HD95), which label each voxel gets (confusion), and what a clinician reads — the
measurements of :mod:`medhier.plaque.measure` from the model's label map against the same
measurements from the truth.

Structures (each a set of voxels of the label map, scored separately)
======================  =================================================================
structure               voxels
======================  =================================================================
lumen                   label lumen
outer_wall              every non-zero label: the region inside the outer wall contour
vessel_wall             labels wall and above: the wall with its plaque components
lipid_core              label lipid_core
haemorrhage             label haemorrhage
calcification           label calcification
fibrous_cap             label fibrous_cap
======================  =================================================================

Per visit (3-D, on the grid the model saw, spacing (dz, dy, dx) mm): Dice per structure
(MONAI ``DiceMetric``, ``ignore_empty``: null where the truth lacks the structure — a plaque
component most visits do not have says nothing there; false positives still show in the
confusion matrix), HD95 per structure in mm (MONAI ``HausdorffDistanceMetric``, 95th
percentile, symmetric, with the voxel spacing; null where truth or prediction lacks the
structure), the voxel confusion matrix (scikit-learn, rows truth, columns prediction, in label
order) and every measurement from both label maps.

Summary (:func:`summarise`): per structure the mean, median and count of the per-visit Dice and
HD95, and the pooled Dice (``dice_pooled``: 2 TP / (2 TP + FP + FN) over the voxels of every
visit together; null where neither truth nor model has the structure anywhere). A plaque
component spans a few dozen voxels per visit, so one visit's Dice swings with a handful of
voxels and the mean weights a 10-voxel core like a 100-voxel one; the pooled Dice weights every
voxel alike, and unlike the per-visit Dice it also counts false positives in visits whose truth
lacks the structure. Then the confusion matrix summed over visits, and per measurement (the
numeric columns of :data:`medhier.plaque.measure.MEASUREMENTS`) over the visits where both
values are defined: ``n``, ``mean_abs_error`` (model − truth, in the measurement's unit),
``mean_rel_error`` (|model − truth| / |truth| over visits with a non-zero truth), and the
Bland–Altman ``bias`` (mean difference) with its 95 % limits of agreement (bias ± 1.96 SD of
the differences).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from sklearn.metrics import confusion_matrix

from medhier.plaque import labels as L
from medhier.plaque.measure import MEASUREMENTS, measure

__all__ = ["BLAND_ALTMAN", "STRUCTURES", "VisitScores", "bland_altman_png", "overlays_png", "score_visit", "summarise"]

STRUCTURES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "lumen": lambda labels: labels == L.LUMEN,
    "outer_wall": lambda labels: labels > L.BACKGROUND,
    "vessel_wall": lambda labels: labels >= L.WALL,
    "lipid_core": lambda labels: labels == L.LIPID,
    "haemorrhage": lambda labels: labels == L.HAEMORRHAGE,
    "calcification": lambda labels: labels == L.CALCIFICATION,
    "fibrous_cap": lambda labels: labels == L.CAP,
}
# The measurements the Bland-Altman figure shows (one panel each).
BLAND_ALTMAN = ("lumen_volume_mm3", "wall_volume_mm3", "lipid_core_volume_mm3", "haemorrhage_volume_mm3", "stenosis_area_pct",
                "max_wall_thickness_mm", "mean_nwi", "min_cap_thickness_mm")
_NUMERIC = tuple(name for name, (unit, _) in MEASUREMENTS.items() if unit not in ("count", "index"))


@dataclass(frozen=True)
class VisitScores:
    """One visit's scores (module docstring): structure -> Dice / HD95 (None: undefined),
    confusion (labels x labels voxels), measurement -> value from the truth and from the model."""

    study_instance_uid: str
    dice: dict[str, float | None]
    hd95_mm: dict[str, float | None]
    confusion: np.ndarray
    truth: dict[str, float | int]
    predicted: dict[str, float | int]
    overlap: dict[str, tuple[int, int, int]]  # structure -> voxels (both, truth only, model only)


def _channels(labels: np.ndarray) -> torch.Tensor:
    """uint8 (Z, Y, X) -> bool (1, structures, Z, Y, X), MONAI's layout."""
    return torch.from_numpy(np.stack([fn(labels) for fn in STRUCTURES.values()])[None])


def _defined(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def score_visit(study_uid: str, truth: np.ndarray, predicted: np.ndarray, spacing: Sequence[float]) -> VisitScores:
    """Truth and model label maps of one visit (uint8 (Z, Y, X), same grid; ``spacing`` (dz, dy,
    dx) mm) -> its :class:`VisitScores`."""
    if truth.shape != predicted.shape:
        raise ValueError(f"score_visit {study_uid}: truth {truth.shape} and prediction {predicted.shape} differ in shape")
    y, p = _channels(truth), _channels(predicted)
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=True)(p, y)[0].tolist()
    present_both = [bool(y[0, c].any() and p[0, c].any()) for c in range(len(STRUCTURES))]
    hd = [math.nan] * len(STRUCTURES)
    if any(present_both):
        picks = [c for c, ok in enumerate(present_both) if ok]
        values = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
            p[:, picks], y[:, picks], spacing=list(map(float, spacing)))[0].tolist()
        for c, v in zip(picks, values):
            hd[c] = v
    names = list(STRUCTURES)
    return VisitScores(
        study_instance_uid=study_uid,
        dice={n: _defined(d) for n, d in zip(names, dice)},
        hd95_mm={n: _defined(h) for n, h in zip(names, hd)},
        confusion=confusion_matrix(truth.ravel(), predicted.ravel(), labels=list(range(len(L.NAMES)))),
        truth=measure(truth, spacing).to_dict(),
        predicted=measure(predicted, spacing).to_dict(),
        overlap={n: (int((y[0, c] & p[0, c]).sum()), int((y[0, c] & ~p[0, c]).sum()), int((~y[0, c] & p[0, c]).sum()))
                 for c, n in enumerate(names)},
    )


def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": float(np.mean(values)) if values else None, "median": float(np.median(values)) if values else None, "n": len(values)}


def measurement_errors(visits: Sequence[VisitScores]) -> dict[str, dict[str, Any]]:
    """Per numeric measurement: n, mean absolute and relative error, Bland-Altman bias and limits."""
    out = {}
    for name in _NUMERIC:
        pairs = [(v.predicted[name], v.truth[name]) for v in visits]
        pairs = [(float(m), float(t)) for m, t in pairs if m is not None and t is not None and math.isfinite(m) and math.isfinite(t)]
        diff = np.array([m - t for m, t in pairs])
        relative = [abs(m - t) / abs(t) for m, t in pairs if t != 0]
        sd = float(diff.std(ddof=1)) if len(diff) > 1 else None
        bias = float(diff.mean()) if len(diff) else None
        out[name] = {
            "unit": MEASUREMENTS[name][0],
            "n": len(pairs),
            "mean_abs_error": float(np.abs(diff).mean()) if len(diff) else None,
            "mean_rel_error": float(np.mean(relative)) if relative else None,
            "bias": bias,
            "sd": sd,
            "limits_of_agreement": [bias - 1.96 * sd, bias + 1.96 * sd] if sd is not None else None,
        }
    return out


def _pooled_dice(overlaps: list[tuple[int, int, int]]) -> float | None:
    both, truth_only, model_only = (sum(o[i] for o in overlaps) for i in range(3))
    return None if both + truth_only + model_only == 0 else 2 * both / (2 * both + truth_only + model_only)


def summarise(visits: Sequence[VisitScores]) -> dict[str, Any]:
    """Per-visit scores -> the evaluation's summary (module docstring), JSON-able."""
    confusion = sum((v.confusion for v in visits), np.zeros((len(L.NAMES), len(L.NAMES)), np.int64))
    return {
        "visits": len(visits),
        "dice": {s: _stats([v.dice[s] for v in visits if v.dice[s] is not None]) for s in STRUCTURES},
        "hd95_mm": {s: _stats([v.hd95_mm[s] for v in visits if v.hd95_mm[s] is not None]) for s in STRUCTURES},
        "dice_pooled": {s: _pooled_dice([v.overlap[s] for v in visits]) for s in STRUCTURES},
        "confusion": {"labels": list(L.NAMES), "rows": "truth", "columns": "prediction", "voxels": confusion.tolist()},
        "measurements": measurement_errors(visits),
        "per_visit": [{"study_instance_uid": v.study_instance_uid, "dice": v.dice, "hd95_mm": v.hd95_mm} for v in visits],
    }


def bland_altman_png(visits: Sequence[VisitScores], names: Sequence[str] = BLAND_ALTMAN) -> bytes:
    """PNG: one Bland-Altman panel per measurement (x: mean of model and truth, y: model − truth,
    lines at the bias and its 95 % limits of agreement)."""
    errors = measurement_errors(visits)
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.flat, names):
        pairs = [(v.predicted[name], v.truth[name]) for v in visits]
        pairs = [(float(m), float(t)) for m, t in pairs if m is not None and t is not None and math.isfinite(m) and math.isfinite(t)]
        if pairs:
            m, t = np.array(pairs).T
            ax.scatter((m + t) / 2, m - t, s=14)
        e = errors[name]
        if e["bias"] is not None:
            ax.axhline(e["bias"], color="k", lw=1)
        for limit in e["limits_of_agreement"] or []:
            ax.axhline(limit, color="k", lw=1, ls="--")
        ax.set_title(f"{name} ({e['unit']}), n={e['n']}", fontsize=9)
        ax.set_xlabel("mean of model and truth", fontsize=8)
        ax.set_ylabel("model - truth", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    return _png(fig)


def overlays_png(images: Sequence[np.ndarray], truths: Sequence[np.ndarray], predictions: Sequence[np.ndarray],
                 titles: Sequence[str]) -> bytes:
    """PNG: per slice, the image (float (S, S), e.g. the reference channel) under the truth's
    labels and under the model's, side by side, one colour per label."""
    colours = ListedColormap(["none", "tab:red", "gold", "tab:orange", "tab:purple", "white", "tab:cyan"][: len(L.NAMES)])
    n = max(1, len(images))
    fig = Figure(figsize=(6, 3 * n), layout="constrained")
    axes = fig.subplots(n, 2, squeeze=False)
    for row, (image, truth, pred, title) in enumerate(zip(images, truths, predictions, titles)):
        for ax, labels, what in ((axes[row, 0], truth, "truth"), (axes[row, 1], pred, "model")):
            ax.imshow(image, cmap="gray")
            ax.imshow(np.ma.masked_equal(labels, 0), cmap=colours, vmin=0, vmax=len(L.NAMES) - 1, alpha=0.45, interpolation="nearest")
            ax.set_title(f"{title} {what}", fontsize=8)
            ax.axis("off")
    return _png(fig)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()
