"""Experiment tracking with MLflow: every training and every search as an MLflow run, logged by
the harness itself (Ray Train V2 has no MLflow callback). Off unless ``tracking.uri`` is set;
needs the optional extra ``medhier[tracking]``.

    driver   start_run: resolved config as params, tags (task, output) ─▶ OUTPUT/tracking.json
    rank 0   log_epoch after each epoch: the epoch's metrics at step = epoch
    driver   end_run: config.yaml, history.json, the model id of best/ as a tag; status
    task     log_results: what the task made of the run (test metrics, metrics.json, plots/,
             a model card where it writes one)

A Tune search is a parent run (its trials.parquet, search.png, best_config.yaml, the best
trial and model id) with one child run per trial. ``OUTPUT/tracking.json`` names the run of an
output: a re-run with the same output (a resumed training, ``medhier tune --resume``, a restarted
worker group) continues that run, never a new one. Parameters are immutable in MLflow: a resumed
run whose config changed keeps the first values and records the changes in the tag
``medhier.config_changes``.

``tracking.uri``: ``http(s)://host:port`` (an MLflow server: the only choice on a multi-node
cluster, where workers do not share the driver's disk), ``sqlite:///path.db``, or a local folder
(e.g. ``mlruns``): an SQLite store ``mlruns/mlflow.db`` with artifacts in ``mlruns/artifacts``
(MLflow 3 keeps its plain-file store in maintenance mode and refuses it by default). Browse it
with ``mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from medhier.config import Config, ConfigError, TrackingConfig
from medhier.io import storage
from medhier.stopping import Stopped

__all__ = ["RUN_FILE", "TrackedRun", "end_run", "log_epoch", "log_results", "resolve_uri", "run_of", "start_run", "tracked"]

log = logging.getLogger(__name__)

RUN_FILE = "tracking.json"  # in OUTPUT: the MLflow run of this output
_MAX_BATCH = 100  # MLflow's limit of params (and of tags) in one log_batch call
_MAX_PARAM = 6000  # characters in one param value (MLflow 3)
_CLIENTS: dict[str, Any] = {}  # one client per store and process: opening an SQLite store checks its schema


@dataclass(frozen=True)
class TrackedRun:
    """An MLflow run: where its store is and its id (picklable: it travels to the workers)."""

    uri: str
    run_id: str
    experiment_id: str


def resolve_uri(cfg: TrackingConfig) -> str:
    """``tracking.uri`` as MLflow takes it: a local folder becomes an absolute ``sqlite:///``
    store inside it (workers may not share the driver's working directory); '' when off."""
    uri = cfg.uri.strip()
    if not uri or uri.startswith(("http://", "https://")):
        return uri
    if uri.startswith("sqlite:///"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    folder = os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)
    return f"sqlite:///{folder}/mlflow.db"


def _client(uri: str):
    try:
        from mlflow import MlflowClient  # optional (medhier[tracking]), and seconds to import: only when tracking is on
    except ImportError:
        raise ConfigError("tracking.uri is set but MLflow is not installed: pip install 'medhier[tracking]' "
                          "(or leave tracking.uri empty)") from None
    if uri not in _CLIENTS:
        if uri.startswith("sqlite:///"):  # a local store: its folder is made on first use
            os.makedirs(os.path.dirname(uri[len("sqlite:///"):]), exist_ok=True)
        _CLIENTS[uri] = MlflowClient(tracking_uri=uri)
    return _CLIENTS[uri]


def _artifact_root(uri: str) -> str | None:
    """A local store keeps its artifacts beside it; a server decides for itself."""
    if uri.startswith("sqlite:///"):
        return "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "artifacts")
    return None


def start_run(cfg: Config, output: str, *, task: str, kind: str = "train", parent: TrackedRun | None = None,
              name: str = "") -> TrackedRun | None:
    """The MLflow run of ``output``: the one named in ``OUTPUT/tracking.json`` (resumed:
    status back to RUNNING), else a new one with the resolved config (secrets redacted) as
    params. ``kind``: train | search; ``parent``: the search a trial belongs to. -> None when
    tracking is off. Driver only."""
    uri = resolve_uri(cfg.tracking)
    if not uri:
        return None
    client = _client(uri)
    params = _flatten(cfg.to_public_dict())
    previous = run_of(output, cfg)
    if previous is not None and previous.uri == uri and _exists(client, previous.run_id):
        client.update_run(previous.run_id, status="RUNNING")
        _log_changed_params(client, previous.run_id, params)
        return previous
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    experiment_id = (experiment.experiment_id if experiment is not None else
                     client.create_experiment(cfg.tracking.experiment, artifact_location=_artifact_root(uri)))
    tags = {"medhier.task": task, "medhier.kind": kind, "medhier.output": output}
    if parent is not None:
        tags["mlflow.parentRunId"] = parent.run_id
    run = client.create_run(experiment_id, tags=tags, run_name=name or os.path.basename(output.rstrip("/")))
    tracked = TrackedRun(uri, run.info.run_id, experiment_id)
    # recorded before anything else: a run killed from here on is continued, not duplicated
    storage.write_text(storage.join(output, RUN_FILE), json.dumps({"uri": uri, "run_id": tracked.run_id,
                                                                   "experiment_id": experiment_id}), cfg.storage)
    _log_params(client, tracked.run_id, params)
    return tracked


def run_of(output: str, cfg: Config) -> TrackedRun | None:
    """The run recorded in ``OUTPUT/tracking.json``, or None."""
    try:
        data = json.loads(storage.read_bytes(storage.join(output, RUN_FILE), cfg.storage))
    except FileNotFoundError:
        return None
    return TrackedRun(data["uri"], data["run_id"], data["experiment_id"])


def log_epoch(run: TrackedRun | None, record: Mapping[str, Any]) -> None:
    """One finished epoch's numbers (losses, validation metrics, images/s, seconds) as metrics
    at ``step = epoch``. Rank 0 only, once per epoch (an epoch run again after a worker died
    between this and its checkpoint is logged again at the same step)."""
    if run is None:
        return
    from mlflow.entities import Metric  # optional extra: only when tracking is on

    step, now = int(record["epoch"]), int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, step) for k, v in record.items()
               if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)]
    try:
        _client(run.uri).log_batch(run.run_id, metrics=metrics)
    except Exception as exc:  # MLflow down: training goes on, the epoch is in history.json
        log.warning("MLflow (%s): epoch %d not logged: %s", run.uri, step, exc)


