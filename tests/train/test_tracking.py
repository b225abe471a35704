"""MLflow tracking, read back with MlflowClient from a real server (the session's
``mlflow_server``) or a local folder: a training is one run (its config as params, each epoch's
metrics once, from rank 0, its files and model id) that a re-run continues; a search is a parent
run with one child run per trial; off by default; a missing MLflow names the extra."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medhier.config import ConfigError, load_config
from medhier.train import tracking
from tests.processes import ROOT
from tests.train.conftest import EPOCHS

SMOKE = str(Path(__file__).parents[2] / "configs" / "smoke.yaml")


def _cfg(*overrides: str):
    return load_config(SMOKE, ["runtime.progress=false", "preprocess.image_size=32", *overrides])


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
def test_a_training_is_one_run_that_a_rerun_continues(resumed_training):
    """The session's training (tests/train/conftest.py): 12 epochs during which a worker died
    and the worker group restarted, then a re-run to 13 epochs into the same output."""
    pytest.importorskip("mlflow", reason="MLflow is the optional extra medhier[tracking] ('.[dev]' installs it)")
    from mlflow import MlflowClient

    run_out = resumed_training
    client = MlflowClient(run_out.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(run_out.experiment).experiment_id])
    assert len(runs) == 1
    run = runs[0]
    run_id, params, tags = run.info.run_id, run.data.params, run.data.tags
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert (params["train.epochs"], params["model.arch"], params["train.num_workers"]) == (str(EPOCHS), "resnet18", "2")
    assert params["dicom.patient_salt"] in ("<redacted>", "")  # secrets never leave the process
    assert tags["medhier.config_changes"] == f"train.epochs: {EPOCHS} -> {EPOCHS + 1}"
    assert (tags["medhier.task"], tags["medhier.kind"], tags["medhier.output"]) == ("classify", "train", run_out.output)
    assert tags["model_id"] == json.loads(Path(run_out.output, "best", "meta.json").read_text())["model_id"]
    # two DDP workers, each epoch logged once: by rank 0, also across the restarted worker group
    for name in ("leaf_macro_auc", "train_loss", "val_loss", "train_images_per_s", "epoch_seconds"):
        assert [m.step for m in client.get_metric_history(run_id, name)] == list(range(EPOCHS + 1)), name
    assert 0 <= run.data.metrics["test.leaf.accuracy"] <= 1  # the task's evaluation
    files = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "history.json", "metrics.json", "plots"} <= files
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {
        f"plots/{name}.png" for name in ("confusion_leaf", "confusion_main", "reliability_leaf", "reliability_main", "risk_coverage",
                                         "roc_leaf", "roc_main")}
    assert json.loads(Path(run_out.output, "tracking.json").read_text())["run_id"] == run_id


@pytest.mark.ray
@pytest.mark.slow
def test_a_search_is_a_parent_run_with_one_child_run_per_trial(tiny_search):
    """The session's search (tests/train/conftest.py): 4 trials under ASHA, some stopped early."""
    pytest.importorskip("mlflow", reason="MLflow is the optional extra medhier[tracking] ('.[dev]' installs it)")
    from mlflow import MlflowClient

    summary = tiny_search.summary
    client = MlflowClient(tiny_search.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(tiny_search.experiment).experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("medhier.kind") == "search"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert len(runs) == 5 and sorted(children) == sorted(t["trial_id"] for t in summary.trials)
    for trial in summary.trials:
        child = children[trial["trial_id"]]
        assert float(child.data.params["train.warmup_epochs"]) == trial["param:train.warmup_epochs"]
        # each epoch the trial ran, once; a trial ASHA stopped is KILLED, one that ran its epochs FINISHED
        assert [m.step for m in client.get_metric_history(child.info.run_id, summary.metric)] == list(range(trial["epochs"]))
        assert child.info.status == ("KILLED" if trial["stopped_early"] else "FINISHED"), trial
        assert child.data.tags["model_id"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial"] == summary.best_trial
    assert parent.data.metrics[f"best_{summary.metric}"] == pytest.approx(summary.best_metric)
    assert parent.data.tags["model_id"] == json.loads(Path(tiny_search.output, "best", "meta.json").read_text())["model_id"]
    assert {"trials.parquet", "search.png", "best_config.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
