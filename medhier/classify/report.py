"""The classifier's predictions as the words every output uses: the Parquet report, the SR and
the online endpoint all take these values from :func:`prediction_fields`, so one image gets one
P(sub | main) and one referral wherever it is read.

Prediction arrays (what :class:`ClassifierPredictor` makes of the model's outputs). The
probabilities are calibrated: the checkpoint's temperatures (:mod:`medhier.classify.calibration`)
are applied here, once, for every output; the ``raw_*`` arrays are the model's own, for
evaluating the calibration:

==================  ==========  ========================================================
key                 shape       meaning
==================  ==========  ========================================================
``p_main``          (N, M)      P(main) per main class
``p_leaf``          (N, L)      P(leaf) = P(main) x P(sub | main) per leaf
``p_sub``           (N,)        P(sub | main) of the predicted leaf, the model's own
                                log P(sub | main) (tempered)
``pred_main``       (N,)        the predicted main class
``pred_leaf``       (N,)        the predicted leaf, inside the predicted main class
``raw_log_p_main``  (N, M)      log P(main) before temperatures
``raw_log_p_sub``   (N, L)      log P(sub | main) before temperatures
==================  ==========  ========================================================

Temperatures never change ``pred_main`` or ``pred_leaf``; class biases (``train.calibration``,
:mod:`medhier.classify.calibration`) can, and the predictions follow the calibrated
probabilities. ``refer`` (:mod:`medhier.classify.referral`)
is decided in :func:`prediction_fields` from the calibrated probabilities and the run's thresholds.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from medhier import columns as C
from medhier.classify.calibration import Temperatures, temper
from medhier.classify.model import Outputs, predict
from medhier.classify.presets import eval_preset
from medhier.classify.referral import Referral, refer
from medhier.classify.taxonomy import Taxonomy
from medhier.config import Config

__all__ = [
    "EXPLAIN_LOCATION", "EXPLAIN_PATH", "LEAF_LABEL", "LEAF_PROB", "MAIN_LABEL", "MAIN_PROB", "P_LEAF", "P_MAIN", "P_SUB",
    "PRED_LEAF", "PRED_MAIN", "RAW_LOG_P_MAIN", "RAW_LOG_P_SUB", "REFER", "RESULT_FIELDS", "SR_PATH", "SUB_LABEL", "SUB_PROB", "ClassifierPredictor", "LeafTally", "answer",
    "leaf_column", "prediction_fields", "report_columns", "report_values",
]

P_MAIN, P_LEAF, P_SUB, PRED_MAIN, PRED_LEAF = "p_main", "p_leaf", "p_sub", "pred_main", "pred_leaf"
RAW_LOG_P_MAIN, RAW_LOG_P_SUB = "raw_log_p_main", "raw_log_p_sub"
# Report columns: class names and probabilities
MAIN_LABEL, MAIN_PROB, SUB_LABEL, SUB_PROB, LEAF_LABEL, LEAF_PROB = "main_label", "main_prob", "sub_label", "sub_prob", "leaf_label", "leaf_prob"
REFER = "refer"  # bool: hand the image to a human reader (medhier.classify.referral); null on error rows
# --explain: the Grad-CAM overlay (relative to OUTPUT) and where its heat lies, as fractions of
# the image height and width; --sr: the row's DICOM SR (relative to OUTPUT). Null otherwise.
EXPLAIN_PATH, SR_PATH = "explain_path", "sr_path"
EXPLAIN_LOCATION = ("explain_peak_y", "explain_peak_x", "explain_com_y", "explain_com_x")
# What an SR (and the endpoint's answer) states of one image: the report row's values.
RESULT_FIELDS = (MAIN_LABEL, MAIN_PROB, SUB_LABEL, SUB_PROB, LEAF_LABEL, LEAF_PROB, REFER)
MAIN_PROBS, LEAF_PROBS = "main_probs", "leaf_probs"  # the endpoint's {name: probability} for every class


def leaf_column(leaf_name: str) -> str:
    """Report column of a leaf's probability: "fracture/burst" -> "p_fracture__burst"."""
    return "p_" + leaf_name.replace("/", "__")