@contextmanager
def tracked(run: TrackedRun | None, cfg: Config, output: str, files: Iterable[str] = (), *, trial: bool = False) -> Iterator[None]:
    """End ``run`` with the block: FINISHED with ``files`` logged, KILLED on a stop signal,
    FAILED on an error (the error goes on; a tracking failure then is only logged).

    ``trial``: the block is a Tune trial, which Tune stops by raising SystemExit in it (from the
    trial's next report, even after its last epoch): that run is left to the search's driver,
    which ends it with the outcome Tune recorded (``tune._end_trial_runs``)."""
    try:
        yield
    except BaseException as exc:
        if trial and isinstance(exc, SystemExit):
            raise
        try:
            end_run(run, cfg, output, status="KILLED" if isinstance(exc, (Stopped, KeyboardInterrupt)) else "FAILED")
        except Exception as tracking_error:  # the run's own error matters more
            log.warning("MLflow (%s): run not ended: %s", run.uri if run else "", tracking_error)
        raise
    end_run(run, cfg, output, files=files)


def end_run(run: TrackedRun | None, cfg: Config, output: str, *, status: str = "FINISHED", files: Iterable[str] = (),
            tags: Mapping[str, str] | None = None, metrics: Mapping[str, float] | None = None, unless_already: bool = False) -> None:
    """Log ``files`` (paths under ``output``; a folder logs what it holds), ``tags`` and final
    ``metrics``; the model id of ``output/best`` as the tag ``model_id`` where it exists; then
    set ``status`` (FINISHED, FAILED, KILLED). ``unless_already``: nothing when the run already
    ended with ``status``. A search's driver knows each trial's outcome; the trial's own process
    may not have ended its run (Tune ends a stopped trial's process) or may have ended it wrongly
    (FAILED, when Tune tears down a trial that already reported its last epoch). Driver only."""
    if run is None:
        return
    client = _client(run.uri)
    if unless_already and client.get_run(run.run_id).info.status == status:
        return
    all_tags = dict(tags or {})
    meta = storage.join(output, "best", "meta.json")
    if storage.exists(meta, cfg.storage):
        all_tags.setdefault("model_id", json.loads(storage.read_bytes(meta, cfg.storage)).get("model_id", ""))
    _log(client, run, cfg, output, files, all_tags, metrics or {})
    client.set_terminated(run.run_id, status=status)


