"""Hyper-parameter search with Ray Tune over fine-tuning depth and learning rates.

The pattern is Ray Train V2's: each Tune trial runs a small driver function that builds its own
``TorchTrainer`` (:func:`medhier.train.train_on_cache`) with ``TuneReportCallback``, so every
epoch's validation metrics reach Tune and ASHA can stop weak trials early. The cache is made
once per search; trials only read it.

Output layout::

    OUTPUT/cache/               preprocessed cache (unless data.cache points elsewhere)
    OUTPUT/tune/                Ray Tune experiment (restorable with --resume)
    OUTPUT/trials/<trial>/      each trial's training run (checkpoints, best/, history.json)
    OUTPUT/trials.parquet       one row per trial: parameters, best metric, epochs, stopped early
    OUTPUT/search.png           the metric against each parameter
    OUTPUT/best/                the best trial's best checkpoint (ready for `medhier score`)
    OUTPUT/best_config.yaml     the best trial's resolved config
    OUTPUT/tracking.json        the search's MLflow run (a parent of one run per trial), when tracking.uri is set

The driver prints one line per trial epoch (Tune's own reporter stays off unless --verbose).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.tune
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from ray import tune as rt
from ray.tune.integration.ray_train import TuneReportCallback

from medhier import stopping
from medhier.config import MINIMISED_METRICS, Config, ConfigError, TuneConfig
from medhier.io import storage
from medhier.runtime import use_v1_parquet_reader, verbose
from medhier.stopping import Stopped
from medhier.train import tracking
from medhier.train.loop import TrainTask, train_on_cache
from medhier.train.progress import epoch_line

__all__ = ["TuneSummary", "fmt", "max_concurrent_trials", "search_space", "trial_lines", "tune"]

log = logging.getLogger(__name__)

_DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")


def metric_and_mode(cfg: Config) -> tuple[str, str]:
    metric = cfg.tune.metric or cfg.train.metric
    return metric, "min" if metric in MINIMISED_METRICS else "max"


def search_space(cfg: Config) -> dict[str, Any]:
    """``tune.space`` (plain specs) -> Ray Tune sampling objects, keyed by dotted config key.

    Every spec is checked against the config it will modify, so a bad key, distribution or value
    fails here naming ``tune.space.<key>``, before any trial starts.
    """
    validate_space(cfg.tune, cfg)
    space = {}
    for key, spec in cfg.tune.space.items():
        (kind, values), = spec.items()
        if kind == "choice":
            space[key] = rt.choice(list(values))
        elif kind == "uniform":
            space[key] = rt.uniform(*values)
        elif kind == "loguniform":
            space[key] = rt.loguniform(*values)
        else:
            space[key] = rt.randint(values[0], values[1] + 1)  # inclusive upper bound, as written
    return space


def validate_space(tune_cfg: TuneConfig, cfg: Config) -> None:
    """Check every ``tune.space`` entry: a known config key, one distribution, values that the
    config accepts. Raises ConfigError naming ``tune.space.<key>``."""
    if not tune_cfg.space:
        raise ConfigError("tune.space: empty; give at least one parameter, e.g. train.lr_head: {loguniform: [1.0e-4, 1.0e-2]}")
    for key, spec in tune_cfg.space.items():
        where = f"tune.space.{key}"
        section, _, name = key.partition(".")
        if section in ("tune", "storage", "tracking", "runtime") or not name or not hasattr(getattr(cfg, section, None), name):
            raise ConfigError(f"{where}: not a tunable config key (use section.key, e.g. train.lr_head)")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in _DISTRIBUTIONS:
            raise ConfigError(f"{where}: expected one of {{{', '.join(f'{d}: ...' for d in _DISTRIBUTIONS)}}}, got {spec!r}")
        (kind, values), = spec.items()
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"{where}.{kind}: expected a list, got {values!r}")
        if kind != "choice":
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) or not values[0] < values[1]:
                raise ConfigError(f"{where}.{kind}: expected [low, high] with low < high, got {values!r}")
            if kind == "loguniform" and values[0] <= 0:
                raise ConfigError(f"{where}.loguniform: bounds must be > 0, got {values!r}")
            if kind == "randint" and not all(isinstance(v, int) for v in values):
                raise ConfigError(f"{where}.randint: bounds must be integers, got {values!r}")
        candidates = values if kind == "choice" else list(values)
        for value in candidates:
            try:
                apply_params(cfg, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"{where}: value {value!r} is not valid for {key}: {exc}") from None


def apply_params(cfg: Config, params: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with dotted keys set (and validated)."""
    data = copy.deepcopy(cfg.to_dict())
    for key, value in params.items():
        section, name = key.split(".", 1)
        if isinstance(value, np.generic):
            value = value.item()
        data[section][name] = value
    return Config.from_dict(data)


