"""Calibration: tempering equals dividing the logits, fitting recovers a known temperature, ECE as MONAI defines it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medhier.classify.calibration import Temperatures, calibration_errors, fit_temperatures, reliability_png, temper
from medhier.classify.model import build_model
from medhier.classify.taxonomy import Taxonomy
from medhier.config import ModelConfig

TAX = Taxonomy.from_dict({"normal": ["normal"], "fracture": ["compression", "burst"], "lesion": ["benign", "malignant"]})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="resnet18", pretrained="none", head_channels=16, hidden=16), TAX).eval()


BIASED = Temperatures(0.7, (1.0, 3.0, 0.5), main_bias=(0.8, -1.5, 0.7), sub_bias=(0.0, 0.4, -0.4, -2.0, 2.0))


@pytest.mark.parametrize("t", [Temperatures(1.0, 1.0), Temperatures(2.5, 0.4), Temperatures(0.7, (1.0, 3.0, 0.5)), BIASED])
def test_tempered_probabilities_are_the_softmax_of_divided_logits(model, t):
    with torch.no_grad():
        main_logits, leaf_logits = model.logits(model.trunk(torch.randn(64, 3, 32, 32)))
        own = model.outputs(main_logits, leaf_logits)
        sub = torch.as_tensor(t.sub, dtype=torch.float32).reshape(-1).expand(TAX.num_mains)[torch.as_tensor(TAX.leaf_main)]
        main_b, sub_b = (torch.tensor(b if b else [0.0] * n) for b, n in ((t.main_bias, 3), (t.sub_bias, 5)))
        expected = model.outputs(main_logits / t.main + main_b, leaf_logits / sub + sub_b)
    log_p_main, log_p_sub, log_p_leaf = temper(own.log_p_main, own.log_p_sub, t, TAX)
    torch.testing.assert_close(log_p_main, expected.log_p_main, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_p_sub, expected.log_p_sub, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_p_leaf.exp().sum(1), torch.ones(64), atol=1e-5, rtol=0)
    if t.main_bias is None:  # a temperature never moves the argmax: predictions and accuracy are the model's own
        assert torch.equal(log_p_main.argmax(1), own.log_p_main.argmax(1))
    else:  # biases of this size do
        assert not torch.equal(log_p_main.argmax(1), own.log_p_main.argmax(1))


def test_biases_of_the_wrong_length_are_refused(model):
    with torch.no_grad():
        own = model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="'sub_bias' needs 5 values, got 3"):
        temper(own.log_p_main, own.log_p_sub, Temperatures(1.0, 1.0, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)), TAX)


def test_no_temperatures_leave_the_model_s_probabilities(model):
    with torch.no_grad():
        own = model(torch.randn(3, 3, 32, 32))
    _, _, log_p_leaf = temper(own.log_p_main, own.log_p_sub, None, TAX)
    torch.testing.assert_close(log_p_leaf, own.log_p_leaf)


def _draw(rng, n, truth):
    """Model outputs z (N, 3) and (N, 5) and labels drawn from the probabilities ``truth`` makes of them."""
    z_main, z_leaf = rng.normal(0, 2.0, (n, 3)), rng.normal(0, 2.0, (n, 5))
    log_p_main = torch.log_softmax(torch.from_numpy(z_main), 1).numpy()
    log_p_sub = temper(torch.from_numpy(log_p_main), torch.from_numpy(z_leaf), Temperatures(1.0, 1.0), TAX)[1].double().numpy()
    p_main, p_sub = (temper(torch.from_numpy(log_p_main), torch.from_numpy(log_p_sub), truth, TAX)[i].exp().double().numpy() for i in (0, 1))
    main = np.array([rng.choice(3, p=p / p.sum()) for p in p_main])
    leaf = np.array([rng.choice(np.flatnonzero(TAX.leaf_mask[m]), p=p_sub[i, TAX.leaf_mask[m]] / p_sub[i, TAX.leaf_mask[m]].sum())
                     for i, m in enumerate(main)])
    return log_p_main, log_p_sub, main, leaf


@pytest.mark.parametrize("t_main, t_sub", [(2.0, 0.5), (0.6, 1.8)])
def test_fitting_recovers_the_temperature_that_made_the_labels(t_main, t_sub):
    """Labels drawn from softmax(z / T0): the NLL-optimal temperature on z is T0."""
    fitted = fit_temperatures(*_draw(np.random.default_rng(1), 6000, Temperatures(t_main, t_sub)), TAX)
    assert fitted.main == pytest.approx(t_main, rel=0.1)
    assert fitted.sub == pytest.approx(t_sub, rel=0.1)


def test_class_biases_undo_a_shift_no_temperature_can():
    """What balanced class weights do to a model: its probabilities over-predict the rare
    classes (here the truth is the model's logits plus (1, -2, 1) for the main classes and
    +-1.5, +-1 within the subclasses). Fitting with biases recovers the shift and halves the
    calibration error on new images; one temperature per level leaves the class-wise error."""
    rng = np.random.default_rng(3)
    truth = Temperatures(1.0, 1.0, main_bias=(1.0, -2.0, 1.0), sub_bias=(0.0, 1.5, -1.5, -1.0, 1.0))
    fit, new = _draw(rng, 4000, truth), _draw(rng, 4000, truth)
    biased = fit_temperatures(*fit, TAX, bias=True)
    assert biased.main == pytest.approx(1.0, rel=0.1) and biased.sub == pytest.approx(1.0, rel=0.1)
    np.testing.assert_allclose(biased.main_bias, truth.main_bias, atol=0.15)
    np.testing.assert_allclose(biased.sub_bias, truth.sub_bias, atol=0.15)  # zero-mean within each main class, as drawn
    plain = fit_temperatures(*fit, TAX)
    assert plain.main_bias is None and plain.sub_bias is None
    log_p_main, log_p_sub, main, leaf = new

    def errors(t):
        lm, _, ll = temper(torch.from_numpy(log_p_main), torch.from_numpy(log_p_sub), t, TAX)
        return calibration_errors(lm.exp().numpy(), main), calibration_errors(ll.exp().numpy(), leaf)

    for before, with_bias, temperature_only in zip(errors(None), errors(biased), errors(plain)):
        assert with_bias["ece"] <= max(0.5 * before["ece"], 0.03), (before, with_bias)
        assert with_bias["classwise_ece"] <= 0.5 * before["classwise_ece"], (before, with_bias)
        assert temperature_only["classwise_ece"] > 2 * with_bias["classwise_ece"], (temperature_only, with_bias)


def test_a_level_with_nothing_to_fit_keeps_one():
    only_normal = np.zeros(4, np.int64)
    fitted = fit_temperatures(np.log(np.full((4, 3), 1 / 3)), np.zeros((4, 5)), only_normal, only_normal, TAX)
    assert fitted.sub == 1.0


# Four images, two classes, bins [0, .5) and [.5, 1]. Top label: confidences .9 (right), .8
# (wrong), .6 (right), .7 (right) all fall in the upper bin: accuracy .75 = mean confidence .75,
# ECE 0. Class-wise: class 0's probabilities .9 .2 .6 .3 (outcomes 1 1 1 0) give gaps |.5 - .25|
# and |1 - .75| in the two bins, .25; class 1's .1 .8 .4 .7 (0 0 0 1) the same: mean .25.
@pytest.mark.parametrize("p, y, bins, ece, classwise", [
    ([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], [0, 0, 0, 1], 2, 0.0, 0.25),
    # always 100 % sure and always right: perfectly calibrated
    ([[1.0, 0.0], [0.0, 1.0]], [0, 1], 15, 0.0, 0.0),
    # always 100 % sure and always wrong
    ([[1.0, 0.0], [0.0, 1.0]], [1, 0], 15, 1.0, 1.0),
])
def test_ece_by_hand(p, y, bins, ece, classwise):
    errors = calibration_errors(np.array(p), np.array(y), bins)
    assert errors == {"ece": pytest.approx(ece, abs=1e-9), "classwise_ece": pytest.approx(classwise, abs=1e-9)}


@pytest.mark.parametrize("raw, message", [
    ({"main": 0.0, "sub": 1.0}, "finite and > 0"),
    ({"main": 1.0}, "{'main': T, 'sub'"),
    ({"main": 1.0, "sub": [1.0, float("nan")]}, "finite and > 0"),
    ({"main": 1.0, "sub": 1.0, "main_bias": [0.0, float("inf"), 0.0]}, "biases must be finite"),
    ({"main": 1.0, "sub": 1.0, "sub_bias": "warm"}, "'sub_bias': [one per leaf]"),
])
def test_bad_temperatures_in_a_checkpoint_are_refused(raw, message):
    with pytest.raises(ValueError, match="ckpt-x") as err:
        Temperatures.from_meta({"temperatures": raw}, "ckpt-x")
    assert message in str(err.value)


def test_temperatures_with_biases_survive_the_checkpoint_s_json():
    assert Temperatures.from_meta({"temperatures": json.loads(json.dumps(BIASED.to_dict()))}) == BIASED
    assert set(Temperatures(2.0, 0.5).to_dict()) == {"main", "sub"}


def test_reliability_png_is_a_png(tmp_path):
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), 50)
    path = reliability_png(tmp_path / "r.png", "Main class", {"before": (p, rng.integers(0, 3, 50)), "after": (p, rng.integers(0, 3, 50))})
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
