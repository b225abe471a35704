"""``medhier plaque train-seg`` on phantoms: the model trained through the platform's harness, its
self-describing checkpoint, and its held-out evaluation (one training per session: seg_run)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from medhier.classify.task import CLASSIFY
from medhier.config import ConfigError
from medhier.data.cache import CacheInfo
from medhier.plaque import labels as L
from medhier.plaque.seg_task import PLAQUE_SEG
from medhier.train.checkpoint import CheckpointError, load_checkpoint
from medhier.train.progress import EpochLines, epoch_line
from tests.plaque.seg_trained import EPOCHS, seg_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # one session-wide training (~2-3 min on 2 busy cores)

# Held-out targets the issue sets for the lumen and the outer wall. The plaque components'
# target (0.6) is not reachable with a CI-sized training (measured figures in metrics.json and
# the report), so it is not asserted here.
TARGETS = [("lumen", 0.85), ("outer_wall", 0.85), ("vessel_wall", 0.7)]


def metrics(seg_run) -> dict:
    with open(os.path.join(seg_run.output, "metrics.json")) as f:
        return json.load(f)


def test_training_ran_every_epoch_through_the_harness(seg_run):
    with open(os.path.join(seg_run.output, "history.json")) as f:
        history = json.load(f)
    assert [r["epoch"] for r in history] == list(range(EPOCHS))
    assert seg_run.result.epochs_run == EPOCHS
    # the task's own validation metric picked best/, and the loss fell
    best = max(history, key=lambda r: r["val_dice"])
    assert seg_run.result.best_epoch == best["epoch"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 2


def test_the_cache_holds_every_slice_of_every_usable_visit_split_by_patient(seg_run):
    info = CacheInfo.read(os.path.join(seg_run.output, "cache"), seg_run.cfg.storage)
    summary = seg_run.phantom.summary
    samples = info.samples()
    assert sum(samples.values()) == info.counts["ok"] == 10 * info.counts["studies"]  # 10 slices per visit
    assert info.counts["studies"] == summary.visits
    # the broken patient's folder is a study of its own without a truth SEG: one error row, no samples
    assert info.counts["reasons"] == {"no_segmentation": 1}
    assert samples["val"] and samples["test"] and samples["train"] > samples["val"] + samples["test"]
    assert info.counts["split_classes"]["train"]["lumen"] > 0


def test_the_checkpoint_describes_the_model(seg_run):
    loaded = load_checkpoint(seg_run.checkpoint, PLAQUE_SEG, seg_run.cfg.storage)
    meta = loaded.task_meta
    assert loaded.task == "plaque-seg" and len(loaded.model_id) == 16
    assert meta["labels"] == {str(v): name for v, name in enumerate(L.NAMES)}
    assert meta["sequences"] == ["T1w", "T2w", "TOF", "CE-T1w"] and meta["reference"] == "T1w"
    assert (meta["spacing_mm"], meta["image_size"], meta["input_channels"]) == (0.5, 64, 4)
    assert meta["normalisation"]["percentiles"] == [1.0, 99.0]
    assert loaded.cfg.seg.channels == [8, 16, 32, 64]  # the model section travels with the weights
    with pytest.raises(CheckpointError, match="plaque-seg"):
        load_checkpoint(seg_run.checkpoint, CLASSIFY, seg_run.cfg.storage)


@pytest.mark.parametrize("override, key", [("seg.image_size=32", "image_size"), ("seg.context=1", "context"),
                                            ("seg.sequences=[T1w,T2w]", "sequences")])
def test_a_cache_made_for_other_inputs_is_refused_naming_the_setting(seg_run, override, key):
    info = CacheInfo.read(os.path.join(seg_run.output, "cache"), seg_run.cfg.storage)
    with pytest.raises(ConfigError, match=key):
        PLAQUE_SEG.check_cache(info, seg_config(override))


@pytest.mark.parametrize("structure, target", TARGETS)
def test_held_out_patients_are_segmented_well(seg_run, structure, target):
    m = metrics(seg_run)
    assert m["split"] == "test" and m["visits"] >= 1
    assert m["dice"][structure]["n"] == m["visits"]
    assert m["dice"][structure]["mean"] >= target, f"{structure}: Dice {m['dice'][structure]['mean']:.3f}"
    assert m["hd95_mm"][structure]["mean"] < 2.0  # mm: four pixels


def test_the_model_does_not_predict_only_background(seg_run):
    confusion = np.array(metrics(seg_run)["confusion"]["voxels"])
    truth, predicted = confusion.sum(1), confusion.sum(0)
    for label in (L.LUMEN, L.WALL):
        assert truth[label] > 0
        # as many voxels as the truth has, within a third: an all-background model gives 0
        assert 0.67 < predicted[label] / truth[label] < 1.5, f"{L.NAMES[label]}: {predicted[label]} of {truth[label]}"


def test_the_evaluation_writes_its_figures_and_measurement_errors(seg_run):
    m = metrics(seg_run)
    plots = os.path.join(seg_run.output, "plots")
    for name in ("overlays.png", "bland_altman.png"):
        with open(os.path.join(plots, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert np.array(m["confusion"]["voxels"]).sum() == 10 * 64 * 64 * m["visits"]  # every test voxel once
    lumen = m["measurements"]["lumen_volume_mm3"]
    assert lumen["n"] == m["visits"] and lumen["mean_rel_error"] < 0.15
    assert lumen["limits_of_agreement"][0] <= lumen["bias"] <= lumen["limits_of_agreement"][1]
    assert m["model_id"] == load_checkpoint(seg_run.checkpoint, PLAQUE_SEG, seg_run.cfg.storage).model_id


def test_the_epoch_lines_show_the_tasks_own_metric(seg_run):
    lines = EpochLines(seg_run.cfg, seg_run.output, metric=PLAQUE_SEG.metric(seg_run.cfg))
    assert lines.metric == "val_dice"  # not train.metric, the classifier's
    with open(os.path.join(seg_run.output, "history.json")) as f:
        printed = [epoch_line(r, EPOCHS, lines.metric, 1.0, 1.0) for r in json.load(f)]
    assert all(re.search(r"val val_dice \d\.\d+", line) for line in printed), printed[:2]
