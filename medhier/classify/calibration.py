"""Calibrated probabilities: one temperature per level (and optionally one bias per class),
fitted after training on the validation split, and how well probabilities match outcomes (ECE,
reliability diagrams).

Temperature scaling (Guo et al., ICML 2017) divides logits by T before the softmax: T > 1
softens an over-confident model, T < 1 sharpens an under-confident one, and the argmax never
changes, so predictions and accuracy stay as they are. The hierarchical model has two softmaxes
and so two temperatures: ``main`` for the main logits, ``sub`` for the leaf logits before the
within-main softmax (P(sub | main)); P(leaf) = P(main) x P(sub | main) is then calibrated by
construction. ``main`` minimises the validation NLL of the true main class; ``sub`` the NLL of
the true subclass *given the true main class* (what the subclass head is trained on), over images
whose main class has more than one subclass. Both are stored in the checkpoint's
``task_meta["temperatures"] = {"main": T, "sub": T}`` (``sub`` may also be a list, one per main
class, which :func:`temper` applies; fitting gives one) and applied by the predictor
(:class:`medhier.classify.report.ClassifierPredictor`) wherever probabilities leave medhier. The
flat baseline head has no main logits and is left uncalibrated.

A temperature cannot move probability from one class to another, and the balanced class weights
medhier trains with by default (``train.class_weights``) do exactly that: a loss weighting class
c by w_c fits probabilities proportional to w_c P(c | x), so the rare classes are over-predicted
on every image however confident the model is. Bias-corrected temperature scaling (BCTS:
Alexandari, Kundaje and Shrikumar, ICML 2020) adds one fitted bias per class to the tempered
logits of each level: ``main_bias`` (one per main class) and ``sub_bias`` (one per leaf, added
before the within-main softmax), stored beside the temperatures. In three phantom trainings of
``benchmarks/trust.py`` (fitted on 239 validation images, ECE measured on 2,000 held-out ones)
one temperature per level left 0.69-1.10 of the ECE, the biases beside it 0.15-0.39
(RESULTS.md, issue 21). The biases are M + L more parameters: on a few dozen validation images they overfit, so
``train.calibration: auto`` fits them only from :data:`BIAS_MIN_IMAGES` validation images on.
Unlike a temperature, biases can change the most probable class: decisions then follow the
calibrated probabilities, i.e. the training split's class frequencies rather than the weighted
loss's.

ECE (expected calibration error): images binned by confidence into 15 equal-width bins
([left, right)); the image-weighted mean of |accuracy - mean confidence| per bin. Top-label ECE
uses each image's highest probability and whether that class was right; class-wise ECE
(Kull et al. 2019) bins every class's one-vs-rest probability and averages over classes. This is
MONAI's ``CalibrationErrorMetric`` (expected reduction, ``calibration_binning``) in numpy:
importing MONAI costs ~15 s per process here, which every evaluation would pay.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medhier.classify.taxonomy import Taxonomy

__all__ = ["BIAS_MIN_IMAGES", "BINS", "TEMPERATURES", "Temperatures", "calibration_errors", "fit_temperatures", "reliability_png", "temper"]

TEMPERATURES = "temperatures"  # the checkpoint's task_meta key
BINS = 15
_LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))
BIAS_MIN_IMAGES = 100  # train.calibration=auto fits class biases from this many validation images on
_BIAS_L2 = 1e-3  # a softmax ignores a constant added to every bias: the penalty picks zero-mean ones


@dataclass(frozen=True)
class Temperatures:
    """Logit temperatures: ``main`` divides the main logits, ``sub`` the leaf logits (one value,
    or one per main class, applied to its leaves); optional biases added after dividing:
    ``main_bias`` one per main class, ``sub_bias`` one per leaf (module docstring)."""

    main: float
    sub: float | tuple[float, ...]
    main_bias: tuple[float, ...] | None = None
    sub_bias: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"main": self.main, "sub": list(self.sub) if isinstance(self.sub, tuple) else self.sub}
        for key in ("main_bias", "sub_bias"):
            if getattr(self, key) is not None:
                out[key] = list(getattr(self, key))
        return out

    @classmethod
    def from_meta(cls, task_meta: dict[str, Any], where: str = "checkpoint") -> Temperatures | None:
        """``task_meta["temperatures"]`` -> Temperatures, None when the checkpoint has none.
        Raises ValueError naming ``where`` for values that are not finite positive numbers."""
        raw = task_meta.get(TEMPERATURES)
        if raw is None:
            return None
        try:
            main, sub = float(raw["main"]), raw["sub"]
            sub = float(sub) if np.isscalar(sub) else tuple(float(t) for t in sub)
            biases = {key: None if raw.get(key) is None else tuple(float(b) for b in raw[key]) for key in ("main_bias", "sub_bias")}
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: temperatures must be {{'main': T, 'sub': T or [T per main class]}} (optionally "
                             f"'main_bias': [one per main class], 'sub_bias': [one per leaf]), got {raw!r}") from None
        values = (main, *(sub if isinstance(sub, tuple) else (sub,)))
        if not all(math.isfinite(t) and t > 0 for t in values):
            raise ValueError(f"{where}: temperatures must be finite and > 0, got {raw!r}")
        if not all(math.isfinite(b) for bias in biases.values() if bias for b in bias):
            raise ValueError(f"{where}: temperature biases must be finite, got {raw!r}")
        return cls(main, sub, **biases)


def temper(log_p_main: torch.Tensor, log_p_sub: torch.Tensor, t: Temperatures | None,
           taxonomy: Taxonomy) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's (B, M) log P(main) and (B, L) log P(sub | main) -> calibrated (log P(main),
    log P(sub | main), log P(leaf)), float32. Dividing log-probabilities by T and renormalising
    equals dividing the logits by T: a softmax ignores the constant its log subtracted. Biases,
    where ``t`` has them, are added after dividing (the same argument: log P + b = logits + b +
    a constant)."""
    log_p_main, log_p_sub = log_p_main.float(), log_p_sub.float()
    if t is not None:
        device = log_p_sub.device
        leaf_main = torch.as_tensor(taxonomy.leaf_main, device=device)
        mask = torch.as_tensor(taxonomy.leaf_mask, device=device)  # (M, L)
        sub_t = torch.as_tensor(t.sub, dtype=torch.float32, device=device).reshape(-1)
        if len(sub_t) not in (1, taxonomy.num_mains):
            raise ValueError(f"temperatures: 'sub' needs 1 or {taxonomy.num_mains} values (one per main class), got {len(sub_t)}")
        main_b, sub_b = _bias(t.main_bias, taxonomy.num_mains, "main_bias", device), _bias(t.sub_bias, taxonomy.num_leaves, "sub_bias", device)
        scaled = log_p_sub / sub_t.expand(taxonomy.num_mains)[leaf_main] + sub_b
        # -inf outside each main's own leaves: a group's logsumexp sees only its members.
        group = torch.logsumexp(scaled.unsqueeze(1).masked_fill(~mask, float("-inf")), dim=-1)  # (B, M)
        log_p_main = torch.log_softmax(log_p_main / t.main + main_b, dim=-1)
        log_p_sub = scaled - group[:, leaf_main]
    return log_p_main, log_p_sub, log_p_main[:, torch.as_tensor(taxonomy.leaf_main, device=log_p_main.device)] + log_p_sub


