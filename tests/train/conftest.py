"""One interrupted, resumed and continued training, shared by the learning and resume tests
(test_loop.py) and the tracking tests (test_tracking.py), and one search, shared by the search
tests (test_tune.py) and the tracking tests: each Ray Train run costs ~40 s of worker start-up
on 2 cores, so the suite runs each once and checks it from every side."""

from __future__ import annotations

import importlib.util
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

SMOKE = str(Path(__file__).parents[2] / "configs" / "smoke.yaml")


class KillWorkerOnce:
    """A test-only training hook: the worker of ``rank`` dies (its process exits) before ``step``
    of ``epoch``, once: a marker file makes the restarted worker group go on."""

    def __init__(self, epoch: int, step: int, rank: int, marker: str):
        self.epoch, self.step, self.rank, self.marker = epoch, step, rank, marker

    def __call__(self, ctx, epoch: int, step: int) -> None:
        if (epoch, step, ctx.env.rank) == (self.epoch, self.step, self.rank) and not os.path.exists(self.marker):
            Path(self.marker).write_text("injected")
            os._exit(1)


@dataclass(frozen=True)
class Resumed:
    output: str
    marker: str
    first: object  # FitResult of `train.epochs=12`, whose worker 1 died before step 1 of epoch 2
    again: object  # FitResult of the re-run with `train.epochs=13` into the same output
    tracking_uri: str  # the MLflow server both runs logged to; "" without MLflow installed
    experiment: str


def _tracking(request) -> tuple[str, str, list[str]]:
    """(the session's MLflow server or "" without MLflow installed, a fresh experiment name, the
    config overrides that track into them)."""
    uri = request.getfixturevalue("mlflow_server") if importlib.util.find_spec("mlflow") else ""
    experiment = f"test-{uuid.uuid4().hex[:8]}"
    return uri, experiment, [f"tracking.uri={uri}", f"tracking.experiment={experiment}"] if uri else []


EPOCHS = 12  # the first run's; the re-run asks for one more
KILLED_AT = (2, 1)  # (epoch, step) before which worker 1 dies, once


@pytest.fixture(scope="session")
def resumed_training(tmp_path_factory, ray_session, request) -> Resumed:
    """``medhier train`` with 2 DDP workers (configs/smoke.yaml) on 200 phantoms, worker 1 killed
    before step 1 of epoch 2, to 12 epochs; then run again with one epoch more into the same
    output. Tracked in the session's MLflow server when MLflow is installed (the training tests
    need no MLflow). Every Ray Train run costs ~40 s of worker start-up on 2 cores: the learning,
    resume and tracking tests all read this one pair."""
    from medhier.classify.api import fit
    from medhier.config import load_config
    from medhier.synthetic import spine as synthetic

    root = tmp_path_factory.mktemp("resumed")
    archive = str(root / "archive")
    synthetic.generate_archive(archive, 200, seed=5, size=96, difficulty=0.1)
    uri, experiment, tracked = _tracking(request)

    def cfg(epochs: int):
        return load_config(SMOKE, ["runtime.progress=false", f"train.epochs={epochs}", *tracked])

    out, marker = str(root / "run"), str(root / "injected-failure")
    first = fit(cfg(EPOCHS), archive, out, hooks=(KillWorkerOnce(*KILLED_AT, 1, marker),))
    again = fit(cfg(EPOCHS + 1), archive, out)
    return Resumed(out, marker, first, again, uri, experiment)


@dataclass(frozen=True)
class Search:
    archive: str
    output: str
    summary: object  # TuneSummary
    leftovers_before: tuple  # placement groups and training actors alive before the search
    tracking_uri: str  # the MLflow server the search logged to; "" without MLflow installed
    experiment: str


def training_leftovers() -> tuple[set[str], set[str]]:
    """Placement groups not removed, and training actors alive, in the session's Ray."""
    import ray
    from ray.util.state import list_actors

    from tests.conftest import session_ray_address

    pgs = {pid for pid, p in ray.util.placement_group_table().items() if p["state"] != "REMOVED"}
    alive = list_actors(address=session_ray_address(), filters=[("state", "=", "ALIVE")])
    return pgs, {a.actor_id for a in alive if a.class_name in ("RayTrainWorker", "TrainController")}


@pytest.fixture(scope="session")
def tiny_search(tmp_path_factory, ray_session, request) -> Search:
    """``medhier tune``: 4 trials of 3 epochs, one at a time, under ASHA, tracked in the session's
    MLflow server when MLflow is installed. Shared by the search tests (test_tune.py) and the
    tracking tests (test_tracking.py).

    The same draws for the same seed: seed 1 draws a 0.5-epoch warm-up first and a 1000-epoch
    one for the three after it, whose learning rate stays under 0.2 % of the configured one for
    the whole search: they stay at chance while the first one learns. ASHA (grace 1, factor 2)
    stops a trial at a rung when it falls in the lower half of the trials that reached that
    rung before it, so the starved trials are stopped at rung 1 or 2."""
    from medhier.classify.api import tune
    from medhier.config import load_config
    from medhier.synthetic import spine as synthetic

    root = tmp_path_factory.mktemp("search")
    archive = str(root / "archive")
    synthetic.generate_archive(archive, 80, seed=21, size=64, difficulty=0.1)
    uri, experiment, tracked = _tracking(request)
    cfg = load_config(SMOKE, [
        "runtime.progress=false", "train.epochs=3", "train.num_workers=1", "data.val_fraction=0.3", "tune.num_samples=4",
        "tune.max_concurrent_trials=1", "tune.grace_period=1", "tune.reduction_factor=2", "tune.seed=1",
        "tune.space={train.warmup_epochs: {choice: [0.5, 1000]}}", *tracked,
    ])
    # the session's earlier tests may still be releasing theirs: only what the search adds counts
    before = training_leftovers()
    output = str(root / "search")
    return Search(archive, output, tune(cfg, archive, output), before, uri, experiment)
