"""The segmentation model's training step and validation, handed to the platform's harness
(:mod:`medhier.train.loop`) as the classifier hands it its own: augmentation on the device
(:mod:`medhier.plaque.seg_presets`), MONAI's ``DiceCELoss``, and the validation metrics that pick
``best/`` and stop early.

Loss: ``DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)``
weighted ``seg.dice_weight`` : ``seg.ce_weight``. ``batch=True`` takes each label's Dice over the
whole batch, not per slice: a plaque component lies in a few slices only, and a per-slice Dice
of a label a slice does not hold says nothing. ``seg.class_weights`` gives the loss a weight per
label from the training split's voxels per label (:func:`class_weights`): the plaque components
hold about 0.1 % of the voxels, and unweighted they hardly move the loss.

Validation (rank 0, every validation slice): ``val_loss``; ``val_dice``, the mean over the
foreground labels of each label's Dice over all validation voxels (MONAI's
``get_confusion_matrix`` per batch, summed over the split, then its "f1 score", which is
Dice); ``dice_<label>`` for each label (null where neither truth nor prediction holds it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.metrics import compute_confusion_matrix_metric, get_confusion_matrix
from ray.data.collate_fn import NumpyBatchCollateFn

from medhier.config import Config
from medhier.plaque import labels as L
from medhier.plaque.seg_inputs import input_channels
from medhier.plaque.seg_presets import eval_preset, train_preset
from medhier.plaque.seg_samples import INPUTS, LABEL_MAP
from medhier.train.loop import Env

__all__ = ["COLUMNS", "SampleCollate", "SegStep", "class_weights", "dice_by_label"]

COLUMNS = (INPUTS, LABEL_MAP)  # what a training batch needs from the cache


class SampleCollate(NumpyBatchCollateFn):
    """Ray Data numpy batch -> tensors: float16 inputs (B, C, S, S), uint8 label maps (B, S, S)."""

    def __init__(self, channels: int, size: int):
        self.channels, self.size = channels, size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        # b"".join copies into fresh, writable memory: torch may own it as it is
        inputs = bytearray(b"".join(batch[INPUTS]))
        labels = bytearray(b"".join(batch[LABEL_MAP]))
        return {
            INPUTS: torch.frombuffer(inputs, dtype=torch.float16).view(-1, self.channels, self.size, self.size),
            LABEL_MAP: torch.frombuffer(labels, dtype=torch.uint8).view(-1, self.size, self.size),
        }


def dice_by_label(confusion: torch.Tensor) -> list[float | None]:
    """Voxel counts per label, (labels, 4) as MONAI's ``get_confusion_matrix`` orders them (tp,
    fp, tn, fn), summed over a split -> Dice per label (MONAI's "f1 score"), None where neither
    truth nor prediction holds the label."""
    dice = compute_confusion_matrix_metric("f1 score", confusion.double())
    return [None if math.isnan(d) else float(d) for d in dice.tolist()]


def class_weights(counts: dict[str, int], mode: str = "inverse_sqrt", max_weight: float = 50.0) -> np.ndarray | None:
    """The training split's voxels per label name (``class_counts`` of the cache) -> DiceCELoss's
    weight per label value, float32 (len(labels.NAMES),), or None for ``mode`` "none".

    "inverse_sqrt": sqrt(n_max / n_label), n_max the commonest label's voxels (so that label gets
    1), capped at ``max_weight``. "inverse_sqrt_fg": the same with the background counted as if
    it held no more voxels than the commonest foreground label, so background, lumen and wall keep
    about equal weights and only the plaque components are raised (plain "inverse_sqrt" weighs the
    background ~1/6 of lumen and wall on the phantoms, and the model grows the vessel). Then the
    weights are scaled so that the foreground labels' average 1: cross-entropy's weighted mean
    does not depend on the scale, and the Dice term (foreground labels only,
    include_background=False) keeps its size, so seg.dice_weight : seg.ce_weight keeps its
    meaning. The square root, not the plain inverse: a 1000-fold rarer label weighed 1000-fold
    makes the model paint it everywhere. A label with no training voxels gets 1 before the scaling
    (as the commonest label): CE never meets it as truth, and its Dice term only teaches the model
    not to predict it, which needs no extra push. No voxels at all: all 1.
    """
    if mode == "none":
        return None
    if mode not in ("inverse_sqrt", "inverse_sqrt_fg"):
        raise ValueError(f"class_weights: mode {mode!r}: expected 'none', 'inverse_sqrt' or 'inverse_sqrt_fg'")
    if not max_weight >= 1:
        raise ValueError(f"class_weights: max_weight must be >= 1, got {max_weight}")
    n = np.array([max(int(counts.get(name, 0) or 0), 0) for name in L.NAMES], dtype=np.float64)
    if mode == "inverse_sqrt_fg" and n[1:].any():
        n[L.BACKGROUND] = min(n[L.BACKGROUND], n[1:].max())
    weights = np.ones(len(L.NAMES))
    present = n > 0
    if present.any():
        weights[present] = np.minimum(np.sqrt(n[present].max() / n[present]), max_weight)
    return (weights / weights[1:].mean()).astype(np.float32)


class SegStep:
    """:class:`medhier.train.loop.Step` of the plaque segmentation model."""

    def __init__(self, cfg: Config, env: Env, class_counts: dict[str, int]):
        self.cfg, self.env = cfg, env
        seg = cfg.seg
        weight = class_weights(class_counts, seg.class_weights, seg.max_class_weight)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True,
                                  lambda_dice=seg.dice_weight, lambda_ce=seg.ce_weight,
                                  weight=None if weight is None else torch.from_numpy(weight)).to(env.device)
        self.augment = train_preset(seg).to(env.device)
        self.plain = eval_preset(seg).to(env.device)
        self.metric, self.minimise = seg.metric, seg.metric == "val_loss"

    def collate(self) -> SampleCollate:
        return SampleCollate(input_channels(self.cfg.seg), self.cfg.seg.image_size)

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": self.cfg.seg.lr,
                 "weight_decay": self.cfg.train.weight_decay}]

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, int]:
        env = self.env
        inputs, labels = self.augment(batch[INPUTS].to(env.device), batch[LABEL_MAP].to(env.device), generator)
        with env.autocast():
            logits = model(inputs.contiguous(memory_format=env.memory_format))
        return self.loss_fn(logits.float(), labels[:, None]), len(inputs)

    def evaluate(self, model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Loss and Dice on a whole split (rank 0, no collectives)."""
        env = self.env
        n, loss_sum = 0, 0.0
        confusion = torch.zeros(len(L.NAMES), 4, dtype=torch.float64)
        for batch in batches:
            inputs, labels = self.plain(batch[INPUTS].to(env.device), batch[LABEL_MAP].to(env.device))
            with env.autocast():
                logits = model(inputs.contiguous(memory_format=env.memory_format))
            loss_sum += self.loss_fn(logits.float(), labels[:, None]).item() * len(inputs)
            n += len(inputs)
            confusion += get_confusion_matrix(_one_hot(logits.argmax(1)), _one_hot(labels)).sum(0).double().cpu()
        if n == 0:
            return {"val_loss": None}
        dice = dice_by_label(confusion)
        foreground = [d for d in dice[1:] if d is not None]
        return {
            "val_loss": loss_sum / n,
            "val_dice": float(np.mean(foreground)) if foreground else None,
            **{f"dice_{name}": dice[v] for v, name in enumerate(L.NAMES) if v},
            "metrics": {"slices": n, "dice": dict(zip(L.NAMES, dice)),
                        "voxels": {name: dict(zip(("true_positive", "false_positive", "true_negative", "false_negative"), map(int, row)))
                                   for name, row in zip(L.NAMES, confusion.tolist())}},
        }


def _one_hot(labels: torch.Tensor) -> torch.Tensor:
    """int (B, S, S) -> one-hot (B, labels, S, S), as MONAI's metrics take them."""
    return F.one_hot(labels, len(L.NAMES)).permute(0, 3, 1, 2)
