"""medhier.plaque.intervals: the split-conformal rank rule and its coverage on exchangeable data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medhier.plaque.intervals import conformal_quantile, covered, local_scale


@pytest.mark.parametrize("n, coverage, rank", [(9, 0.9, 9), (19, 0.9, 18), (99, 0.9, 90), (100, 0.8, 81), (39, 0.95, 38)])
def test_the_quantile_is_the_ceil_n_plus_one_rank(n, coverage, rank):
    scores = np.arange(1.0, n + 1)[::-1]  # any order
    assert conformal_quantile(scores, coverage) == rank == math.ceil((n + 1) * coverage)


def test_too_few_validation_pairs_for_the_coverage():
    with pytest.raises(ValueError, match="8 validation pairs cannot give 90% coverage"):
        conformal_quantile(np.ones(8), 0.9)


@pytest.mark.parametrize("coverage", [0.8, 0.9])
def test_heteroscedastic_errors_are_covered_at_the_stated_level_with_a_local_scale(coverage):
    """Errors whose size differs 10x between two kinds of patients: with the true scale as the
    local scale, coverage holds on fresh data for each kind, not only on average."""
    rng = np.random.default_rng(1)
    hits = {0: [], 1: []}
    for _ in range(200):
        kind = rng.random(2000) < 0.25
        sigma = np.where(kind, 1.0, 0.1)
        errors = rng.normal(0, sigma)
        q = conformal_quantile(np.abs(errors[:200]) / local_scale(sigma[:200], 0.01), coverage)
        half = q * sigma[200:]
        inside = covered(errors[200:], -half, half)
        for k in (0, 1):
            hits[k].append(inside[kind[200:] == k].mean())
    for k in (0, 1):
        assert abs(np.mean(hits[k]) - coverage) < 0.02
    assert local_scale(np.array([-1.0, 0.0, 2.0]), 0.5).tolist() == [0.5, 0.5, 2.0]
