"""Patient-level splits: a patient's every image lands in one split, whatever the order or the
partitioning of the data, so nothing the model is tested on was seen in training."""

from __future__ import annotations

import hashlib
from typing import Any

from medhier import columns as C

__all__ = ["assign_split", "split_key"]


def assign_split(key: str, seed: int, train_fraction: float, val_fraction: float) -> str:
    """Deterministic split for a patient key: the same patient always lands in the same split,
    whatever the order or partitioning of the data, so no patient is in two splits."""
    h = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    if u < train_fraction:
        return "train"
    if u < train_fraction + val_fraction:
        return "val"
    return "test"


def split_key(meta: dict[str, Any], path: str) -> str:
    """What decides an object's split: its patient; without a patient ID its study, then its path."""
    return meta.get(C.PATIENT_KEY) or meta.get(C.STUDY_INSTANCE_UID) or path
