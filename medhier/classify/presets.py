"""The classifier's paired presets, on the training or scoring device, per batch:
uint8 (B, S, S) images (as ``medhier.io.image`` makes them, once per image on the CPU) -> [0, 1]
-> augmentation (``train_preset``) or nothing (``eval_preset``) -> 3 channels -> ImageNet
normalisation.

Augmentation follows the seeds (rotation +-15 deg, shifts 0.1, shear, zoom 0.9-1.1, flips,
Gaussian blur, black fill) and draws its parameters per sample while transforming the whole
batch in one ``grid_sample`` and one grouped convolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medhier.config import PreprocessConfig

__all__ = ["EvalPreset", "TrainPreset", "eval_preset", "train_preset"]


# -- training device: uint8 batch -> normalised 3-channel tensor ----------------------------


class _Normalise(nn.Module):
    def __init__(self, cfg: PreprocessConfig):
        super().__init__()
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) float in [0, 1] -> (B, 3, S, S) normalised."""
        return (x.expand(-1, 3, -1, -1) - self.mean) / self.std


def _as_unit_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S) or (B, 1, S, S) -> float32 (B, 1, S, S) in [0, 1]."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"expected a (B, S, S) or (B, 1, S, S) image batch, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


class EvalPreset(nn.Module):
    """Deterministic: uint8 (B, S, S) -> normalised float32 (B, 3, S, S)."""

    def __init__(self, cfg: PreprocessConfig):
        super().__init__()
        self.normalise = _Normalise(cfg)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalise(_as_unit_batch(images))


class TrainPreset(nn.Module):
    """Random per-sample augmentation: uint8 (B, S, S) -> normalised float32 (B, 3, S, S).

    Geometry (rotation, shift, shear, zoom, flips) is one affine matrix per sample applied with
    ``grid_sample``; pixels from outside the image are black (seed 001's ``cval=0``). Blur is a
    per-sample Gaussian applied with one grouped separable convolution.
    """

    def __init__(self, cfg: PreprocessConfig):
        super().__init__()
        self.cfg = cfg
        self.normalise = _Normalise(cfg)
        max_sigma = cfg.blur_sigma[1]
        self.kernel_half = max(1, math.ceil(3 * max_sigma))

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = _as_unit_batch(images)
        x = self._affine(x, generator)
        if self.cfg.blur_prob > 0:
            x = self._blur(x, generator)
        return self.normalise(x)

    def _uniform(self, n: int, low: float, high: float, generator, device) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=device) * (high - low) + low

    def _affine(self, x: torch.Tensor, generator) -> torch.Tensor:
        cfg, b, dev = self.cfg, x.shape[0], x.device
        angle = torch.deg2rad(self._uniform(b, -cfg.rotation_deg, cfg.rotation_deg, generator, dev))
        shear = torch.deg2rad(self._uniform(b, -cfg.shear_deg, cfg.shear_deg, generator, dev))
        zoom = self._uniform(b, cfg.zoom[0], cfg.zoom[1], generator, dev)
        # Normalised coordinates span [-1, 1], so a shift of `shift` image widths is 2 * shift.
        tx = self._uniform(b, -cfg.shift, cfg.shift, generator, dev) * 2
        ty = self._uniform(b, -cfg.shift, cfg.shift, generator, dev) * 2
        fx = torch.where(torch.rand(b, generator=generator, device=dev) < cfg.hflip, -1.0, 1.0)
        fy = torch.where(torch.rand(b, generator=generator, device=dev) < cfg.vflip, -1.0, 1.0)

        cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
        # Forward map (input -> output coordinates): flip, shear, rotate, zoom, then shift.
        fwd = torch.zeros(b, 3, 3, device=dev)
        fwd[:, 0, 0] = zoom * (cos * fx)
        fwd[:, 0, 1] = zoom * (cos * tan - sin) * fy
        fwd[:, 1, 0] = zoom * (sin * fx)
        fwd[:, 1, 1] = zoom * (sin * tan + cos) * fy
        fwd[:, 0, 2], fwd[:, 1, 2], fwd[:, 2, 2] = tx, ty, 1.0
        # grid_sample wants, for every output pixel, where to read in the input: the inverse.
        theta = torch.linalg.inv(fwd)[:, :2, :]
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _blur(self, x: torch.Tensor, generator) -> torch.Tensor:
        cfg, b, dev = self.cfg, x.shape[0], x.device
        sigma = self._uniform(b, cfg.blur_sigma[0], cfg.blur_sigma[1], generator, dev)
        apply = torch.rand(b, generator=generator, device=dev) < cfg.blur_prob
        r = torch.arange(-self.kernel_half, self.kernel_half + 1, device=dev, dtype=torch.float32)
        kernel = torch.exp(-(r[None, :] ** 2) / (2 * sigma[:, None] ** 2))
        identity = (r == 0).float().expand(b, -1)
        kernel = torch.where(apply[:, None], kernel / kernel.sum(1, keepdim=True), identity)
        c = x.shape[1]
        k = kernel.repeat_interleave(c, 0)  # (b*c, K)
        flat = x.reshape(1, b * c, *x.shape[2:])
        pad = self.kernel_half
        flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
        flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), k[:, None, :, None], groups=b * c)
        return flat.reshape_as(x)


def train_preset(cfg: PreprocessConfig) -> TrainPreset:
    """The randomising preset for training batches."""
    return TrainPreset(cfg)


def eval_preset(cfg: PreprocessConfig) -> EvalPreset:
    """The deterministic preset for validation, evaluation and scoring."""
    return EvalPreset(cfg)
