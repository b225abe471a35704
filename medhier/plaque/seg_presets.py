"""The segmentation model's paired presets, per batch on the training (or segmenting) device:
float16 inputs (B, C, S, S) and uint8 label maps (B, S, S) as the cache holds them
(:mod:`medhier.plaque.seg_samples`) -> float32 inputs and int64 labels; ``train_preset`` also
augments, ``eval_preset`` never does.

Augmentation, drawn per sample: one affine map per slice — a rotation in
[-``seg.rotation_deg``, ``seg.rotation_deg``], an isotropic zoom in ``seg.scale``, a left-right
flip with probability ``seg.hflip`` (carotids are left or right), an anterior-posterior one with
``seg.vflip`` — applied with one ``grid_sample`` to the inputs (bilinear) and to the label map
(nearest: labels stay labels), outside the image 0 (background); then per sequence a gain in
[1 - ``seg.intensity_scale``, 1 + ``seg.intensity_scale``] and an offset in
[-``seg.intensity_shift``, ``seg.intensity_shift``] (the same for a sequence's neighbouring
slices in 2.5-D: one coil, one scan).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medhier.config import SegConfig

__all__ = ["EvalPreset", "TrainPreset", "eval_preset", "train_preset"]


class EvalPreset(nn.Module):
    """Deterministic: (inputs, labels) -> (float32 (B, C, S, S), int64 (B, S, S) or None)."""

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return inputs.float(), None if labels is None else labels.long()


class TrainPreset(nn.Module):
    """Random per-sample augmentation (module docstring), the same geometry for inputs and labels."""

    def __init__(self, cfg: SegConfig):
        super().__init__()
        self.cfg = cfg
        self.sequences = len(cfg.sequences)

    def _uniform(self, shape, low: float, high: float, generator, device) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=device) * (high - low) + low

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, b, dev = self.cfg, inputs.shape[0], inputs.device
        x = inputs.float()
        angle = self._uniform(b, -math.radians(cfg.rotation_deg), math.radians(cfg.rotation_deg), generator, dev)
        zoom = self._uniform(b, cfg.scale[0], cfg.scale[1], generator, dev)
        fx = torch.where(torch.rand(b, generator=generator, device=dev) < cfg.hflip, -1.0, 1.0)
        fy = torch.where(torch.rand(b, generator=generator, device=dev) < cfg.vflip, -1.0, 1.0)
        # grid_sample reads, for each output pixel, the input at theta @ (x, y, 1): the inverse of
        # "flip, rotate, then zoom", i.e. flip @ rotate(-angle) / zoom.
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 1] = cos * fx, sin * fx
        theta[:, 1, 0], theta[:, 1, 1] = -sin * fy, cos * fy
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        y = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0].long()
        slices = x.shape[1] // self.sequences
        gain = self._uniform((b, self.sequences), 1 - cfg.intensity_scale, 1 + cfg.intensity_scale, generator, dev).repeat(1, slices)
        shift = self._uniform((b, self.sequences), -cfg.intensity_shift, cfg.intensity_shift, generator, dev).repeat(1, slices)
        return x * gain[:, :, None, None] + shift[:, :, None, None], y


def train_preset(cfg: SegConfig) -> TrainPreset:
    """The randomising preset for training batches."""
    return TrainPreset(cfg)


def eval_preset(cfg: SegConfig) -> EvalPreset:
    """The deterministic preset for validation, evaluation and segmenting."""
    return EvalPreset()