class ClassifierPredictor:
    """:class:`medhier.infer.actor.Predictor` of the hierarchical classifier for one checkpoint's
    config and temperatures (None: the model's own probabilities)."""

    def __init__(self, cfg: Config, temperatures: Temperatures | None = None):
        self.taxonomy = Taxonomy.from_config(cfg.taxonomy)
        self.preset = eval_preset(cfg.preprocess)
        self.temperatures = temperatures

    def outputs(self, out: Outputs, n: int) -> dict[str, np.ndarray]:
        raw_main, raw_sub = out.log_p_main.float(), out.log_p_sub.float()
        log_p_main, log_p_sub, log_p_leaf = temper(raw_main, raw_sub, self.temperatures, self.taxonomy)
        main, leaf = predict(Outputs(out.main_logits, log_p_main, log_p_sub, log_p_leaf), self.taxonomy)
        rows = torch.arange(len(leaf), device=leaf.device)
        return {
            P_MAIN: log_p_main.exp()[:n].cpu().numpy(),
            P_LEAF: log_p_leaf.exp()[:n].cpu().numpy(),
            P_SUB: log_p_sub[rows, leaf].exp()[:n].cpu().numpy(),
            PRED_MAIN: main[:n].cpu().numpy(),
            PRED_LEAF: leaf[:n].cpu().numpy(),
            RAW_LOG_P_MAIN: raw_main[:n].cpu().numpy(),
            RAW_LOG_P_SUB: raw_sub[:n].cpu().numpy(),
        }

    def empty(self, n: int) -> dict[str, np.ndarray]:
        tax = self.taxonomy
        return {
            P_MAIN: np.full((n, tax.num_mains), np.nan, np.float32),
            P_LEAF: np.full((n, tax.num_leaves), np.nan, np.float32),
            P_SUB: np.full(n, np.nan, np.float32),
            PRED_MAIN: np.full(n, -1, np.int64),
            PRED_LEAF: np.full(n, -1, np.int64),
            RAW_LOG_P_MAIN: np.full((n, tax.num_mains), np.nan, np.float32),
            RAW_LOG_P_SUB: np.full((n, tax.num_leaves), np.nan, np.float32),
        }


def prediction_fields(taxonomy: Taxonomy, predictions: dict[str, np.ndarray], ok: np.ndarray | None = None,
                      referral: Referral = Referral()) -> dict[str, np.ndarray]:
    """Prediction arrays of N rows -> the named fields every output carries, as (N,) arrays:
    ``main_label``, ``main_prob``, ``sub_label``, ``sub_prob`` (P(sub | main)), ``leaf_label``,
    ``leaf_prob`` (P(main) x P(sub | main)), ``refer`` (with ``referral``'s thresholds) and
    ``p_<main>__<sub>`` per leaf. Rows outside ``ok`` get None labels and referral, and NaN
    probabilities."""
    n = len(predictions[PRED_LEAF])
    ok = np.ones(n, bool) if ok is None else np.asarray(ok, bool)
    main, leaf = np.where(ok, predictions[PRED_MAIN], 0).astype(np.int64), np.where(ok, predictions[PRED_LEAF], 0).astype(np.int64)
    rows = np.arange(n)
    names = lambda values: np.where(ok, np.asarray(values, dtype=object), None)  # noqa: E731
    leaf_prob = np.where(ok, predictions[P_LEAF][rows, leaf], np.nan).astype(np.float32)
    referred = refer(np.nan_to_num(predictions[P_LEAF]), np.nan_to_num(leaf_prob), referral)
    return {
        MAIN_LABEL: names(np.array(taxonomy.mains, dtype=object)[main]),
        MAIN_PROB: np.where(ok, predictions[P_MAIN][rows, main], np.nan).astype(np.float32),
        SUB_LABEL: names(np.array([s for _, s in taxonomy.leaves], dtype=object)[leaf]),
        SUB_PROB: np.where(ok, predictions[P_SUB], np.nan).astype(np.float32),
        LEAF_LABEL: names(np.array(taxonomy.leaf_names, dtype=object)[leaf]),
        LEAF_PROB: leaf_prob,
        REFER: names(referred.tolist()),
        **{leaf_column(name): predictions[P_LEAF][:, i].astype(np.float32) for i, name in enumerate(taxonomy.leaf_names)},
    }


