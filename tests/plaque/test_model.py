"""medhier.plaque.model: base + trees with locally scaled intervals; saved as JSON and UBJSON,
content-hashed, refused when changed."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import xgboost

from medhier.config import CovariateSpec, FactorSpec, StorageConfig
from medhier.plaque.features import FeatureSpace
from medhier.plaque.linear import fit_ridge
from medhier.plaque.model import ModelError, PredictionModel

SPACE = FeatureSpace.from_config(["stenosis_area_pct"], {"statin": CovariateSpec("boolean")})


@pytest.fixture(scope="module")
def model() -> PredictionModel:
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.uniform(10, 50, 300), rng.random(300) < 0.3])
    y = 0.05 * x[:, 0] - 1.0 * x[:, 1] + rng.normal(0, 0.1, 300)
    base = fit_ridge(x, y, 1.0)
    params = {"max_depth": 2, "base_score": 0.0, "seed": 0, "nthread": 1}
    trees = xgboost.train(params, xgboost.DMatrix(x, label=y - base.predict(x), feature_names=SPACE.names), 5)
    scale = xgboost.train(params, xgboost.DMatrix(x, label=np.full(300, 0.1), feature_names=SPACE.names), 5)
    return PredictionModel({"stenosis_change": FactorSpec("stenosis_area_pct")}, SPACE, "ridge", {"stenosis_change": base},
                           {"stenosis_change": bytes(trees.save_raw("ubj"))}, {"stenosis_change": bytes(scale.save_raw("ubj"))},
                           {"stenosis_change": 5}, {"stenosis_change": 2.0}, {"stenosis_change": 0.5}, 0.9, params)


def inputs() -> pa.Table:
    return pa.table({"stenosis_area_pct": [20.0, 40.0, None], "statin": [True, False, None]})


def test_prediction_is_base_plus_trees_with_a_floored_local_interval(model):
    pred = model.predict(inputs())["stenosis_change"]
    x = SPACE.matrix(inputs())
    trees = xgboost.Booster()
    trees.load_model(bytearray(model.boosters["stenosis_change"]))
    np.testing.assert_allclose(pred.value, model.base["stenosis_change"].predict(x) + trees.predict(xgboost.DMatrix(x, feature_names=SPACE.names)))
    np.testing.assert_array_equal(model.point("stenosis_change", x), pred.value)
    # the scale booster predicts about 0.1 everywhere, below the floor 0.5: half-width 2.0 * 0.5
    np.testing.assert_allclose(pred.upper - pred.value, 1.0)
    np.testing.assert_allclose(pred.value - pred.lower, 1.0)
    assert np.isfinite(pred.value).all()  # missing inputs go down the trees' default branches
    assert model.units() == {"stenosis_change": "pp/y"}


def test_save_and_load_give_the_same_model(model, tmp_path):
    model.save(str(tmp_path / "m"), StorageConfig())
    loaded = PredictionModel.load(str(tmp_path / "m"), StorageConfig())
    assert loaded.model_id == model.model_id and len(model.model_id) == 16
    np.testing.assert_array_equal(loaded.predict(inputs())["stenosis_change"].upper, model.predict(inputs())["stenosis_change"].upper)
    assert sorted(p.name for p in (tmp_path / "m" / "boosters").iterdir()) == ["stenosis_change.scale.ubj", "stenosis_change.ubj"]


@pytest.mark.parametrize("damage, error, message", [
    (lambda d: (d / "boosters" / "stenosis_change.ubj").write_bytes((d / "boosters" / "stenosis_change.ubj").read_bytes()[:-7]),
     ModelError, "does not match its model_id"),
    (lambda d: (d / "model.json").write_text((d / "model.json").read_text().replace('"coverage": 0.9', '"coverage": 0.5')),
     ModelError, "does not match its model_id"),
    (lambda d: (d / "boosters" / "stenosis_change.scale.ubj").unlink(), ModelError, "a booster is missing"),
    (lambda d: (d / "model.json").write_text("{not json"), ModelError, "model.json is not JSON"),
    (lambda d: (d / "model.json").unlink(), FileNotFoundError, "no model.json"),
], ids=["truncated-booster", "edited-json", "missing-scale", "not-json", "no-model"])
def test_a_changed_model_is_refused(model, tmp_path, damage, error, message):
    folder = tmp_path / "m"
    model.save(str(folder), StorageConfig())
    damage(folder)
    with pytest.raises(error, match=message):
        PredictionModel.load(str(folder), StorageConfig())
