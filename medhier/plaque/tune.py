"""``medhier plaque tune``: a Ray Tune search over the prediction model's XGBoost parameters
(``predict.space``), then the model fitted with the best of them.

The examples are made once (:func:`medhier.plaque.fit.prepare_examples`) and written to
``OUTPUT/examples.parquet``; every trial reads them and runs its own ``XGBoostTrainer``
(:func:`medhier.plaque.boost.train_boosters`, Ray Train V2's pattern: a small trial driver,
``TuneReportCallback`` forwarding the workers' report to Tune) on the same patient-level split.
A trial reports once, after all its factors' boosters stopped early on the validation split, so
the scheduler is FIFO: ASHA needs intermediate results to stop trials, and a trial of a few
seconds has nothing worth stopping. The metric is ``val_r2_mean``, the validation R² averaged
over the factors (scale-free, so no factor dominates by its unit), maximised.

Trials run at once as the cluster allows: by CPUs, a quarter kept for Ray Data
(``tune.max_concurrent_trials`` overrides); ``tune.num_samples``, ``tune.seed`` and
``tune.trial_max_failures`` apply as for ``medhier tune``; ``--resume`` continues a search
whose driver died.

Output: ``trials.parquet`` (one row per trial: parameters, ``val_r2_mean``, per-factor
validation R², status), ``search.png`` (the metric against each parameter), ``best_config.yaml``
and ``best/`` (the fit with the best parameters: model/, metrics.json, plots), ready for
``medhier plaque predict --model OUTPUT/best/model``.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from ray import tune as rt
from ray.tune.integration.ray_train import TuneReportCallback

from medhier.config import Config, ConfigError
from medhier.io import storage
from medhier.plaque.boost import train_boosters
from medhier.plaque.fit import FitSummary, design, fit_examples, prepare_examples
from medhier.runtime import verbose
from medhier.train.tune import apply_params, fmt, search_space, trial_lines

__all__ = ["METRIC", "PlaqueTuneSummary", "plaque_space", "tune_model"]

METRIC = "val_r2_mean"


def plaque_space(cfg: Config) -> dict[str, Any]:
    """``predict.space`` as Ray Tune sampling objects, every key and value checked against the
    config (ConfigError naming ``predict.space.<key>``)."""
    for key in cfg.predict.space:
        if not key.startswith("predict."):
            raise ConfigError(f"predict.space.{key}: the prediction model's search takes predict.* keys, e.g. predict.max_depth")
    try:
        return search_space(dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, space=cfg.predict.space)))
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("tune.space", "predict.space")) from None


@dataclass
class PlaqueTuneSummary:
    output: str
    trials: list[dict[str, Any]]
    best_trial: str
    best_metric: float
    best: FitSummary
    concurrent: int
    seconds: float

    def table(self) -> str:
        lines = trial_lines(self.trials, "param:predict.", [(METRIC, METRIC, 14)], status=lambda t: t["status"].lower())
        lines.append(f"best: {self.best_trial} ({METRIC} {fmt(self.best_metric)}); {len(self.trials)} trials, "
                     f"up to {self.concurrent} at once, {self.seconds:,.0f} s")
        lines.append("")
        lines.append(self.best.table())
        return "\n".join(lines)


def tune_model(cfg: Config, measurements: str, patients: str, output: str, resume: bool = False) -> PlaqueTuneSummary:
    """Search ``predict.space``, then fit the best parameters into OUTPUT/best (module
    docstring). Needs Ray initialised."""
    start = time.perf_counter()
    output = storage.normalize(output)
    space = plaque_space(cfg)  # validates before anything runs
    examples_uri = storage.join(output, "examples.parquet")
    fs, root = storage.filesystem(output, cfg.storage)
    trainable = rt.with_resources(_trial, {"cpu": 0.1})  # the trial driver mostly waits on its trainer
    concurrent = _concurrent(cfg, ray.cluster_resources())
    if resume:
        if not rt.Tuner.can_restore(f"{root}/tune", storage_filesystem=fs):
            raise FileNotFoundError(f"--resume: no search to resume at {storage.join(output, 'tune')}")
        tuner = rt.Tuner.restore(f"{root}/tune", trainable=trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    else:
        prepared = prepare_examples(cfg, measurements, patients)
        buf = io.BytesIO()
        pq.write_table(prepared.examples, buf, compression="zstd")
        storage.write_bytes(examples_uri, buf.getvalue(), cfg.storage)
        design(cfg, prepared.examples)  # too few pairs per split fails here, before any trial
        tuner = rt.Tuner(
            trainable,
            param_space={**space, "_base": cfg.to_dict(), "_examples": examples_uri, "_output": output},
            tune_config=rt.TuneConfig(
                metric=METRIC, mode="max",
                # One report per trial: nothing for ASHA to act on (module docstring).
                search_alg=rt.search.BasicVariantGenerator(max_concurrent=concurrent, random_state=cfg.tune.seed),
                num_samples=cfg.tune.num_samples, trial_dirname_creator=lambda trial: trial.trial_id,
            ),
            run_config=rt.RunConfig(
                name="tune", storage_path=root, storage_filesystem=fs,
                failure_config=rt.FailureConfig(max_failures=cfg.tune.trial_max_failures), verbose=1 if verbose() else 0,
            ),
        )
    results = tuner.fit()
    trials = _trial_rows(results, cfg)
    scored = [t for t in trials if not math.isnan(t[METRIC])]
    if not scored:
        raise RuntimeError(f"no trial reported {METRIC}; see the trial errors in {storage.join(output, 'tune')}")
    best = max(scored, key=lambda t: t[METRIC])
    best_cfg = apply_params(cfg, {k[len("param:"):]: v for k, v in best.items() if k.startswith("param:")})
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(trials), sink)
    storage.write_bytes(storage.join(output, "trials.parquet"), sink.getvalue().to_pybytes(), cfg.storage)
    storage.write_bytes(storage.join(output, "search.png"), _plot(trials, cfg), cfg.storage)
    text = f"# best trial {best['trial_id']}: {METRIC} = {best[METRIC]:.6g}\n" + yaml.safe_dump(best_cfg.to_public_dict(), sort_keys=False)
    storage.write_text(storage.join(output, "best_config.yaml"), text, cfg.storage)
    best_dir = storage.join(output, "best")
    storage.write_text(storage.join(best_dir, "config.yaml"), best_cfg.to_yaml(), cfg.storage)
    examples = _read_examples(examples_uri, cfg)
    fit_start = time.perf_counter()
    fitted = fit_examples(best_cfg, examples, best_dir)
    fitted.seconds = time.perf_counter() - fit_start  # the best's fit alone (the summary's own line has the search)
    return PlaqueTuneSummary(output, trials, best["trial_id"], best[METRIC], fitted, concurrent, time.perf_counter() - start)


def _concurrent(cfg: Config, resources: dict[str, float]) -> int:
    """Trials at once: tune.max_concurrent_trials, else by CPUs with a quarter kept for Ray Data."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    per_trial = cfg.predict.num_workers * cfg.predict.cpus_per_worker
    return max(1, int(resources.get("CPU", 1) * 0.75 // per_trial))


def _read_examples(uri: str, cfg: Config) -> pa.Table:
    return pq.read_table(pa.BufferReader(storage.read_bytes(uri, cfg.storage)))


def _trial(config: dict[str, Any]) -> None:
    """One trial: the base config with this trial's parameters, boosters on the shared examples."""
    params = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg = apply_params(Config.from_dict(config["_base"]), params)
    d = design(cfg, _read_examples(config["_examples"], cfg))
    train, val, val_sd = d.boost_tables(cfg)
    trial_dir = storage.join(config["_output"], "trials", ray.tune.get_context().get_trial_id())
    train_boosters(cfg, train, val, d.space.names, list(cfg.predict.factors), val_sd, trial_dir, callbacks=(TuneReportCallback(),))


def _trial_rows(results, cfg: Config) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        metrics = result.metrics or {}
        row = {"trial_id": result.path.rstrip("/").rsplit("/", 1)[-1],
               **{f"param:{k}": (v.item() if isinstance(v, np.generic) else v) for k, v in result.config.items() if not k.startswith("_")},
               METRIC: float(metrics.get(METRIC, math.nan)),
               **{f"val_r2:{f}": float(metrics.get(f"val_r2:{f}", math.nan)) for f in cfg.predict.factors},
               "status": "ERROR" if result.error else "TERMINATED", "error": str(result.error or "")}
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


def _plot(trials: list[dict[str, Any]], cfg: Config) -> bytes:
    """PNG: each trial's val_r2_mean against each searched parameter (log axis for loguniform)."""
    keys = list(cfg.predict.space)
    fig = Figure(figsize=(3.8 * len(keys), 3.4))
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys, 1):
        ax = fig.add_subplot(1, len(keys), i)
        ax.scatter([t.get(f"param:{key}") for t in trials], [t[METRIC] for t in trials])
        if next(iter(cfg.predict.space[key])) == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(METRIC)
        ax.grid(alpha=0.3)
    fig.suptitle("Search: validation R² (mean over factors) per trial")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