def answer(taxonomy: Taxonomy, predictions: dict[str, np.ndarray], i: int, referral: Referral = Referral()) -> dict[str, Any]:
    """Row ``i`` of a forward pass -> the online endpoint's answer: the report row's fields
    (:data:`RESULT_FIELDS`, ``refer`` with ``referral``'s thresholds) and every class's
    probability (``main_probs``, ``leaf_probs``)."""
    row = {k: v[i : i + 1] for k, v in predictions.items()}
    fields = prediction_fields(taxonomy, row, referral=referral)
    out: dict[str, Any] = {k: _plain(fields[k][0]) for k in RESULT_FIELDS}
    out[MAIN_PROBS] = dict(zip(taxonomy.mains, predictions[P_MAIN][i].astype(float).tolist()))
    out[LEAF_PROBS] = dict(zip(taxonomy.leaf_names, predictions[P_LEAF][i].astype(float).tolist()))
    return out


def _plain(value: Any) -> Any:
    """A field's value as JSON has it: str, bool or float."""
    if isinstance(value, (str, bool, np.bool_)) or value is None:
        return bool(value) if isinstance(value, np.bool_) else value
    return float(value)


def report_columns(taxonomy: Taxonomy) -> list[tuple[str, pa.DataType]]:
    """The classifier's report columns and types (between the object's and the model's)."""
    return [
        (MAIN_LABEL, pa.string()), (MAIN_PROB, pa.float32()), (SUB_LABEL, pa.string()), (SUB_PROB, pa.float32()),
        (LEAF_LABEL, pa.string()), (LEAF_PROB, pa.float32()), (REFER, pa.bool_()),
        *[(leaf_column(n), pa.float32()) for n in taxonomy.leaf_names],
        (EXPLAIN_PATH, pa.string()), *[(k, pa.float32()) for k in EXPLAIN_LOCATION], (SR_PATH, pa.string()),
    ]


def report_values(taxonomy: Taxonomy, batch: dict[str, np.ndarray], ok: np.ndarray, referral: Referral = Referral()) -> dict[str, pa.Array]:
    """Scored rows (with the Grad-CAM and SR stages' columns when they ran) -> the classifier's
    report columns (NaN probabilities become nulls)."""
    n = len(ok)
    fields = prediction_fields(taxonomy, batch, ok, referral)
    floats = lambda values: pa.array(np.asarray(values, np.float32), pa.float32(), from_pandas=True)  # noqa: E731
    out: dict[str, pa.Array] = {}
    for name, dtype in report_columns(taxonomy):
        if name in fields:
            out[name] = floats(fields[name]) if dtype == pa.float32() else pa.array(list(fields[name]), dtype)
    out[EXPLAIN_PATH] = _paths(batch.get(EXPLAIN_PATH), n)
    out.update({k: floats(batch.get(k, np.full(n, np.nan))) for k in EXPLAIN_LOCATION})
    out[SR_PATH] = _paths(batch.get(SR_PATH), n)
    return out


def _paths(values, n: int) -> pa.Array:
    """A column of relative paths, null where there is none (Ray Data hands a column that was
    all None in a block back as NaN floats)."""
    return pa.array([v if isinstance(v, str) else None for v in (values if values is not None else [None] * n)], pa.string())


class LeafTally:
    """Counts committed ok rows per predicted leaf, in taxonomy order (the summary's classes)."""

    def __init__(self, taxonomy: Taxonomy):
        self.names = taxonomy.leaf_names
        self._counter: Counter = Counter()

    def __call__(self, table: pa.Table) -> None:
        ok = table.filter(pc.equal(table[C.STATUS], C.STATUS_OK))
        self._counter.update(ok[LEAF_LABEL].to_pylist())

    @property
    def counts(self) -> dict[str, int]:
        return {name: self._counter.get(name, 0) for name in self.names}
