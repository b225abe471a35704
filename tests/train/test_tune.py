"""Ray Tune search: space validation, concurrency, ASHA, outputs, and nothing left behind."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from medhier.config import ConfigError, load_config
from medhier.train.tune import max_concurrent_trials, search_space
from tests.train.conftest import training_leftovers

SMOKE = str(Path(__file__).parents[2] / "configs" / "smoke.yaml")


def _cfg(*overrides: str):
    return load_config(SMOKE, ["runtime.progress=false", *overrides])


BAD_SPACES = [
    ("{model.finetune_depth: {choice: [0, 7]}}", "tune.space.model.finetune_depth: value 7"),
    ("{train.lr_head: {loguniform: [0, 0.1]}}", "tune.space.train.lr_head.loguniform: bounds must be > 0"),
    ("{train.lr_head: {uniform: [0.1]}}", "tune.space.train.lr_head.uniform: expected [low, high]"),
    ("{train.lr_hed: {uniform: [0.1, 0.2]}}", "tune.space.train.lr_hed: not a tunable config key"),
    ("{model.attention: {choice: [self, transformer]}}", "tune.space.model.attention: value 'transformer'"),
    ("{train.lr_head: {gaussian: [0.1, 0.2]}}", "tune.space.train.lr_head: expected one of"),
    ("{}", "tune.space: empty"),
]


@pytest.mark.parametrize("space,message", BAD_SPACES)
def test_a_bad_search_space_fails_at_start_up_naming_the_key(space, message):
    with pytest.raises(ConfigError) as info:
        search_space(_cfg(f"tune.space={space}"))
    assert message in str(info.value)


def test_the_space_from_yaml_becomes_tune_domains():
    from ray.tune.search.sample import Categorical, Float

    space = search_space(_cfg("tune.space={model.finetune_depth: {choice: [0, 4]}, train.lr_head: {loguniform: [1.0e-4, 1.0e-2]}}"))
    assert isinstance(space["model.finetune_depth"], Categorical) and space["model.finetune_depth"].categories == [0, 4]
    assert isinstance(space["train.lr_head"], Float) and (space["train.lr_head"].lower, space["train.lr_head"].upper) == (1e-4, 1e-2)


@pytest.mark.parametrize(
    "resources,overrides,expected",
    [
        ({"CPU": 8}, [], 3),  # 2 workers x 1 CPU, a quarter of the CPUs kept for Ray Data
        ({"CPU": 3}, [], 1),
        ({"CPU": 64, "GPU": 8}, [], 4),  # by GPUs: 8 GPUs / 2 workers
        ({"CPU": 64, "GPU": 8}, ["train.num_workers=8"], 1),
        ({"CPU": 64, "GPU": 8}, ["train.use_gpu=false", "train.cpus_per_worker=4"], 6),
        ({"CPU": 8}, ["tune.max_concurrent_trials=5"], 5),
    ],
)
def test_max_concurrent_trials_follows_the_cluster_and_the_trials_needs(resources, overrides, expected):
    assert max_concurrent_trials(_cfg(*overrides), resources) == expected


@pytest.mark.ray
@pytest.mark.slow
def test_tiny_search_records_every_trial_stops_some_early_and_leaves_nothing(tiny_search, tmp_path):
    """The session's search (tests/train/conftest.py): 4 trials, the first learning, the three
    after it starved of learning rate, under ASHA."""
    out, summary = tiny_search.output, tiny_search.summary
    trials = pq.read_table(Path(out, "trials.parquet")).to_pylist()
    assert len(trials) == 4 and all(t["status"] == "TERMINATED" for t in trials)
    assert any(t["stopped_early"] for t in trials), trials
    assert all(1 <= t["epochs"] <= 3 and t["best_metric"] > 0 for t in trials)
    assert all(t["epochs"] == 3 for t in trials if not t["stopped_early"])
    assert Path(out, "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = max(trials, key=lambda t: t["best_metric"])
    assert summary.best_trial == best["trial_id"] and best["param:train.warmup_epochs"] == 0.5
    assert load_config(str(Path(out, "best_config.yaml"))).train.warmup_epochs == 0.5

    # the best checkpoint is ready for scoring
    from medhier.classify.score import score

    scored = score(_cfg(), tiny_search.archive, str(Path(out, "best")), str(tmp_path / "scores"))
    assert scored.files == 80 and scored.images_ok == 80

    # no placement group or training actor outlives the search (Ray issue 54305)
    deadline = time.time() + 60
    while time.time() < deadline:
        pgs, actors = (now - before for now, before in zip(training_leftovers(), tiny_search.leftovers_before))
        if not pgs and not actors:
            break
        time.sleep(2)
    assert not pgs, pgs
    assert not actors, actors
