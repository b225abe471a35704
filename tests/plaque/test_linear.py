"""medhier.plaque.linear: the mean predictor and the ridge, kept as arrays (JSON, no pickle)."""

from __future__ import annotations

import numpy as np
import pytest

from medhier.plaque.linear import LinearModel, fit_mean, fit_ridge


@pytest.mark.parametrize("missing", [0.0, 0.2], ids=["complete", "20%-missing"])
def test_ridge_recovers_a_linear_rate_and_imputes_medians(missing):
    rng = np.random.default_rng(0)
    x = rng.normal([65.0, 130.0, 0.0], [10.0, 15.0, 1.0], size=(600, 3))
    y = 0.04 * (x[:, 0] - 65) + 0.025 * (x[:, 1] - 130) + 1.0
    x[rng.random(x.shape) < missing] = np.nan
    model = fit_ridge(x, y, alpha=1e-3)
    complete = ~np.isnan(x).any(axis=1)
    assert np.abs(model.predict(x[complete]) - y[complete]).max() < (1e-3 if not missing else 0.3)
    np.testing.assert_allclose(model.median, np.nanmedian(x, axis=0))
    again = LinearModel.from_dict(model.to_dict())
    np.testing.assert_array_equal(again.predict(x), model.predict(x))


def test_mean_predictor_and_an_all_missing_column():
    x = np.column_stack([np.arange(10.0), np.full(10, np.nan)])
    y = np.arange(10.0) * 2
    assert fit_mean(x, y).predict(x).tolist() == [9.0] * 10
    ridge = fit_ridge(x, y, alpha=1.0)
    assert np.isfinite(ridge.predict(x)).all() and ridge.median[1] == 0.0
