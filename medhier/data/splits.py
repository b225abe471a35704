"""Patient-level splits: a patient's every image lands in one split, so nothing the model is
tested on was seen in training.

Two ways to deal patients (``data.split``):

* ``hash`` (:func:`assign_split`): each patient's split is a hash of its key and the seed
  alone, decided inside the decode task; a patient keeps its split when the archive grows.
* ``stratified`` (:func:`stratified_splits`, the default for labelled data): after decoding,
  patients are dealt like scikit-learn's ``StratifiedGroupKFold``, but towards the configured
  fractions and with one rule first: every class (the labels codec's class, the classifier's
  leaf) is in every split where it has enough patients. A class with k patients is in
  min(k, splits) splits, filled in the order train, test, val (a class must be learnt first,
  then measured); the other patients go, largest first, wherever their classes are furthest
  below the split's share. Deterministic by seed: ties are broken by sha256(seed, patient).
  Adding patients can move others between splits (the cache is rebuilt then anyway).

A patient is its ``patient_key``; without a patient ID, its study, then the object's path
(:func:`split_key`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from medhier import columns as C

__all__ = ["FILL_ORDER", "assign_split", "missing_classes", "split_fractions", "split_key", "stratified_splits"]

FILL_ORDER = ("train", "test", "val")  # who gets a rare class's patients first


def assign_split(key: str, seed: int, train_fraction: float, val_fraction: float) -> str:
    """Deterministic split for a patient key: the same patient always lands in the same split,
    whatever the order or partitioning of the data, so no patient is in two splits."""
    u = _unit(key, seed)
    if u < train_fraction:
        return "train"
    if u < train_fraction + val_fraction:
        return "val"
    return "test"


def split_key(meta: dict[str, Any], path: str) -> str:
    """What decides an object's split: its patient; without a patient ID its study, then its path."""
    return meta.get(C.PATIENT_KEY) or meta.get(C.STUDY_INSTANCE_UID) or path


def split_fractions(train_fraction: float, val_fraction: float) -> dict[str, float]:
    """{split: share of patients} for the splits with a share above 0, in C.SPLITS order."""
    shares = {"train": train_fraction, "val": val_fraction, "test": max(0.0, 1.0 - train_fraction - val_fraction)}
    return {s: f for s, f in shares.items() if f > 1e-9}


def stratified_splits(groups: Sequence[str], classes: Sequence[int], n_classes: int, seed: int, train_fraction: float,
                      val_fraction: float) -> dict[str, str]:
    """Deal patients into splits (see the module docstring).

    ``groups``: (N,) each row's patient (:func:`split_key`); ``classes``: (N,) its class index in
    [0, n_classes), or negative when unlabelled. Patients without a labelled row get their hash
    split (:func:`assign_split`). -> {patient: split}.
    """
    groups = np.asarray(groups, dtype=object)
    classes = np.asarray(classes, dtype=np.int64)
    if groups.shape != classes.shape or groups.ndim != 1:
        raise ValueError(f"stratified_splits: groups and classes must be two (N,) arrays, got {groups.shape} and {classes.shape}")
    if (classes >= n_classes).any():
        raise ValueError(f"stratified_splits: class indices must be < n_classes={n_classes}, found {int(classes.max())}")
    names, row_group = np.unique(groups, return_inverse=True)
    labelled = classes >= 0
    counts = np.zeros((len(names), max(n_classes, 1)), np.int64)
    np.add.at(counts, (row_group[labelled], classes[labelled]), 1)
    out = {str(g): assign_split(str(g), seed, train_fraction, val_fraction) for g, c in zip(names, counts) if not c.any()}
    shares = split_fractions(train_fraction, val_fraction)
    splits = list(shares)
    candidates = [i for i in range(len(names)) if counts[i].any()]
    if not candidates:
        return out
    tiebreak = {i: _unit(str(names[i]), seed) for i in candidates}
    totals = counts[candidates].sum(0).astype(np.float64)
    have = np.zeros((len(splits), counts.shape[1]), np.float64)
    assigned: dict[int, int] = {}

    def put(i: int, s: int) -> None:
        assigned[i] = s
        have[s] += counts[i]

    # Coverage first: rarest class first; each split lacking it takes its smallest patient with it.
    with_class = (counts[candidates] > 0).sum(0)
    for c in sorted(np.flatnonzero(totals), key=lambda c: (with_class[c], c)):
        pool = sorted((i for i in candidates if counts[i, c] and i not in assigned), key=lambda i: (counts[i].sum(), tiebreak[i]))
        for split in (s for s in FILL_ORDER if s in shares):
            s = splits.index(split)
            if have[s, c] == 0 and pool:
                put(pool.pop(0), s)
    # The rest, largest first, where their classes are furthest below the split's share.
    target = np.array([shares[s] for s in splits])[:, None] * totals[None, :]
    weight = np.divide(1.0, totals, out=np.zeros_like(totals), where=totals > 0)
    for i in sorted((i for i in candidates if i not in assigned), key=lambda i: (-counts[i].sum(), tiebreak[i])):
        need = ((target - have) * weight * counts[i]).sum(1)
        put(i, int(np.argmax(need)))
    out.update({str(names[i]): splits[s] for i, s in assigned.items()})
    return out


def missing_classes(split_classes: dict[str, dict[str, int]], class_names: Sequence[str], splits: Sequence[str]) -> dict[str, list[str]]:
    """Classes with labelled images somewhere but none in a split: {split: [class names]} for
    the splits in ``splits`` that lack one ({} when every split has every class)."""
    present = {name for per_class in split_classes.values() for name, n in per_class.items() if n}
    out = {}
    for split in splits:
        lacking = [name for name in class_names if name in present and not split_classes.get(split, {}).get(name)]
        if lacking:
            out[split] = lacking
    return out


def _unit(key: str, seed: int) -> float:
    """sha256(seed, key) as a number in [0, 1)."""
    h = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64
