"""Taxonomy: validation, encodings and the leaf mask the model relies on."""

from __future__ import annotations

import numpy as np
import pytest

from medhier.config import TaxonomyConfig
from medhier.classify.taxonomy import Taxonomy, TaxonomyError

DEMO = Taxonomy.from_config(TaxonomyConfig())


def test_demo_taxonomy_encodings():
    assert DEMO.mains == ("normal", "fracture", "lesion")
    assert DEMO.leaf_names == ("normal/normal", "fracture/compression", "fracture/burst", "lesion/benign", "lesion/malignant")
    assert (DEMO.num_mains, DEMO.num_leaves, DEMO.max_subs) == (3, 5, 2)
    np.testing.assert_array_equal(DEMO.leaf_main, [0, 1, 1, 2, 2])
    np.testing.assert_array_equal(DEMO.leaf_sub, [0, 0, 1, 0, 1])
    np.testing.assert_array_equal(
        DEMO.leaf_mask,
        [[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 1]],
    )
    assert DEMO.encode("fracture", "burst") == (1, 1, 2)
    assert DEMO.decode_leaf(4) == ("lesion", "malignant")
    for leaf, (main, sub) in enumerate(DEMO.leaves):
        assert DEMO.leaf_index(main, sub) == leaf


def test_round_trip_dict():
    again = Taxonomy.from_dict(**DEMO.to_dict())
    assert again == DEMO


def test_severity_rank_defaults_to_config_order_and_can_be_set():
    np.testing.assert_array_equal(DEMO.severity_rank, [0, 1, 2, 3, 4])
    tax = Taxonomy.from_dict(
        {"normal": ["normal"], "lesion": ["benign", "malignant"]},
        severity=["normal/normal", "lesion/benign", "lesion/malignant"][::-1],
    )
    np.testing.assert_array_equal(tax.severity_rank, [2, 1, 0])


INVALID = [
    ({}, "at least one main"),
    ({"a": []}, "at least one subclass"),
    ({"a": ["x", "x"]}, "unique"),
    ({"a/b": ["x"]}, "contain no '/'"),
    ({"a": ["x/y"]}, "contain no '/'"),
    ({"a": "x"}, "list of subclasses"),
]


@pytest.mark.parametrize("classes,message", INVALID)
def test_invalid_hierarchies(classes, message):
    with pytest.raises(TaxonomyError, match=message):
        Taxonomy.from_dict(classes, where="cfg.taxonomy")


def test_unknown_names_are_reported_with_the_known_ones():
    with pytest.raises(TaxonomyError, match=r"unknown subclass 'brust' of 'fracture'; known: \['compression', 'burst'\]"):
        DEMO.encode("fracture", "brust")
    with pytest.raises(TaxonomyError, match="unknown main class 'tumour'"):
        DEMO.encode("tumour", "benign")


def test_severity_must_cover_every_leaf():
    with pytest.raises(TaxonomyError, match="missing"):
        Taxonomy.from_dict({"a": ["x", "y"]}, severity=["a/x"])