def max_concurrent_trials(cfg: Config, resources: dict[str, float]) -> int:
    """Trials that fit at once: by GPUs when trials use GPUs, else by CPUs, keeping a quarter of
    the CPUs for Ray Data (trials that take every CPU starve their own input pipelines)."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    workers = cfg.train.num_workers
    gpus = resources.get("GPU", 0)
    if gpus >= 1 and cfg.train.use_gpu != "false":
        return max(1, int(gpus // workers))
    usable = resources.get("CPU", 1) * 0.75
    return max(1, int(usable // (workers * cfg.train.cpus_per_worker)))


def _trial(config: dict[str, Any]) -> None:
    """One Tune trial: the base config with this trial's parameters, trained on the shared cache."""
    use_v1_parquet_reader()  # the trial's own process reads the cache
    params = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg = apply_params(Config.from_dict(config["_base"]), params)
    trial_dir = storage.join(config["_output"], "trials", ray.tune.get_context().get_trial_id())
    train_on_cache(cfg, config["_cache"], trial_dir, config["_task"], callbacks=(TuneReportCallback(),),
                   parent_run=config.get("_tracking"), epoch_lines=False)


class _TrialLines(rt.Callback):
    """One line per trial epoch, printed by the search's driver (trials run in Ray processes,
    whose own output Ray would prefix and interleave)."""

    def __init__(self, metric: str, epochs: int):
        self.metric, self.epochs = metric, epochs

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" not in result:
            return
        mean = result.get("time_total_s", 0.0) / max(1, result.get("training_iteration", 1))
        print(f"trial {trial.trial_id}  " + epoch_line(result, self.epochs, self.metric, result.get("time_total_s", 0.0), mean), flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"trial {trial.trial_id}  failed (its error is in trials.parquet)", flush=True)


@dataclass
class TuneSummary:
    output: str
    metric: str
    mode: str
    trials: list[dict[str, Any]]
    best_trial: str
    best_metric: float | None
    best_checkpoint: str
    concurrent: int
    seconds: float

    def table(self) -> str:
        lines = trial_lines(self.trials, "param:", [(self.metric, "best_metric", 18), ("epochs", "epochs", 8)],
                            status=lambda t: "stopped early" if t["stopped_early"] else t["status"].lower())
        lines.append(f"best: {self.best_trial} ({self.metric} {fmt(self.best_metric)}) -> {self.best_checkpoint}")
        lines.append(f"{len(self.trials)} trials, up to {self.concurrent} at once, {self.seconds:,.0f} s")
        return "\n".join(lines)


def fmt(value: Any) -> str:
    """A trial table's cell: floats to 4 significant digits, NaN as n/a."""
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def trial_lines(trials: list[dict[str, Any]], prefix: str, columns: list[tuple[str, str, int]],
                status: Callable[[dict[str, Any]], str]) -> list[str]:
    """A search's trials as text: the trial id, each ``prefix``-ed parameter (named without it),
    ``columns`` ((header, key, width) each), then ``status(trial)``; a header and a rule first."""
    keys = [k for k in (trials[0] if trials else {}) if k.startswith(prefix)]
    width = max([12, *(len(k) - len(prefix) + 2 for k in keys)])
    head = f"{'trial':<14}" + "".join(f"{k[len(prefix):]:>{width}}" for k in keys) + "".join(f"{h:>{w}}" for h, _, w in columns) + "  status"
    lines = [head, "-" * len(head)]
    for t in trials:
        cells = "".join(f"{fmt(t[k]):>{width}}" for k in keys) + "".join(f"{fmt(t[key]):>{w}}" for _, key, w in columns)
        lines.append(f"{t['trial_id']:<14}{cells}  {status(t)}")
    return lines


