"""MLflow tracking, read back with MlflowClient from a real server (the session's
``mlflow_server``) or a local folder: a training is one run (its config as params, each epoch's
metrics once, from rank 0, its files and model id) that a re-run continues; a search is a parent
run with one child run per trial; off by default; a missing MLflow names the extra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from medhier.config import ConfigError, load_config
from medhier.train import tracking
from tests.processes import ROOT

SMOKE = str(Path(__file__).parents[2] / "configs" / "smoke.yaml")


def _cfg(*overrides: str):
    return load_config(SMOKE, ["runtime.progress=false", "preprocess.image_size=32", *overrides])


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from medhier.synthetic import spine as synthetic

    root = str(tmp_path_factory.mktemp("tracking-archive"))
    synthetic.generate_archive(root, 40, seed=4, size=32, difficulty=0.1)
    return root


@pytest.fixture()
def experiment():
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize(
    "uri,expected",
    [("", ""), ("http://127.0.0.1:5000", "http://127.0.0.1:5000"), ("mlruns", "sqlite:///{cwd}/mlruns/mlflow.db"),
     ("file:///srv/mlruns", "sqlite:////srv/mlruns/mlflow.db"), ("sqlite:///runs.db", "sqlite:///{cwd}/runs.db")],
)
def test_the_uri_is_a_server_or_an_sqlite_store_at_an_absolute_path(uri, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_uri(load_config(None, [f"tracking.uri={uri}"]).tracking) == expected.format(cwd=tmp_path)


def test_tracking_is_off_by_default_and_writes_nothing(tmp_path):
    assert tracking.start_run(_cfg(), str(tmp_path), task="classify") is None
    tracking.log_results(_cfg(), str(tmp_path), files=("metrics.json",), metrics={"a": 1.0})
    assert list(tmp_path.iterdir()) == []


def test_without_mlflow_a_tracking_uri_fails_naming_the_extra(tmp_path):
    code = (
        "import sys; sys.modules['mlflow'] = None\n"  # as if not installed
        "from medhier.config import load_config, ConfigError\n"
        "from medhier.train import tracking\n"
        f"cfg = load_config(None, ['tracking.uri=http://127.0.0.1:1'])\n"
        "try:\n"
        f"    tracking.start_run(cfg, {str(tmp_path)!r}, task='classify')\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == ("tracking.uri is set but MLflow is not installed: pip install 'medhier[tracking]' "
                                  "(or leave tracking.uri empty)")
    assert issubclass(ConfigError, ValueError)  # the CLI prints it as one line and exits 2


def test_a_local_folder_is_a_store_mlflow_reads(tmp_path, monkeypatch):
    """The driver's and rank 0's calls without Ray, into `tracking.uri: mlruns`."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    cfg = _cfg("tracking.uri=mlruns", "tracking.experiment=local")
    out = tmp_path / "run"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "roc.png").write_bytes(b"\x89PNG")
    run = tracking.start_run(cfg, str(out), task="classify")
    for epoch in range(2):
        tracking.log_epoch(run, {"epoch": epoch, "train_loss": 1.0 / (epoch + 1), "leaf_macro_auc": float("nan"), "improved": True})
    tracking.end_run(run, cfg, str(out), files=("plots",))
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    back = client.get_run(run.run_id)
    assert back.info.status == "FINISHED" and back.data.params["model.arch"] == "resnet18"
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "train_loss")] == [(0, 1.0), (1, 0.5)]
    assert client.get_metric_history(run.run_id, "leaf_macro_auc") == []  # undefined (NaN) epochs are not logged
    assert [a.path for a in client.list_artifacts(run.run_id, "plots")] == ["plots/roc.png"]
    assert Path(tmp_path, "mlruns", "artifacts").is_dir()


