"""The frozen cohort (tests/plaque/data, ``python -m tests.plaque.cohort``) is still what the
phantom generator and the measurements make: a change to either fails here instead of leaving
the prediction model's tests on stale data."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest

from medhier.synthetic import carotid
from tests.plaque.cohort import PATIENTS, PATIENTS_CSV, RATES, SEED, VISITS, build

FIRST = 3  # patients rendered again (~0.2 s of a core per visit)


@pytest.fixture(scope="module")
def rebuilt():
    plans = carotid.plan_plaque_archive(PATIENTS, SEED)[:FIRST]
    return build(plans, workers=1)


@pytest.mark.parametrize("path", [VISITS, RATES], ids=["visits", "rates"])
def test_cohort_still_matches_the_generator(rebuilt, path):
    fresh = pq.read_table(io.BytesIO(rebuilt[path]))
    frozen = pq.read_table(path).slice(0, fresh.num_rows)
    assert fresh.num_rows >= FIRST
    assert fresh.column_names == frozen.column_names
    for name in fresh.column_names:
        assert fresh[name].to_pylist() == pytest.approx(frozen[name].to_pylist(), nan_ok=True) if fresh[name].type != "string" \
            else fresh[name].to_pylist() == frozen[name].to_pylist(), name


def test_cohort_patients_still_match_the_generator(rebuilt):
    fresh = rebuilt[PATIENTS_CSV].decode().splitlines()
    frozen = open(PATIENTS_CSV).read().splitlines()
    assert len(frozen) == PATIENTS + 1
    assert fresh == frozen[: FIRST + 1]
