"""medhier.plaque.features: the model's matrix, and the leakage test: no later-visit value can
reach an example's inputs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from medhier.config import CovariateSpec, StorageConfig, load_config
from medhier.plaque.change import change_factors
from medhier.plaque.features import FeatureSpace, examples
from medhier.plaque.measure import MEASUREMENTS
from medhier.plaque.patients import read_patients
from tests.plaque.cohort import PATIENTS_CSV, frozen


def test_matrix_columns_one_hot_and_missing_values():
    space = FeatureSpace.from_config(["stenosis_area_pct"], {
        "age_years": CovariateSpec("numeric", "years"), "statin": CovariateSpec("boolean"),
        "smoking": CovariateSpec("categorical", "", ["never", "former", "current"]),
    })
    assert space.names == ["stenosis_area_pct", "age_years", "statin", "smoking=never", "smoking=former", "smoking=current"]
    table = pa.table({"stenosis_area_pct": [30.0, None], "age_years": [61.0, 70.0], "statin": [True, None],
                      "smoking": ["current", None]})
    x = space.matrix(table)
    np.testing.assert_array_equal(x[0], [30.0, 61.0, 1.0, 0.0, 0.0, 1.0])
    assert np.isnan(x[1, 0]) and x[1, 1] == 70.0 and np.isnan(x[1, 2]) and np.isnan(x[1, 3:]).all()
    assert FeatureSpace.from_dict(space.to_dict()) == space
    with pytest.raises(ValueError, match=r"the table lacks \['smoking'\]"):
        space.matrix(table.drop_columns(["smoking"]))


@pytest.fixture(scope="module")
def cohort():
    cfg = load_config()
    visits, _ = frozen()
    patients = read_patients(PATIENTS_CSV, cfg.predict.covariates, StorageConfig())
    return cfg, visits, patients


def test_no_later_visit_value_reaches_the_inputs(cohort):
    cfg, visits, patients = cohort
    space = FeatureSpace.from_config(cfg.predict.features, cfg.predict.covariates)
    pairs, _ = change_factors(visits, cfg.predict.factors)
    table, without = examples(pairs, visits, patients, space, cfg.predict.factors)
    assert without == 0 and table.num_rows == pairs.num_rows > 1000

    # Every input equals the earlier visit's own value.
    earlier = {r["study_instance_uid"]: r for r in visits.to_pylist()}
    for row in table.to_pylist()[:200]:
        source = earlier[row["from_study_instance_uid"]]
        assert all(row[m] == source[m] or (row[m] is None and source[m] is None) for m in space.measurements)

    # Change every visit that is never the earlier one of a pair beyond recognition: the inputs
    # stay bit for bit, only the factors (their change) move.
    later_only = set(pairs["to_study_instance_uid"].to_pylist()) - set(pairs["from_study_instance_uid"].to_pylist())
    is_later = pc.is_in(visits["study_instance_uid"], pa.array(sorted(later_only)))
    changed = visits
    for name in MEASUREMENTS:
        i = changed.schema.get_field_index(name)
        scaled = pc.if_else(is_later, pc.add(pc.multiply(pc.cast(changed[name], pa.float64()), 1000.0), 7.0), pc.cast(changed[name], pa.float64()))
        changed = changed.set_column(i, name, scaled)
    pairs2, _ = change_factors(changed, cfg.predict.factors)
    table2, _ = examples(pairs2, changed, patients, space, cfg.predict.factors)
    np.testing.assert_array_equal(space.matrix(table2), space.matrix(table))
    for factor in cfg.predict.factors:
        assert table2[factor] != table[factor], factor


def test_a_pair_whose_patient_has_no_record_is_left_out_and_counted(cohort):
    cfg, visits, patients = cohort
    space = FeatureSpace.from_config(cfg.predict.features, cfg.predict.covariates)
    pairs, _ = change_factors(visits, cfg.predict.factors)
    gone = patients["patient_key"][0].as_py()
    table, without = examples(pairs, visits, patients.filter(pc.not_equal(patients["patient_key"], gone)), space, cfg.predict.factors)
    expected = pairs.filter(pc.equal(pairs["patient_key"], gone)).num_rows
    assert expected >= 1 and without == expected and table.num_rows == pairs.num_rows - expected
