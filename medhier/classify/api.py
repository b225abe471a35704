"""The classifier's entry points: what ``medhier`` commands and the ``jobs/`` call. Each hands the
platform the classifier (:data:`medhier.classify.task.CLASSIFY`) and its own pieces.

``fit`` output layout (besides the harness's ``train/``, ``best/``, ``history.json``)::

    OUTPUT/cache/         the decoded cache (unless data.cache points elsewhere)
    OUTPUT/metrics.json   evaluation of the best model on the test split
    OUTPUT/plots/         confusion matrices and ROC curves (PNG)
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from medhier.classify.labels import LEAF_INDEX, MAIN_INDEX
from medhier.classify.metrics import evaluate, summary_table, write_plots
from medhier.classify.report import P_LEAF, P_MAIN
from medhier.classify.task import CLASSIFY, taxonomy_of
from medhier.config import Config
from medhier.console import number
from medhier.data.cache import PrepareSummary, load_cache
from medhier.data.cache import prepare as prepare_cache
from medhier.infer.actor import predict_dataset
from medhier.infer.export import ExportResult, export_checkpoint
from medhier.io import storage
from medhier.train import tracking
from medhier.train import tune as train_tune
from medhier.train.checkpoint import config_for_checkpoint, load_checkpoint
from medhier.train.loop import train_on_cache

__all__ = ["FitResult", "evaluate_archive", "evaluate_checkpoint", "export", "fit", "prepare", "tune"]


def prepare(cfg: Config, archive: str, cache: str, labels: str = "", force: bool = False) -> PrepareSummary:
    """``medhier prepare``: decode the archive once into a cache, labelled by ``main``/``sub``."""
    return prepare_cache(cfg, archive, cache, labels, force, codec=CLASSIFY.codec(cfg))


@dataclass
class FitResult:
    output: str
    best_checkpoint: str
    best_epoch: int
    best_metric: float | None
    epochs_run: int
    resumed_at: list[int]
    test_metrics: dict[str, Any]
    seconds: float
    prepare_table: str = ""
    metric: str = "metric"  # train.metric: what best_metric is

    def table(self) -> str:
        """The run's summary (the cache's own table was printed when it was ready: ``prepare_table``)."""
        head = [
            f"output           {self.output}",
            f"best checkpoint  {self.best_checkpoint}  (epoch {self.best_epoch}, validation {self.metric} {number(self.best_metric)})",
            f"epochs run       {self.epochs_run}" + (f"  (resumed at epoch {', '.join(map(str, self.resumed_at))})" if self.resumed_at else ""),
            f"wall time        {self.seconds:,.1f} s",
        ]
        return "\n".join(head) + ("\n" + summary_table(self.test_metrics) if self.test_metrics else "")


def fit(cfg: Config, archive: str, output: str, labels: str = "", hooks: tuple = ()) -> FitResult:
    """``medhier train``: train on ``archive`` (made into a cache when needed), writing
    everything under ``output``, then evaluate the best model on the test split. Re-running with
    the same output resumes from the last checkpoint. ``hooks``: see ``train_on_cache``. Needs
    Ray initialised."""
    start = time.perf_counter()
    output = storage.normalize(output)
    cache = cfg.data.cache or storage.join(output, "cache")
    prepared = prepare(cfg, archive, cache, labels)
    print(prepared.table() + "\n", flush=True)  # before the epoch lines: what the run trains on
    summary = train_on_cache(cfg, cache, output, CLASSIFY, hooks=hooks)
    best = storage.join(output, "best")
    test_metrics = evaluate_checkpoint(best, cache, cfg, output=output)
    tracking.log_results(cfg, output, files=("metrics.json", "plots", "model_card.md"), metrics={"test": test_metrics})
    return FitResult(
        output=output,
        best_checkpoint=best,
        best_epoch=int(summary.get("best_epoch", -1)),
        best_metric=summary.get("best_metric"),
        epochs_run=int(summary.get("epochs_run", 0)),
        resumed_at=list(summary.get("resumed_at", [])),
        test_metrics=test_metrics,
        seconds=time.perf_counter() - start,
        prepare_table=prepared.table(),
        metric=cfg.train.metric,
    )


def evaluate_checkpoint(checkpoint: str, cache: str, cfg: Config, output: str, split: str | None = "test") -> dict[str, Any]:
    """Score a cache split with a checkpoint and write metrics.json and plots under ``output``.

    Falls back to the validation split when the test split is empty; ``split=None`` uses every
    labelled row (``medhier evaluate`` on another archive). Returns the metrics ({} if no rows).
    """
    for name in ([split, "val"] if split == "test" else [split]):
        try:
            ds, _ = load_cache(cache, cfg.storage, name, columns=list(CLASSIFY.columns))
        except FileNotFoundError:
            continue
        pred = predict_dataset(ds, CLASSIFY, checkpoint, cfg)
        if not pred:
            continue
        loaded = load_checkpoint(checkpoint, CLASSIFY, cfg.storage)
        tax = taxonomy_of(loaded)
        truth_and_scores = (pred[MAIN_INDEX], pred[LEAF_INDEX], pred[P_MAIN], pred[P_LEAF])
        metrics = {**evaluate(tax, *truth_and_scores), "split": name or "all", "model_id": loaded.model_id}
        storage.write_text(storage.join(output, "metrics.json"), json.dumps(metrics, indent=2), cfg.storage)
        with tempfile.TemporaryDirectory() as tmp:
            for path in write_plots(tax, *truth_and_scores, out_dir=tmp):
                with open(path, "rb") as f:
                    storage.write_bytes(storage.join(output, "plots", os.path.basename(path)), f.read(), cfg.storage)
        return metrics
    return {}


def evaluate_archive(cfg: Config, checkpoint: str, archive: str, output: str, labels: str = "") -> dict[str, Any]:
    """``medhier evaluate``: score every labelled image of an archive with a checkpoint and write
    metrics.json and plots under ``output``. Preprocessing comes from the checkpoint."""
    output = storage.normalize(output)
    run_cfg = config_for_checkpoint(cfg, load_checkpoint(checkpoint, CLASSIFY, cfg.storage))
    cache = run_cfg.data.cache or storage.join(output, "cache")
    summary = prepare(run_cfg, archive, cache, labels)
    if sum(sum(v.values()) for v in summary.counts.get("split_classes", {}).values()) == 0:
        raise ValueError(f"no labelled images in {archive!r}: pass --labels (CSV/Parquet with path or sop_instance_uid, main, sub)")
    storage.write_text(storage.join(output, "config.yaml"), run_cfg.to_yaml(), cfg.storage)
    return evaluate_checkpoint(checkpoint, cache, run_cfg, output, split=None)


def tune(cfg: Config, archive: str, output: str, labels: str = "", resume: bool = False) -> train_tune.TuneSummary:
    """``medhier tune``: the search of ``tune.space`` on a cache made once for every trial."""
    train_tune.search_space(cfg)  # a bad search space fails before the cache is made
    output = storage.normalize(output)
    cache = cfg.data.cache or storage.join(output, "cache")
    prepare(cfg, archive, cache, labels)
    return train_tune.tune(cfg, cache, output, CLASSIFY, resume=resume)


def export(cfg: Config, checkpoint: str, output: str, fmt: str = "onnx", samples: str = "", n_samples: int = 32) -> ExportResult:
    """``medhier export``: the checkpoint as an ONNX file at ``output`` (medhier/classify/export.py
    says what the file holds), checked against PyTorch with onnxruntime on ``n_samples`` images
    from the archive ``samples`` ("" for phantoms) before it is written. No Ray needed."""
    return export_checkpoint(cfg, checkpoint, output, CLASSIFY, samples=samples, n_samples=n_samples, fmt=fmt)
