"""The classifier's entry points: what ``medhier`` commands and the ``jobs/`` call. Each hands the
platform the classifier (:data:`medhier.classify.task.CLASSIFY`) and its own pieces.

``fit`` output layout (besides the harness's ``train/``, ``best/``, ``history.json``)::

    OUTPUT/cache/            the decoded cache (unless data.cache points elsewhere)
    OUTPUT/best/             + temperatures, referral threshold and drift profile fitted on the
                             validation split (medhier/classify/posthoc.py)
    OUTPUT/metrics.json      evaluation of the best model on the test split: evaluate()'s metrics
                             with 95 % patient-bootstrap intervals (<level>.ci, bootstrap),
                             calibration (ECE before/after), referral (threshold, coverage, curve)
    OUTPUT/plots/            confusion matrices, ROC curves, reliability diagrams per level,
                             the risk-coverage curve (PNG)
    OUTPUT/model_card.md     what the model is for, its data, metrics, calibration, referral
    OUTPUT/model_card.json   (medhier/classify/card.py); ``tune`` writes them beside its best/ too

``metrics.json``'s additions:

* ``calibration``: ``temperatures``, ``bins`` and per level (``main``, ``leaf``) ``ece`` with
  ``before``/``after`` top-label ECE and ``classwise_before``/``classwise_after``;
* ``referral``: ``threshold`` and ``margin`` in force, ``referred`` (share), ``coverage``,
  ``accuracy_kept`` (leaf accuracy of the images answered), ``accuracy_all``, and ``curve``
  (``coverage``/``accuracy``/``threshold`` lists, :func:`medhier.classify.referral.risk_coverage`);
* ``main.ci`` / ``leaf.ci`` and ``bootstrap`` (:mod:`medhier.classify.bootstrap`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from medhier import columns as C
from medhier.classify.bootstrap import bootstrap_intervals
from medhier.classify.calibration import BINS, Temperatures, calibration_errors, reliability_png
from medhier.classify.card import CARD_JSON, CARD_MD, write_model_card
from medhier.classify.labels import LEAF_INDEX, MAIN_INDEX
from medhier.classify.metrics import evaluate, hierarchical_predictions, summary_table, write_plots
from medhier.classify.posthoc import Posthoc, calibrated, fit_posthoc, predict_splits
from medhier.classify.referral import Referral, refer, risk_coverage, risk_coverage_png
from medhier.classify.task import CLASSIFY, taxonomy_of
from medhier.config import Config
from medhier.data.cache import PrepareSummary
from medhier.data.cache import prepare as prepare_cache
from medhier.data.splits import split_key
from medhier.infer.export import ExportResult, export_checkpoint
from medhier.io import storage
from medhier.train import tracking
from medhier.train import tune as train_tune
from medhier.train.checkpoint import config_for_checkpoint, load_checkpoint
from medhier.train.loop import TrainResult, train_on_cache

__all__ = ["FitResult", "evaluate_archive", "evaluate_checkpoint", "evaluate_predictions", "export", "finish_best", "fit", "prepare", "tune"]


def prepare(cfg: Config, archive: str, cache: str, labels: str = "", force: bool = False) -> PrepareSummary:
    """``medhier prepare``: decode the archive once into a cache, labelled by ``main``/``sub``."""
    return prepare_cache(cfg, archive, cache, labels, force, codec=CLASSIFY.codec(cfg))


@dataclass
class FitResult(TrainResult):
    posthoc: dict[str, Any] | None = None  # what was fitted on the validation split (Posthoc.to_dict())
    model_card: str = ""

    def table(self) -> str:
        head = self.run_lines() + ([f"model card       {self.model_card}"] if self.model_card else [])
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
    posthoc, test_metrics = finish_best(cfg, best, cache, output)
    tracking.log_results(cfg, output, files=("metrics.json", "plots", CARD_MD, CARD_JSON), metrics={"test": test_metrics})
    return FitResult.of_run(output, summary, test_metrics=test_metrics, seconds=time.perf_counter() - start,
                            prepare_table=prepared.table(), metric=cfg.train.metric, posthoc=posthoc.to_dict(),
                            model_card=storage.join(output, CARD_MD))


def finish_best(cfg: Config, best: str, cache: str, output: str) -> tuple[Posthoc, dict[str, Any]]:
    """After training: fit temperatures, the referral threshold and the drift profile into
    ``best`` (validation split), evaluate it on the test split (the validation split when the
    test split is empty), and write metrics.json, plots and the model card under ``output``."""
    preds = predict_splits(best, cache, cfg, ["val", "test"])
    posthoc = fit_posthoc(best, cache, cfg, preds.get("val", {}))
    split = "test" if "test" in preds else "val"
    metrics = evaluate_predictions(best, preds[split], cfg, output, split)
    write_model_card(output, load_checkpoint(best, CLASSIFY, cfg.storage), cfg, cache, metrics)
    return posthoc, metrics


def evaluate_checkpoint(checkpoint: str, cache: str, cfg: Config, output: str, split: str | None = "test") -> dict[str, Any]:
    """Score a cache split with a checkpoint and write metrics.json and plots under ``output``.

    Falls back to the validation split when the test split is empty; ``split=None`` uses every
    labelled row (``medhier evaluate`` on another archive). Returns the metrics ({} if no rows).
    """
    for name in ([split, "val"] if split == "test" else [split]):
        pred = predict_splits(checkpoint, cache, cfg, [name]).get(name)
        if pred:
            return evaluate_predictions(checkpoint, pred, cfg, output, name)
    return {}


def evaluate_predictions(checkpoint: str, pred: dict[str, np.ndarray], cfg: Config, output: str, split: str | None) -> dict[str, Any]:
    """A checkpoint's predictions on labelled images (:func:`medhier.classify.posthoc.predict_splits`)
    -> metrics.json and plots under ``output`` (see the module docstring) -> the metrics."""
    loaded = load_checkpoint(checkpoint, CLASSIFY, cfg.storage)
    tax = taxonomy_of(loaded)
    run_cfg = config_for_checkpoint(cfg, loaded)  # the checkpoint's referral threshold unless the user set one
    temperatures = Temperatures.from_meta(loaded.task_meta, f"checkpoint {checkpoint!r}")
    main_true, leaf_true = pred[MAIN_INDEX].astype(np.int64), pred[LEAF_INDEX].astype(np.int64)
    p_main, p_leaf = calibrated(pred, temperatures, tax)
    raw_main, raw_leaf = calibrated(pred, None, tax)
    truth_and_scores = (main_true, leaf_true, p_main, p_leaf)
    metrics = {**evaluate(tax, *truth_and_scores), "split": split or "all", "model_id": loaded.model_id}
    patients = [split_key({C.PATIENT_KEY: k, C.STUDY_INSTANCE_UID: s}, p) for k, s, p in zip(pred[C.PATIENT_KEY], pred[C.STUDY_INSTANCE_UID], pred[C.PATH])]
    ci = bootstrap_intervals(tax, np.asarray(patients, dtype=object), *truth_and_scores, samples=cfg.train.bootstrap_samples, seed=cfg.train.seed)
    if ci:
        metrics["main"]["ci"], metrics["leaf"]["ci"] = ci.pop("main"), ci.pop("leaf")
        metrics["bootstrap"] = ci
    levels = {"main": (main_true, raw_main, p_main), "leaf": (leaf_true, raw_leaf, p_leaf)}
    ece = {}
    for level, (y, before, after) in levels.items():
        b, a = calibration_errors(before, y), calibration_errors(after, y)
        ece[level] = {"before": b["ece"], "after": a["ece"], "classwise_before": b["classwise_ece"], "classwise_after": a["classwise_ece"]}
    metrics["calibration"] = {"temperatures": temperatures.to_dict() if temperatures else None, "bins": BINS, "ece": ece}
    referral = Referral.of(run_cfg)
    _, leaf_pred = hierarchical_predictions(tax, p_main, p_leaf)
    leaf_prob = p_leaf[np.arange(len(leaf_pred)), leaf_pred]
    correct = leaf_pred == leaf_true
    referred = refer(p_leaf, leaf_prob, referral)
    metrics["referral"] = {"threshold": referral.below, "margin": referral.margin, "referred": float(referred.mean()),
                           "coverage": float(1 - referred.mean()), "accuracy_kept": float(correct[~referred].mean()) if (~referred).any() else None,
                           "accuracy_all": float(correct.mean()), "curve": risk_coverage(leaf_prob, correct)}
    storage.write_text(storage.join(output, "metrics.json"), json.dumps(metrics, indent=2), cfg.storage)
    target = loaded.task_meta.get("referral", {}).get("target_accuracy")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_plots(tax, *truth_and_scores, out_dir=tmp)
        for level, (y, before, after) in levels.items():
            curves = {"model's own": (before, y), "calibrated": (after, y)} if temperatures else {"model's own": (before, y)}
            paths.append(reliability_png(os.path.join(tmp, f"reliability_{level}.png"), f"{'Main class' if level == 'main' else 'Leaf'}", curves))
        paths.append(risk_coverage_png(os.path.join(tmp, "risk_coverage.png"), {split or "all": (leaf_prob, correct)}, referral.below, target))
        for path in paths:
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(output, "plots", os.path.basename(path)), f.read(), cfg.storage)
    return metrics


def evaluate_archive(cfg: Config, checkpoint: str, archive: str, output: str, labels: str = "") -> dict[str, Any]:
    """``medhier evaluate``: score every labelled image of an archive with a checkpoint and write
    metrics.json and plots under ``output``. Preprocessing comes from the checkpoint."""
    output = storage.normalize(output)
    run_cfg = config_for_checkpoint(cfg, load_checkpoint(checkpoint, CLASSIFY, cfg.storage))
    run_cfg.data.split = "hash"  # every labelled image is evaluated: dealing patients into splits would be wasted
    cache = run_cfg.data.cache or storage.join(output, "cache")
    summary = prepare(run_cfg, archive, cache, labels)
    if sum(sum(v.values()) for v in summary.counts.get("split_classes", {}).values()) == 0:
        raise ValueError(f"no labelled images in {archive!r}: pass --labels (CSV/Parquet with path or sop_instance_uid, main, sub)")
    storage.write_text(storage.join(output, "config.yaml"), run_cfg.to_yaml(), cfg.storage)
    return evaluate_checkpoint(checkpoint, cache, run_cfg, output, split=None)


def tune(cfg: Config, archive: str, output: str, labels: str = "", resume: bool = False) -> train_tune.TuneSummary:
    """``medhier tune``: the search of ``tune.space`` on a cache made once for every trial; its
    ``best/`` then gets what ``fit``'s does (:func:`finish_best`): temperatures, referral,
    drift profile, metrics.json, plots and the model card."""
    train_tune.search_space(cfg)  # a bad search space fails before the cache is made
    output = storage.normalize(output)
    cache = cfg.data.cache or storage.join(output, "cache")
    prepare(cfg, archive, cache, labels)
    summary = train_tune.tune(cfg, cache, output, CLASSIFY, resume=resume)
    best = storage.join(output, "best")
    finish_best(config_for_checkpoint(cfg, load_checkpoint(best, CLASSIFY, cfg.storage)), best, cache, output)
    return summary


def export(cfg: Config, checkpoint: str, output: str, fmt: str = "onnx", samples: str = "", n_samples: int = 32) -> ExportResult:
    """``medhier export``: the checkpoint as an ONNX file at ``output`` (medhier/classify/export.py
    says what the file holds), checked against PyTorch with onnxruntime on ``n_samples`` images
    from the archive ``samples`` ("" for phantoms) before it is written. No Ray needed."""
    return export_checkpoint(cfg, checkpoint, output, CLASSIFY, samples=samples, n_samples=n_samples, fmt=fmt)
