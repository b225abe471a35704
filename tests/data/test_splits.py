"""Stratified patient splits: every class in every split where its patients allow, patients never split, deterministic."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from medhier.data.splits import assign_split, missing_classes, stratified_splits


def _rows(patients_per_class: list[int], seed: int = 0, unlabelled: int = 0):
    """1-3 images per patient, one class per patient -> (groups, classes) row arrays."""
    rng = np.random.default_rng(seed)
    groups, classes = [], []
    for c, n in enumerate(patients_per_class):
        for p in range(n):
            k = int(rng.integers(1, 4))
            groups += [f"c{c}p{p}"] * k
            classes += [c] * k
    for p in range(unlabelled):
        groups.append(f"u{p}")
        classes.append(-1)
    return np.array(groups, dtype=object), np.array(classes)


def _patients_per_split(groups, classes, assignment):
    per = {s: Counter() for s in ("train", "val", "test")}
    for g, c in set(zip(groups.tolist(), classes.tolist())):
        if c >= 0:
            per[assignment[g]][c] += 1
    return per


@pytest.mark.parametrize("patients_per_class, present", [
    # every class has >= 3 patients: every class in every split
    ([30, 12, 8, 3, 3], {"train": {0, 1, 2, 3, 4}, "val": {0, 1, 2, 3, 4}, "test": {0, 1, 2, 3, 4}}),
    # two patients: train and test (a class is learnt first, then measured); one: train only
    ([30, 12, 8, 2, 1], {"train": {0, 1, 2, 3, 4}, "val": {0, 1, 2}, "test": {0, 1, 2, 3}}),
])
def test_every_class_is_in_every_split_its_patients_allow(patients_per_class, present):
    groups, classes = _rows(patients_per_class)
    assignment = stratified_splits(groups, classes, len(patients_per_class), seed=0, train_fraction=0.7, val_fraction=0.15)
    per = _patients_per_split(groups, classes, assignment)
    assert {s: set(c) for s, c in per.items()} == present


def test_shares_follow_the_fractions_for_common_classes():
    groups, classes = _rows([200, 100])
    assignment = stratified_splits(groups, classes, 2, seed=0, train_fraction=0.7, val_fraction=0.15)
    rows = Counter(assignment[g] for g in groups)
    assert rows["train"] / len(groups) == pytest.approx(0.7, abs=0.03)
    assert rows["val"] / len(groups) == pytest.approx(0.15, abs=0.03)
    for c in (0, 1):  # each class keeps its share in every split
        of_class = Counter(assignment[g] for g, k in zip(groups, classes) if k == c)
        assert of_class["train"] / sum(of_class.values()) == pytest.approx(0.7, abs=0.04)


def test_a_patient_is_never_split_and_the_same_seed_deals_the_same():
    groups, classes = _rows([20, 10, 5], unlabelled=5)
    first = stratified_splits(groups, classes, 3, seed=4, train_fraction=0.6, val_fraction=0.2)
    assert first == stratified_splits(groups[::-1], classes[::-1], 3, seed=4, train_fraction=0.6, val_fraction=0.2)
    assert set(first) == set(groups.tolist())  # one split per patient, by construction of the dict
    assert first != stratified_splits(groups, classes, 3, seed=5, train_fraction=0.6, val_fraction=0.2)


def test_patients_without_labels_keep_their_hash_split():
    groups, classes = _rows([10, 10], unlabelled=6)
    assignment = stratified_splits(groups, classes, 2, seed=2, train_fraction=0.7, val_fraction=0.15)
    for g in (f"u{p}" for p in range(6)):
        assert assignment[g] == assign_split(g, 2, 0.7, 0.15)


def test_a_split_with_no_share_gets_no_patient():
    groups, classes = _rows([10, 3])
    assignment = stratified_splits(groups, classes, 2, seed=0, train_fraction=0.8, val_fraction=0.2)
    assert set(assignment.values()) == {"train", "val"}


def test_missing_classes_names_what_a_split_lacks():
    split_classes = {"train": {"a": 5, "b": 2, "c": 1}, "val": {"a": 1, "b": 1}, "test": {"a": 2}}
    assert missing_classes(split_classes, ["a", "b", "c", "d"], ["train", "val", "test"]) == {"val": ["c"], "test": ["b", "c"]}


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="n_classes=2"):
        stratified_splits(["a", "b"], [0, 2], 2, 0, 0.7, 0.15)
    with pytest.raises(ValueError, match="two \\(N,\\) arrays"):
        stratified_splits(["a", "b"], [0], 2, 0, 0.7, 0.15)
