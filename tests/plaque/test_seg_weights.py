"""The segmentation loss's class weights (seg.class_weights) from the training split's voxels per
label: their values, the cap, labels without voxels, and the loss that receives them. No Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medhier.config import ConfigError
from medhier.plaque import labels as L
from medhier.plaque.seg_step import SegStep, class_weights
from medhier.train.loop import Env
from tests.plaque.phantoms import cfg

# background 1, lumen 5, wall 10, lipid_core 100 -> cap 50, haemorrhage absent, calcification 50, cap 20
COUNTS = {"background": 10_000, "lumen": 400, "wall": 100, "lipid_core": 1, "haemorrhage": 0, "calcification": 4, "fibrous_cap": 25}


def test_none_gives_no_weights():
    assert class_weights(COUNTS, "none") is None


def test_inverse_sqrt_weighs_by_the_root_of_the_commonest_labels_voxels_over_the_labels():
    w = class_weights(COUNTS, "inverse_sqrt", max_weight=50)
    raw = np.array([1, 5, 10, 50, 1, 50, 20], dtype=np.float64)  # lipid_core's 100 capped; haemorrhage absent: 1
    assert w.dtype == np.float32 and w.shape == (len(L.NAMES),)
    np.testing.assert_allclose(w, raw / raw[1:].mean(), rtol=1e-6)
    assert w[1:].mean() == pytest.approx(1.0)  # the Dice term (foreground labels) keeps its size
    assert w[L.LIPID] == pytest.approx(w[L.CALCIFICATION])


def test_inverse_sqrt_fg_counts_the_background_as_the_commonest_foreground_label():
    w = class_weights(COUNTS, "inverse_sqrt_fg", max_weight=50)
    raw = np.array([1, 1, 2, 20, 1, 10, 4], dtype=np.float64)  # relative to lumen's 400 voxels
    np.testing.assert_allclose(w, raw / raw[1:].mean(), rtol=1e-6)
    assert w[L.BACKGROUND] == pytest.approx(w[L.LUMEN])
    # a background rarer than the vessel keeps its own count; no foreground: all 1
    few = class_weights({"background": 100, "lumen": 400}, "inverse_sqrt_fg")
    assert few[L.BACKGROUND] == pytest.approx(2 * few[L.LUMEN])
    np.testing.assert_allclose(class_weights({"background": 5}, "inverse_sqrt_fg"), np.ones(len(L.NAMES)), rtol=1e-6)


def test_the_cap_is_relative_to_the_commonest_label():
    w = class_weights(COUNTS, "inverse_sqrt", max_weight=8)
    raw = np.array([1, 5, 8, 8, 1, 8, 8], dtype=np.float64)
    np.testing.assert_allclose(w, raw / raw[1:].mean(), rtol=1e-6)
    flat = class_weights(COUNTS, "inverse_sqrt", max_weight=1)
    np.testing.assert_allclose(flat, np.ones(len(L.NAMES)), rtol=1e-6)


def test_labels_missing_from_the_counts_or_without_voxels_weigh_as_the_commonest_label():
    w = class_weights({"background": 900, "lumen": 100}, "inverse_sqrt")
    raw = np.array([1, 3, 1, 1, 1, 1, 1], dtype=np.float64)
    np.testing.assert_allclose(w, raw / raw[1:].mean(), rtol=1e-6)
    np.testing.assert_allclose(class_weights({}, "inverse_sqrt"), np.ones(len(L.NAMES)), rtol=1e-6)
    assert np.isfinite(class_weights({name: 0 for name in L.NAMES}, "inverse_sqrt")).all()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="mode"):
        class_weights(COUNTS, "inverse")
    with pytest.raises(ValueError, match="max_weight"):
        class_weights(COUNTS, "inverse_sqrt", max_weight=0.5)


def test_the_config_checks_the_option():
    assert cfg("seg.class_weights=none").seg.class_weights == "none"
    with pytest.raises(ConfigError, match="class_weights"):
        cfg("seg.class_weights=balanced")
    with pytest.raises(ConfigError, match="max_class_weight"):
        cfg("seg.max_class_weight=0.5")


@pytest.mark.parametrize("mode", ["none", "inverse_sqrt", "inverse_sqrt_fg"])
def test_the_training_step_hands_the_weights_to_cross_entropy_and_dice(mode):
    env = Env(torch.device("cpu"), None, torch.contiguous_format, 0, 1)
    step = SegStep(cfg(f"seg.class_weights={mode}", "seg.max_class_weight=30"), env, COUNTS)
    ce, dice = step.loss_fn.cross_entropy.weight, step.loss_fn.dice.class_weight
    if mode == "none":
        assert ce is None and dice is None
        return
    expected = torch.from_numpy(class_weights(COUNTS, mode, 30))
    torch.testing.assert_close(ce, expected)
    torch.testing.assert_close(dice, expected[1:])  # include_background=False: Dice over the foreground
    logits = torch.randn(2, len(L.NAMES), 8, 8)
    labels = torch.randint(0, len(L.NAMES), (2, 1, 8, 8))
    assert torch.isfinite(step.loss_fn(logits, labels))