def tune(cfg: Config, cache: str, output: str, task: TrainTask, resume: bool = False) -> TuneSummary:
    """Run (or with ``resume``, continue) the search of ``task`` on a committed ``cache`` (made
    once; trials only read it); write trials.parquet, search.png, best/. Needs Ray initialised.
    """
    start = time.perf_counter()
    output = storage.normalize(output)
    try:
        return _search(cfg, cache, output, task, resume, start)
    except Stopped as stop:
        fs, root = storage.filesystem(storage.join(output, "trials"), cfg.storage)
        try:
            done = sum(1 for e in fs.get_file_info(storage.pafs.FileSelector(root, recursive=True)) if e.base_name == "history.json")
        except FileNotFoundError:
            done = 0
        stop.note(f"{done} trial(s) have checkpoints under {output}/trials and the search state is in {output}/tune; "
                  "resuming continues the unfinished trials")
        raise


def _search(cfg: Config, cache: str, output: str, task: TrainTask, resume: bool, start: float) -> TuneSummary:
    space = search_space(cfg)  # validates before anything runs
    metric, mode = metric_and_mode(cfg)
    base = cfg.to_dict()
    fs, root = storage.filesystem(output, cfg.storage)
    trainable = rt.with_resources(_trial, {"cpu": 0.1})  # the trial driver mostly waits on its trainer
    concurrent = max_concurrent_trials(cfg, ray.cluster_resources())
    experiment = storage.join(output, "tune")
    if resume and not rt.Tuner.can_restore(f"{root}/tune", storage_filesystem=fs):
        raise FileNotFoundError(f"--resume: no search to resume at {experiment}")
    parent = tracking.start_run(cfg, output, task=task.name, kind="search")
    if resume:
        # Finished trials keep their results; unfinished and errored ones continue from their
        # last checkpoint (each trial's training resumes from its own run directory).
        tuner = rt.Tuner.restore(f"{root}/tune", trainable=trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    else:
        scheduler = _scheduler(cfg)
        tuner = rt.Tuner(
            trainable,
            param_space={**space, "_base": base, "_cache": cache, "_output": output, "_task": task, "_tracking": parent},
            tune_config=rt.TuneConfig(
                metric=metric,
                mode=mode,
                scheduler=scheduler,
                # The limit goes to the generator itself: Tune ignores max_concurrent_trials when
                # a BasicVariantGenerator is passed in (it only warns).
                search_alg=rt.search.BasicVariantGenerator(max_concurrent=concurrent, random_state=cfg.tune.seed),
                num_samples=cfg.tune.num_samples,
                trial_dirname_creator=lambda trial: trial.trial_id,
            ),
            run_config=rt.RunConfig(
                name="tune",
                storage_path=root,
                storage_filesystem=fs,
                failure_config=rt.FailureConfig(max_failures=cfg.tune.trial_max_failures),
                verbose=1 if verbose() else 0,
                callbacks=[] if verbose() else [_TrialLines(metric, cfg.train.epochs)],
            ),
        )
    if stopping.installed():  # Ctrl-C stays medhier's: Tune's own handler would end the search and carry on
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    with tracking.tracked(parent, cfg, output, files=("trials.parquet", "search.png", "best_config.yaml", "tune_summary.json")):
        results = tuner.fit()
        trials = _trial_rows(results, cfg, output, metric, mode)
        if not any(t["best_metric"] is not None and not math.isnan(t["best_metric"]) for t in trials):
            raise RuntimeError(f"no trial reported {metric}; see the trial errors in {experiment}")
        best = (min if mode == "min" else max)(
            (t for t in trials if t["best_metric"] is not None and not math.isnan(t["best_metric"])), key=lambda t: t["best_metric"]
        )
        _write_outputs(cfg, output, trials, best, metric, mode)
        _end_trial_runs(cfg, output, trials)
        tracking.log_results(cfg, output, metrics={f"best_{metric}": best["best_metric"], "trials": len(trials)},
                             tags={"best_trial": best["trial_id"]})
    return TuneSummary(output, metric, mode, trials, best["trial_id"], best["best_metric"],
                       storage.join(output, "best"), concurrent, time.perf_counter() - start)


def _scheduler(cfg: Config) -> Any:
    """ASHA (stops the weaker trials at each rung) or FIFO (every trial runs all its epochs)."""
    if cfg.tune.scheduler != "asha":
        return rt.schedulers.FIFOScheduler()
    return rt.schedulers.ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs,
                                       grace_period=cfg.tune.grace_period, reduction_factor=cfg.tune.reduction_factor)


