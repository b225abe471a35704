"""The classifier's training step and validation, handed to the platform's harness
(:mod:`medhier.train.loop`): augmentation on the device, the hierarchical loss with class
weights, and the validation metrics that pick ``best/`` and stop early."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from medhier import columns as C
from medhier.classify.labels import LEAF_INDEX, MAIN_INDEX
from medhier.classify.metrics import balanced_class_weights, evaluate, subclass_weights
from medhier.classify.model import HierarchicalLoss
from medhier.classify.presets import eval_preset, train_preset
from medhier.classify.taxonomy import Taxonomy
from medhier.config import MINIMISED_METRICS, Config
from medhier.train.loop import Env

__all__ = ["ClassifyStep", "class_weights"]


class ImageCollate(NumpyBatchCollateFn):
    """Ray Data numpy batch -> tensors; images arrive as raw uint8 bytes per row."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        # b"".join copies into fresh, writable memory: torch may own it as it is
        images = bytearray(b"".join(batch[C.IMAGE]))
        return {
            C.IMAGE: torch.frombuffer(images, dtype=torch.uint8).view(-1, self.image_size, self.image_size),
            MAIN_INDEX: torch.tensor(batch[MAIN_INDEX], dtype=torch.long),
            LEAF_INDEX: torch.tensor(batch[LEAF_INDEX], dtype=torch.long),
        }


class ClassifyStep:
    """:class:`medhier.train.loop.Step` of the hierarchical classifier."""

    def __init__(self, cfg: Config, env: Env, class_counts: dict[str, int]):
        self.cfg, self.env = cfg, env
        self.taxonomy = Taxonomy.from_config(cfg.taxonomy)
        tc = cfg.train
        main_w, leaf_w = class_weights(self.taxonomy, class_counts) if tc.class_weights else (None, None)
        self.loss_fn = HierarchicalLoss(self.taxonomy, tc.sub_loss_weight, tc.label_smoothing, main_w, leaf_w,
                                        flat=cfg.model.head == "flat").to(env.device)
        self.augment = train_preset(cfg.preprocess).to(env.device)
        self.plain = eval_preset(cfg.preprocess).to(env.device)
        self.metric, self.minimise = tc.metric, tc.metric in MINIMISED_METRICS

    def collate(self) -> ImageCollate:
        return ImageCollate(self.cfg.preprocess.image_size)

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        tc = self.cfg.train
        return model.param_groups(tc.lr_backbone, tc.lr_head, tc.weight_decay)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, int]:
        env = self.env
        images = self.augment(batch[C.IMAGE].to(env.device), generator).contiguous(memory_format=env.memory_format)
        with env.autocast():
            out = model(images)
        loss = self.loss_fn(out, batch[MAIN_INDEX].to(env.device), batch[LEAF_INDEX].to(env.device))["loss"]
        return loss, len(images)

    def evaluate(self, model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Loss and metrics on a whole split (rank 0, no collectives)."""
        env = self.env
        p_main, p_leaf, mains, leaves, loss_sum, n = [], [], [], [], 0.0, 0
        for batch in batches:
            images = self.plain(batch[C.IMAGE].to(env.device)).contiguous(memory_format=env.memory_format)
            main_label, leaf_label = batch[MAIN_INDEX].to(env.device), batch[LEAF_INDEX].to(env.device)
            with env.autocast():
                out = model(images)
            loss_sum += self.loss_fn(out, main_label, leaf_label)["loss"].item() * len(images)
            n += len(images)
            p_main.append(out.log_p_main.exp().float().cpu().numpy())
            p_leaf.append(out.log_p_leaf.exp().float().cpu().numpy())
            mains.append(main_label.cpu().numpy())
            leaves.append(leaf_label.cpu().numpy())
        if n == 0:
            return {"val_loss": None}
        metrics = evaluate(self.taxonomy, np.concatenate(mains), np.concatenate(leaves), renormalised(np.concatenate(p_main)),
                           renormalised(np.concatenate(p_leaf)))
        return {
            "val_loss": loss_sum / n,
            "main_accuracy": metrics["main"]["accuracy"],
            "leaf_accuracy": metrics["leaf"]["accuracy"],
            "main_macro_auc": metrics["main"]["macro"]["roc_auc"],
            "leaf_macro_auc": metrics["leaf"]["macro"]["roc_auc"],
            "path_accuracy": metrics["hierarchy"]["path_accuracy"],
            "consistency": metrics["hierarchy"]["consistency"],
            "metrics": metrics,
        }


def class_weights(taxonomy: Taxonomy, counts: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Balanced class weights (seed 001 §5.2) from the training split's images per leaf name ->
    (main-class weights (M,), leaf weights within their main class (L,))."""
    per_leaf = np.array([int(counts.get(name, 0)) for name in taxonomy.leaf_names])
    leaf_labels = np.repeat(np.arange(taxonomy.num_leaves), per_leaf)
    return balanced_class_weights(taxonomy.leaf_main[leaf_labels], taxonomy.num_mains), subclass_weights(taxonomy, leaf_labels)


def renormalised(p: np.ndarray) -> np.ndarray:
    """Probability rows summing to 1 exactly: bf16/fp32 rounding leaves them a hair off, and
    the metrics check sums strictly."""
    p = np.clip(p.astype(np.float64), 0, None)
    return p / p.sum(1, keepdims=True)