def test_a_trial_stopped_by_tune_is_ended_by_the_search_with_tunes_outcome(tmp_path, monkeypatch):
    """Tune stops a trial by raising SystemExit from its next report, even one that already ran
    its last epoch; the trial's own run must not end FAILED for that. The search's driver ends
    it with the outcome Tune recorded, also over a status the trial's process wrote."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    cfg = _cfg("tracking.uri=mlruns", "tracking.experiment=trials")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    parent = tracking.start_run(cfg, str(tmp_path / "search"), task="classify", kind="search")
    trial = tracking.start_run(cfg, str(tmp_path / "trial"), task="classify", parent=parent)
    with pytest.raises(SystemExit):
        with tracking.tracked(trial, cfg, str(tmp_path / "trial"), trial=True):
            raise SystemExit(0)
    assert client.get_run(trial.run_id).info.status == "RUNNING"  # left to the search
    with pytest.raises(RuntimeError):
        with tracking.tracked(trial, cfg, str(tmp_path / "trial"), trial=True):
            raise RuntimeError("a real error in the trial")
    assert client.get_run(trial.run_id).info.status == "FAILED"
    tracking.end_run(trial, cfg, str(tmp_path / "trial"), status="FINISHED", unless_already=True)
    assert client.get_run(trial.run_id).info.status == "FINISHED"
    # an ordinary training that exits is not a trial: its run ends FAILED, not RUNNING
    plain = tracking.start_run(cfg, str(tmp_path / "plain"), task="classify")
    with pytest.raises(SystemExit):
        with tracking.tracked(plain, cfg, str(tmp_path / "plain")):
            raise SystemExit(1)
    assert client.get_run(plain.run_id).info.status == "FAILED"


@pytest.mark.ray
@pytest.mark.slow
def test_a_training_is_one_run_that_a_rerun_continues(mlflow_server, archive, experiment, ray_session, tmp_path):
    from mlflow import MlflowClient

    from medhier.classify.api import fit

    out = str(tmp_path / "run")
    tracked = ["tracking.uri=" + mlflow_server, f"tracking.experiment={experiment}", f"data.cache={tmp_path}/cache"]
    fit(_cfg(*tracked, "train.epochs=1"), archive, out)
    fit(_cfg(*tracked, "train.epochs=2"), archive, out)  # resumes the training, and its run

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    run = runs[0]
    run_id, params, tags = run.info.run_id, run.data.params, run.data.tags
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert (params["train.epochs"], params["model.arch"], params["train.num_workers"]) == ("1", "resnet18", "2")
    assert params["dicom.patient_salt"] in ("<redacted>", "")  # secrets never leave the process
    assert tags["medhier.config_changes"] == "train.epochs: 1 -> 2"
    assert (tags["medhier.task"], tags["medhier.kind"], tags["medhier.output"]) == ("classify", "train", out)
    assert tags["model_id"] == json.loads(Path(out, "best", "meta.json").read_text())["model_id"]
    # two DDP workers, each epoch logged once: by rank 0
    for name in ("leaf_macro_auc", "train_loss", "val_loss", "train_images_per_s", "epoch_seconds"):
        assert [m.step for m in client.get_metric_history(run_id, name)] == [0, 1], name
    assert 0 <= run.data.metrics["test.leaf.accuracy"] <= 1  # the task's evaluation
    files = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "history.json", "metrics.json", "plots"} <= files
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {
        f"plots/{name}.png" for name in ("confusion_leaf", "confusion_main", "reliability_leaf", "reliability_main", "risk_coverage",
                                         "roc_leaf", "roc_main")}
    assert json.loads(Path(out, "tracking.json").read_text())["run_id"] == run_id


@pytest.mark.ray
@pytest.mark.slow
def test_a_search_is_a_parent_run_with_one_child_run_per_trial(mlflow_server, archive, experiment, ray_session, tmp_path):
    from mlflow import MlflowClient

    from medhier.classify.api import tune

    cfg = _cfg(f"tracking.uri={mlflow_server}", f"tracking.experiment={experiment}", "train.epochs=1", "train.num_workers=1",
               "tune.num_samples=2", "tune.max_concurrent_trials=2", "tune.space={train.lr_head: {choice: [0.001, 0.003]}}",
               "tune.seed=3")
    summary = tune(cfg, archive, str(tmp_path / "search"))

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("medhier.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2
    assert sorted(c.info.run_name for c in children) == sorted(t["trial_id"] for t in summary.trials)
    assert sorted(c.data.params["train.lr_head"] for c in children) == sorted(str(t["param:train.lr_head"]) for t in summary.trials)
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, summary.metric)] == [0]
        assert child.info.status == "FINISHED" and child.data.tags["model_id"]
    assert parent.data.tags["best_trial"] == summary.best_trial
    assert parent.data.metrics[f"best_{summary.metric}"] == pytest.approx(summary.best_metric)
    assert parent.data.tags["model_id"] == json.loads(Path(tmp_path, "search", "best", "meta.json").read_text())["model_id"]
    assert {"trials.parquet", "search.png", "best_config.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