def _end_trial_runs(cfg: Config, output: str, trials: list[dict[str, Any]]) -> None:
    """End each trial's tracking run with its outcome as Tune saw it (see ``tracking.end_run``)."""
    for trial in trials:
        trial_dir = storage.join(output, "trials", trial["trial_id"])
        status = "FAILED" if trial["status"] == "ERROR" else "KILLED" if trial["stopped_early"] else "FINISHED"
        tracking.end_run(tracking.run_of(trial_dir, cfg), cfg, trial_dir, status=status, files=("config.yaml", "history.json"),
                         unless_already=True)


def _trial_rows(results, cfg: Config, output: str, metric: str, mode: str) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        trial_id = result.path.rstrip("/").rsplit("/", 1)[-1]
        history = result.metrics_dataframe
        values = history[metric].astype(float).to_numpy() if history is not None and metric in history else np.array([])
        values = values[~np.isnan(values)]
        best = float(values.min() if mode == "min" else values.max()) if len(values) else float("nan")
        epochs = int(history["epoch"].max() + 1) if history is not None and "epoch" in history and len(history) else 0
        own_stop = bool(history["early_stop"].iloc[-1]) if history is not None and "early_stop" in history and len(history) else False
        status = "ERROR" if result.error else "TERMINATED"
        row = {
            "trial_id": trial_id,
            **{f"param:{k}": _plain(v) for k, v in result.config.items() if not k.startswith("_")},
            "best_metric": best,
            "epochs": epochs,
            # ASHA ended it: no error, fewer epochs than asked, and not medhier's own early stopping
            "stopped_early": bool(not result.error and epochs < cfg.train.epochs and not own_stop),
            "status": status,
            "error": str(result.error or ""),
            "checkpoint": storage.join(output, "trials", trial_id, "best"),
        }
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _write_outputs(cfg: Config, output: str, trials: list[dict[str, Any]], best: dict[str, Any], metric: str, mode: str) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(trials), sink)
    storage.write_bytes(storage.join(output, "trials.parquet"), sink.getvalue().to_pybytes(), cfg.storage)
    storage.write_bytes(storage.join(output, "search.png"), _plot(trials, cfg, metric), cfg.storage)
    for name in ("model.pt", "meta.json"):
        storage.write_bytes(storage.join(output, "best", name), storage.read_bytes(storage.join(best["checkpoint"], name), cfg.storage), cfg.storage)
    params = {k[len("param:"):]: v for k, v in best.items() if k.startswith("param:")}
    best_cfg = apply_params(cfg, params)
    text = f"# best trial {best['trial_id']}: {metric} = {best['best_metric']:.6g}\n" + yaml.safe_dump(best_cfg.to_public_dict(), sort_keys=False)
    storage.write_text(storage.join(output, "best_config.yaml"), text, cfg.storage)
    storage.write_text(storage.join(output, "tune_summary.json"), json.dumps({"metric": metric, "mode": mode, "best": best}, indent=2, default=str), cfg.storage)


def _plot(trials: list[dict[str, Any]], cfg: Config, metric: str) -> bytes:
    """PNG: the trials' best metric against each parameter (log axis for loguniform ones)."""
    keys = [k for k in cfg.tune.space]
    fig = Figure(figsize=(4.2 * len(keys), 3.6))
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys, 1):
        ax = fig.add_subplot(1, len(keys), i)
        xs = [t.get(f"param:{key}") for t in trials]
        ys = [t["best_metric"] for t in trials]
        early = [t["stopped_early"] for t in trials]
        kind = next(iter(cfg.tune.space[key]))
        if kind == "choice" and not all(isinstance(x, (int, float)) for x in xs):
            labels = sorted({str(x) for x in xs})
            xs = [labels.index(str(x)) for x in xs]
            ax.set_xticks(range(len(labels)), labels)
        for stopped, marker, label in ((False, "o", "ran to the end"), (True, "x", "stopped early")):
            pts = [(x, y) for x, y, e in zip(xs, ys, early) if e == stopped]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label=label)
        if kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if i == 1:
            ax.legend(fontsize=8)
    fig.suptitle(f"Search: best {metric} per trial")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
