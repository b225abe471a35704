"""Drift: does this scoring run's archive look like the data the model was trained on?

A checkpoint keeps a *reference profile* of its training data (:func:`reference_profile`, stored
by :func:`medhier.train.checkpoint.amend_checkpoint`); every scoring run counts its own images
the same way (:class:`DriftCounter`, fed the committed report rows) and compares the two with the
population stability index per feature, written to ``summary.json`` (``drift``) and printed.

Features (one per report column, plus the predicted class):

====================  ===========  ==========================================================
feature               kind         what is compared
====================  ===========  ==========================================================
``modality``          categorical  Modality
``body_part``         categorical  BodyPartExamined
``manufacturer``      categorical  Manufacturer
``pixel_spacing``     numeric      PixelSpacing (mm, the mean of rows and columns)
``intensity_mean``    numeric      mean grey level of the model's input image, in [0, 1]
``intensity_std``     numeric      its standard deviation
``predicted_class``   categorical  the task's predicted class (the classifier's leaf); the
                                   reference is the model's predictions on its validation split
====================  ===========  ==========================================================

Categorical features keep their categories (the 20 most frequent, the rest pooled as
``(other)``; a category the reference never saw counts as ``(other)``). Numeric features are
binned at the reference's quintiles (fewer bins where values repeat), with one more bin for a
missing value (no PixelSpacing): with k bins, two samples of N images from one population still
differ by a PSI of about (k - 1) * 2 / N, so few, wide bins keep small runs from false alarms. PSI = sum over bins of (a - e) ln(a / e), where a and e are the
run's and the reference's shares, each smoothed by half an image per bin so that an empty bin
does not make it infinite. Rules of thumb: below 0.1 stable, 0.1-0.25 a moderate shift, above
0.25 a large one (``score.drift_warn_psi``). With few images PSI is noisy: warnings wait until a
run scored ``score.drift_min_images``.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medhier import columns as C

__all__ = ["CATEGORICAL", "NUMERIC", "PREDICTED_CLASS", "DriftCounter", "psi", "reference_profile"]

CATEGORICAL = (C.MODALITY, C.BODY_PART, C.MANUFACTURER)
NUMERIC = (C.PIXEL_SPACING, C.INTENSITY_MEAN, C.INTENSITY_STD)
PREDICTED_CLASS = "predicted_class"
OTHER = "(other)"
MISSING = "(missing)"
_MAX_CATEGORIES = 20
_QUINTILES = np.linspace(0.2, 0.8, 4)
_PSEUDO = 0.5  # images added to every bin of both sides before shares are taken


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two count vectors over the same bins (each smoothed by
    half an image per bin) -> PSI >= 0; 0 for identical shares."""
    e = np.asarray(expected, np.float64) + _PSEUDO
    a = np.asarray(actual, np.float64) + _PSEUDO
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def _categorical(values: list[str]) -> dict[str, Any]:
    counts = Counter(v if v else MISSING for v in values)
    kept = [name for name, _ in counts.most_common(_MAX_CATEGORIES)]
    other = sum(n for name, n in counts.items() if name not in kept)
    return {"kind": "categorical", "bins": kept + [OTHER], "counts": [counts[k] for k in kept] + [other]}


def _numeric(values: np.ndarray) -> dict[str, Any]:
    present = values[np.isfinite(values)]
    edges = np.unique(np.quantile(present, _QUINTILES)).tolist() if present.size else []
    spec = {"kind": "numeric", "edges": edges}
    spec["counts"] = _bin_numeric(spec, values).tolist()
    return spec


def _bin_numeric(spec: dict[str, Any], values: np.ndarray) -> np.ndarray:
    """Counts per bin: len(edges) + 1 value bins (below the first edge, between edges, at or
    above the last), then the missing-value bin."""
    edges = np.asarray(spec["edges"], np.float64)
    finite = np.isfinite(values)
    index = np.searchsorted(edges, values[finite], side="right")
    counts = np.bincount(index, minlength=len(edges) + 1)
    return np.append(counts, int((~finite).sum()))


