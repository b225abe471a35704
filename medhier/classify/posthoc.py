"""What is fitted after training, on the validation split, and stored in the best checkpoint
(:func:`medhier.train.checkpoint.amend_checkpoint`; the weights and ``model_id`` stay):

* ``task_meta["temperatures"]``: one temperature per level, and with ``train.calibration``'s
  class biases one bias per class (:mod:`medhier.classify.calibration`), hierarchical head only;
* ``task_meta["referral"]`` and ``defaults["score"]["refer_below"]``: the lowest calibrated
  leaf probability at which the validation images kept reach ``train.refer_target_accuracy``
  (:mod:`medhier.classify.referral`), the threshold every run uses unless ``score.refer_below``
  says otherwise;
* ``profile``: the training split's reference profile for drift (:mod:`medhier.infer.drift`):
  its images' metadata and intensity mix, and the model's predicted leaves on the validation split.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from medhier import columns as C
from medhier.classify.calibration import BIAS_MIN_IMAGES, TEMPERATURES, Temperatures, fit_temperatures, temper
from medhier.classify.labels import LEAF_INDEX, MAIN_INDEX
from medhier.classify.metrics import hierarchical_predictions
from medhier.classify.referral import REFER_BELOW, threshold_for_accuracy
from medhier.classify.report import RAW_LOG_P_MAIN, RAW_LOG_P_SUB
from medhier.classify.task import CLASSIFY, taxonomy_of
from medhier.classify.taxonomy import Taxonomy
from medhier.config import Config
from medhier.data.cache import cache_table, load_cache
from medhier.infer.actor import predict_dataset
from medhier.infer.drift import CATEGORICAL, NUMERIC, reference_profile
from medhier.train.checkpoint import amend_checkpoint, load_checkpoint

__all__ = ["EVAL_COLUMNS", "REFERRAL", "Posthoc", "calibrated", "fit_posthoc", "predict_splits"]

log = logging.getLogger(__name__)

REFERRAL = "referral"  # task_meta key: how the threshold was fitted
# What evaluation reads of each image besides its pixels: labels, and its patient for the bootstrap.
EVAL_COLUMNS = (C.IMAGE, MAIN_INDEX, LEAF_INDEX, C.PATIENT_KEY, C.STUDY_INSTANCE_UID, C.PATH)


@dataclass
class Posthoc:
    """What :func:`fit_posthoc` fitted, as stored in the checkpoint."""

    images: int  # validation images it was fitted on
    temperatures: dict[str, Any] | None
    referral: dict[str, Any]
    profile_images: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def predict_splits(checkpoint: str, cache: str, cfg: Config, splits: Sequence[str | None]) -> dict[str | None, dict[str, np.ndarray]]:
    """The checkpoint's prediction arrays for the labelled images of cache splits (None: every
    split), with their :data:`EVAL_COLUMNS`, in one pass of one model actor -> {split: arrays};
    a split without labelled images is left out."""
    parts = []
    for i, split in enumerate(splits):
        try:
            ds, _ = load_cache(cache, cfg.storage, split, columns=list(EVAL_COLUMNS))
        except FileNotFoundError:
            continue
        parts.append(ds.map_batches(_tag, fn_kwargs={"part": i}, batch_format="pyarrow"))
    if not parts:
        return {}
    pred = predict_dataset(parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0], CLASSIFY, checkpoint, cfg)
    if not pred:
        return {}
    part = pred.pop(_PART)
    return {split: {k: v[part == i] for k, v in pred.items()} for i, split in enumerate(splits) if (part == i).any()}


_PART = "_eval_part"


def _tag(batch: pa.Table, part: int) -> pa.Table:
    return batch.append_column(_PART, pa.array(np.full(batch.num_rows, part, np.int64)))


def calibrated(pred: dict[str, np.ndarray], temperatures: Temperatures | None, taxonomy: Taxonomy) -> tuple[np.ndarray, np.ndarray]:
    """The raw log-probabilities of prediction arrays -> (p_main (N, M), p_leaf (N, L)) with
    ``temperatures`` (None: the model's own), float64, rows summing to 1."""
    log_p_main, _, log_p_leaf = temper(torch.from_numpy(pred[RAW_LOG_P_MAIN]), torch.from_numpy(pred[RAW_LOG_P_SUB]), temperatures, taxonomy)
    p_main, p_leaf = log_p_main.double().exp().numpy(), log_p_leaf.double().exp().numpy()
    return p_main / p_main.sum(1, keepdims=True), p_leaf / p_leaf.sum(1, keepdims=True)


def fit_posthoc(checkpoint: str, cache: str, cfg: Config, val: dict[str, np.ndarray] | None = None) -> Posthoc:
    """Fit temperatures, the referral threshold and the drift profile for ``checkpoint`` (the
    harness's ``best/``) on the cache's validation and training splits, and store them in it.
    ``val``: the checkpoint's predictions on the validation split when the caller has them
    (:func:`predict_splits`)."""
    loaded = load_checkpoint(checkpoint, CLASSIFY, cfg.storage)
    tax = taxonomy_of(loaded)
    pred = val if val is not None else predict_splits(checkpoint, cache, cfg, ["val"]).get("val", {})
    if not pred:
        raise ValueError(f"no labelled validation images in cache {cache!r}: nothing to calibrate the model on")
    main_true, leaf_true = pred[MAIN_INDEX].astype(np.int64), pred[LEAF_INDEX].astype(np.int64)
    notes = []
    if loaded.cfg.model.head == "hierarchical":
        mode = cfg.train.calibration
        bias = mode == "temperature_bias" or (mode == "auto" and len(main_true) >= BIAS_MIN_IMAGES)
        if mode == "auto" and not bias:
            notes.append(f"calibration: {len(main_true)} validation images, fewer than the {BIAS_MIN_IMAGES} that class biases "
                         "need: one temperature per level only (train.calibration=temperature_bias fits them anyway)")
        temperatures = fit_temperatures(pred[RAW_LOG_P_MAIN], pred[RAW_LOG_P_SUB], main_true, leaf_true, tax, bias=bias)
    else:
        temperatures = None
        notes.append("the flat head has no main logits: probabilities are the model's own (not calibrated)")
    p_main, p_leaf = calibrated(pred, temperatures, tax)
    _, leaf_pred = hierarchical_predictions(tax, p_main, p_leaf)
    leaf_prob = p_leaf[np.arange(len(leaf_pred)), leaf_pred]
    target = cfg.train.refer_target_accuracy
    referral = {**threshold_for_accuracy(leaf_prob, leaf_pred == leaf_true, target), "target_accuracy": target, "images": len(leaf_true)}
    if not referral["reached"]:
        notes.append(f"no leaf-probability threshold reaches {target:.0%} accuracy on the validation split: every image is referred "
                     "by default; set score.refer_below to choose another threshold")
        log.warning("referral: %s", notes[-1])
    features = cache_table(cache, cfg.storage, [*CATEGORICAL, *NUMERIC], "train")
    predicted = {name: int((leaf_pred == i).sum()) for i, name in enumerate(tax.leaf_names)}
    profile = reference_profile(features, predicted)
    task_meta = {REFERRAL: referral, **({TEMPERATURES: temperatures.to_dict()} if temperatures else {})}
    amend_checkpoint(checkpoint, cfg.storage, task_meta=task_meta, defaults={"score": {REFER_BELOW: referral["threshold"]}}, profile=profile)
    return Posthoc(len(leaf_true), temperatures.to_dict() if temperatures else None, referral, features.num_rows, notes)