def _bias(bias: tuple[float, ...] | None, n: int, name: str, device: torch.device) -> torch.Tensor | float:
    if bias is None:
        return 0.0
    if len(bias) != n:
        raise ValueError(f"temperatures: {name!r} needs {n} values, got {len(bias)}")
    return torch.as_tensor(bias, dtype=torch.float32, device=device)


def _nll(log_p: np.ndarray, y: np.ndarray, log_t: float) -> float:
    z = log_p / math.exp(log_t)
    z = z - z.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))


def _fit_one(log_p: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the NLL of ``y`` under softmax(log_p / T) (bounded search over log T)."""
    if not len(y):
        return 1.0
    from scipy.optimize import minimize_scalar  # ~0.3 s: fitting only, never in a model actor or the scoring driver

    result = minimize_scalar(lambda lt: _nll(log_p, y, lt), bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    return float(math.exp(result.x))


def _fit_biased(log_p: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """(T, bias (K,)) minimising the NLL of ``y`` under softmax(log_p / T + bias) plus
    ``_BIAS_L2`` |bias|^2 (L-BFGS-B with analytic gradients, log T bounded as for one temperature).
    Entries of ``log_p`` at -1e30 stay out of their row's softmax."""
    if not len(y):
        return 1.0, np.zeros(log_p.shape[1])
    from scipy.optimize import minimize  # ~0.3 s: fitting only, never in a model actor or the scoring driver

    n, k = log_p.shape
    onehot = np.eye(k)[y]

    def loss(x: np.ndarray) -> tuple[float, np.ndarray]:
        t, bias = math.exp(x[0]), x[1:]
        z = log_p / t + bias
        z = z - z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        nll = -np.log(np.maximum(p[np.arange(n), y], 1e-300)).mean()
        residual = (p - onehot) / n  # d(mean NLL) / dz
        scaled = np.where(log_p > -1e29, log_p / t, 0.0)  # dz / d(log T) = -log_p / T
        grad_t = -(residual * scaled).sum()
        return float(nll + _BIAS_L2 * bias @ bias), np.concatenate([[grad_t], residual.sum(0) + 2 * _BIAS_L2 * bias])

    result = minimize(loss, np.zeros(k + 1), jac=True, method="L-BFGS-B", bounds=[_LOG_T_BOUNDS] + [(-20.0, 20.0)] * k)
    return float(math.exp(result.x[0])), result.x[1:]


def fit_temperatures(log_p_main: np.ndarray, log_p_sub: np.ndarray, main_true: np.ndarray, leaf_true: np.ndarray,
                     taxonomy: Taxonomy, bias: bool = False) -> Temperatures:
    """Fit :class:`Temperatures` on labelled held-out images (see the module docstring).

    ``log_p_main`` (N, M) and ``log_p_sub`` (N, L): the model's own log-probabilities (before
    any temperature); ``main_true``, ``leaf_true``: (N,) class indices. ``bias``: also fit one
    bias per main class and one per leaf (BCTS). A level with nothing to fit on (no image of a
    main class with two subclasses) keeps T = 1 and zero biases."""
    log_p_main, log_p_sub = np.asarray(log_p_main, np.float64), np.asarray(log_p_sub, np.float64)
    main_true, leaf_true = np.asarray(main_true, np.int64), np.asarray(leaf_true, np.int64)
    if not (len(log_p_main) == len(log_p_sub) == len(main_true) == len(leaf_true)):
        raise ValueError(f"fit_temperatures: arrays of different lengths {len(log_p_main)}, {len(log_p_sub)}, {len(main_true)}, {len(leaf_true)}")
    multi = np.array([len(s) > 1 for s in taxonomy.subs])[main_true]
    # Within the true main: its leaves' log P(sub | main), -1e30 elsewhere (softmax weight 0).
    within = np.where(taxonomy.leaf_mask[main_true[multi]], log_p_sub[multi], -np.inf)
    within = np.where(np.isfinite(within), within, -1e30)
    if not bias:
        return Temperatures(round(_fit_one(log_p_main, main_true), 5), round(_fit_one(within, leaf_true[multi]), 5))
    (t_main, b_main), (t_sub, b_sub) = _fit_biased(log_p_main, main_true), _fit_biased(within, leaf_true[multi])
    return Temperatures(round(t_main, 5), round(t_sub, 5), tuple(round(float(b), 5) for b in b_main), tuple(round(float(b), 5) for b in b_sub))


def _binned(confidence: np.ndarray, outcome: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> per bin (mean confidence, mean outcome, count), NaN means for empty bins."""
    edges = np.linspace(0.0, 1.0 + np.finfo(np.float32).eps, bins + 1)
    index = np.clip(np.searchsorted(edges[1:], confidence, side="right"), 0, bins - 1)
    counts = np.bincount(index, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(index, confidence, minlength=bins) / counts
        acc = np.bincount(index, outcome.astype(np.float64), minlength=bins) / counts
    return conf, acc, counts


def _ece(confidence: np.ndarray, outcome: np.ndarray, bins: int) -> float:
    conf, acc, counts = _binned(confidence, outcome, bins)
    filled = counts > 0
    return float((np.abs(conf - acc)[filled] * counts[filled]).sum() / counts.sum())


def calibration_errors(p: np.ndarray, y: np.ndarray, bins: int = BINS) -> dict[str, float]:
    """(N, K) probabilities, (N,) true class -> {"ece": top-label ECE, "classwise_ece": mean
    over classes of the one-vs-rest ECE} (see the module docstring); NaN-free, N >= 1."""
    p, y = np.asarray(p, np.float64), np.asarray(y, np.int64)
    if p.ndim != 2 or len(p) != len(y) or not len(y):
        raise ValueError(f"calibration_errors: need (N, K) probabilities and (N,) labels with N >= 1, got {p.shape} and {y.shape}")
    top = p.argmax(1)
    onehot = np.eye(p.shape[1], dtype=bool)[y]
    return {
        "ece": _ece(p.max(1), top == y, bins),
        "classwise_ece": float(np.mean([_ece(p[:, k], onehot[:, k], bins) for k in range(p.shape[1])])),
    }


def reliability_png(path: str | os.PathLike, title: str, curves: dict[str, tuple[np.ndarray, np.ndarray]], bins: int = BINS) -> str:
    """A reliability diagram: per curve name ({"before": (p (N, K), y (N,)), "after": ...}) the
    accuracy of each confidence bin against its mean confidence, the diagonal being perfect
    calibration; the ECE in the legend. Writes a PNG at ``path`` -> path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # ~0.5 s: plotting only, never in a model actor
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 6.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    for name, (p, y) in curves.items():
        p, y = np.asarray(p, np.float64), np.asarray(y, np.int64)
        conf, acc, counts = _binned(p.max(1), p.argmax(1) == y, bins)
        filled = counts > 0
        ece = calibration_errors(p, y, bins)["ece"]
        ax.plot(conf[filled], acc[filled], marker="o", lw=1.8, label=f"{name} (ECE {ece:.3f}, n={len(y)})")
    ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", xlabel="confidence (probability of the predicted class)",
           ylabel="accuracy in the bin", title=f"{title} — reliability ({bins} bins)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    fig.savefig(path, dpi=110)
    return os.fspath(path)
