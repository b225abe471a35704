"""The segmentation network: MONAI's 2-D ``UNet`` or ``SegResNet`` over the model's input
channels (:func:`medhier.plaque.seg_inputs.input_channels`), one output logit per plaque label
(:mod:`medhier.plaque.labels`: background first).

``seg.arch: unet`` — ``monai.networks.nets.UNet`` with ``seg.channels`` features per level
(each level halves the grid, strides 2), ``seg.res_units`` residual units per level, instance
norm and PReLU (MONAI's defaults). ``seg.arch: segresnet`` — ``monai.networks.nets.SegResNet``
with ``seg.channels[0]`` initial filters and as many levels as ``seg.channels`` has entries
(1, 2, 2, 4, 4 residual blocks down, 1 up). Either halves the grid ``len(seg.channels) - 1``
times, so ``seg.image_size`` is a multiple of 16.
"""

from __future__ import annotations

from monai.networks.nets import SegResNet, UNet
from torch import nn

from medhier.config import SegConfig
from medhier.plaque import labels as L
from medhier.plaque.seg_inputs import input_channels

__all__ = ["build_network"]


def build_network(cfg: SegConfig) -> nn.Module:
    """The untrained network for ``cfg``: float (B, C, S, S) -> logits (B, labels, S, S)."""
    levels = len(cfg.channels)
    if cfg.arch == "unet":
        return UNet(spatial_dims=2, in_channels=input_channels(cfg), out_channels=len(L.NAMES), channels=tuple(cfg.channels),
                    strides=(2,) * (levels - 1), num_res_units=cfg.res_units, dropout=cfg.dropout)
    return SegResNet(spatial_dims=2, in_channels=input_channels(cfg), out_channels=len(L.NAMES), init_filters=cfg.channels[0],
                     blocks_down=(1, 2, 2, 4, 4)[:levels], blocks_up=(1,) * (levels - 1), dropout_prob=cfg.dropout or None)