def _floats(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(pc.cast(table[name], pa.float64()).to_numpy(zero_copy_only=False), np.float64)


def _strings(table: pa.Table, name: str) -> list[str]:
    return [v or "" for v in table[name].to_pylist()]


def reference_profile(rows: pa.Table, predicted: dict[str, int] | None = None) -> dict[str, Any]:
    """The reference profile of training images: ``rows`` holds one row per image with the
    columns of :data:`CATEGORICAL` and :data:`NUMERIC`; ``predicted``: images per predicted class
    on held-out data (optional). -> a JSON-able dict ``{"images", "features": {name: spec}}``."""
    missing = [c for c in (*CATEGORICAL, *NUMERIC) if c not in rows.column_names]
    if missing:
        raise ValueError(f"reference profile: the rows lack column(s) {missing}; found {rows.column_names}")
    features: dict[str, Any] = {name: _categorical(_strings(rows, name)) for name in CATEGORICAL}
    features.update({name: _numeric(_floats(rows, name)) for name in NUMERIC})
    if predicted:
        features[PREDICTED_CLASS] = {"kind": "categorical", "bins": [*predicted, OTHER], "counts": [*map(int, predicted.values()), 0]}
    return {"images": rows.num_rows, "features": features}


class DriftCounter:
    """Counts a run's images in the bins of a reference profile. Call it on report batches (it
    counts the ok rows); :meth:`add_classes` takes the predicted-class counts; :meth:`result`
    compares."""

    def __init__(self, reference: dict[str, Any]):
        self.reference = reference
        features = reference.get("features", {})
        self.counts = {name: np.zeros(len(spec["counts"]), np.int64) for name, spec in features.items()}
        self.images = 0

    def __call__(self, table: pa.Table) -> None:
        ok = table.filter(pc.equal(table[C.STATUS], C.STATUS_OK))
        if not ok.num_rows:
            return
        self.images += ok.num_rows
        for name, spec in self.reference.get("features", {}).items():
            if name not in ok.column_names:
                continue
            if spec["kind"] == "numeric":
                self.counts[name] += _bin_numeric(spec, _floats(ok, name))
            else:
                self._add(name, Counter(v if v else MISSING for v in _strings(ok, name)))

    def add_classes(self, counts: dict[str, int]) -> None:
        """Images per predicted class of this run (the task's tally)."""
        if PREDICTED_CLASS in self.counts:
            self._add(PREDICTED_CLASS, Counter({k: int(v) for k, v in counts.items()}))

    def _add(self, name: str, counts: Counter) -> None:
        bins = self.reference["features"][name]["bins"]
        where = {b: i for i, b in enumerate(bins)}
        for value, n in counts.items():
            self.counts[name][where.get(value, len(bins) - 1)] += n

    def result(self, warn_psi: float, min_images: int) -> dict[str, Any]:
        """-> ``{"images", "reference_images", "psi": {feature: PSI}, "shares": {feature: {bin:
        [reference share, run share]}}, "warnings": [...]}`` ({} without a reference profile or
        images). A warning names each feature whose PSI exceeds ``warn_psi``, once the run has at
        least ``min_images`` images."""
        features = self.reference.get("features", {})
        if not features or not self.images:
            return {}
        out: dict[str, Any] = {"images": self.images, "reference_images": self.reference.get("images", 0), "psi": {}, "shares": {},
                               "warnings": []}
        for name, spec in features.items():
            observed = self.counts[name]
            if not observed.sum():
                continue
            expected = np.asarray(spec["counts"], np.float64)
            value = psi(expected, observed)
            out["psi"][name] = round(value, 4)
            out["shares"][name] = {label: [round(float(e), 4), round(float(a), 4)]
                                   for label, e, a in zip(_labels(spec), expected / max(expected.sum(), 1), observed / observed.sum())
                                   if e or a}
            if value > warn_psi and self.images >= min_images:
                out["warnings"].append(f"{name}: PSI {value:.2f} > {warn_psi:g} against the training data ({_largest_shift(out['shares'][name])})")
        return out


def _labels(spec: dict[str, Any]) -> list[str]:
    if spec["kind"] == "categorical":
        return list(spec["bins"])
    edges = spec["edges"]
    if not edges:
        return ["(any)", MISSING]
    fmt = lambda x: f"{x:.4g}"  # noqa: E731
    return [f"< {fmt(edges[0])}", *[f"[{fmt(a)}, {fmt(b)})" for a, b in zip(edges[:-1], edges[1:])], f">= {fmt(edges[-1])}", MISSING]


def _largest_shift(shares: dict[str, list[float]]) -> str:
    label, (e, a) = max(shares.items(), key=lambda kv: abs(kv[1][1] - kv[1][0]))
    return f"largest change: {label} {e:.0%} -> {a:.0%}" if math.isfinite(e) else label