def log_results(cfg: Config, output: str, *, files: Iterable[str] = (), metrics: Mapping[str, Any] | None = None,
                tags: Mapping[str, str] | None = None) -> None:
    """What a task made of a finished training (its evaluation) or a search of its outcome:
    ``metrics`` (nested dicts are flattened to dotted names; numbers only), ``tags``, and
    ``files`` under ``output`` (metrics.json, plots/, a model card), logged to the run of
    ``output``. A no-op when tracking is off."""
    run = run_of(output, cfg) if resolve_uri(cfg.tracking) else None
    if run is None:
        return
    numbers = {k: float(v) for k, v in _flatten(metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    _log(_client(run.uri), run, cfg, output, files, tags or {}, {k: v for k, v in numbers.items() if not math.isnan(v)})


# -- internals -------------------------------------------------------------------------------


def _exists(client, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except Exception:  # MlflowException: deleted from the store, or another store
        return False


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and all(isinstance(k, str) for k in value):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:_MAX_PARAM]


def _log_params(client, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param  # optional extra: only when tracking is on

    items = [Param(k, _param(v)) for k, v in sorted(params.items())]
    for i in range(0, len(items), _MAX_BATCH):
        client.log_batch(run_id, params=items[i:i + _MAX_BATCH])


def _log_changed_params(client, run_id: str, params: Mapping[str, Any]) -> None:
    """A resumed run: new keys become params; changed values (MLflow refuses to overwrite a
    param) are listed in the tag ``medhier.config_changes``."""
    logged = client.get_run(run_id).data.params
    new = {k: v for k, v in params.items() if k not in logged}
    changed = [f"{k}: {logged[k]} -> {_param(v)}" for k, v in sorted(params.items()) if k in logged and logged[k] != _param(v)]
    if new:
        _log_params(client, run_id, new)
    if changed:
        client.set_tag(run_id, "medhier.config_changes", "; ".join(changed)[:_MAX_PARAM])


def _log(client, run: TrackedRun, cfg: Config, output: str, files: Iterable[str], tags: Mapping[str, str],
         metrics: Mapping[str, float]) -> None:
    from mlflow.entities import Metric, RunTag  # optional extra: only when tracking is on

    now = int(time.time() * 1000)
    tag_items = [RunTag(k, str(v)) for k, v in tags.items()]
    metric_items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for i in range(0, max(len(tag_items), len(metric_items)), _MAX_BATCH):
        client.log_batch(run.run_id, metrics=metric_items[i:i + _MAX_BATCH], tags=tag_items[i:i + _MAX_BATCH])
    for rel in files:
        _log_file(client, run, cfg, output, rel)


def _log_file(client, run: TrackedRun, cfg: Config, output: str, rel: str) -> None:
    """``output/rel`` (local or S3; a file or a folder) as an artifact at the same relative path."""
    uri = storage.join(output, rel)
    fs, path = storage.filesystem(uri, cfg.storage)
    kind = fs.get_file_info(path).type
    if kind == storage.pafs.FileType.File:
        objects = [(rel, uri)]
    elif kind == storage.pafs.FileType.Directory or storage.is_s3(uri):  # S3 has no folders, only prefixes
        try:
            objects = [(f"{rel}/{o.path}", storage.join(uri, o.path)) for page in storage.list_objects(uri, cfg.storage) for o in page]
        except FileNotFoundError:
            return
    else:
        return  # the task did not write it this time (no test split, no model card)
    with tempfile.TemporaryDirectory() as tmp:
        for name, src in objects:
            local = os.path.join(tmp, *name.split("/"))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with open(local, "wb") as f:
                f.write(storage.read_bytes(src, cfg.storage))
            folder = os.path.dirname(name)
            client.log_artifact(run.run_id, local, artifact_path=folder or None)
