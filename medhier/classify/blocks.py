"""torchvision's ResNet blocks with one module per call, for int8 quantization.

The export quantizer (:func:`medhier.infer.int8.quantize`) matches conv -> add -> relu patterns
per module, and torchvision's blocks call one ReLU module two or three times, which reads as one
pattern with several outputs ("Input partition has more than one output node").
:func:`medhier.classify.model.untie_shared_modules` swaps a model copy's blocks for these. Apart
from :mod:`medhier.classify.model`'s builders, the only module that imports torchvision, and
only when an int8 model is made.
"""

from __future__ import annotations

import torch
from torchvision.models.resnet import BasicBlock, Bottleneck

__all__ = ["BasicBlock", "Bottleneck", "OneCallBasicBlock", "OneCallBottleneck"]


class OneCallBasicBlock(BasicBlock):
    """torchvision's block, but with one ReLU module per use (``relu_a``, ``relu_b``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu_a(self.bn1(self.conv1(x)))
        return self.relu_b(self.bn2(self.conv2(out)) + identity)


class OneCallBottleneck(Bottleneck):
    """See :class:`OneCallBasicBlock` (``relu_a``, ``relu_b``, ``relu_c``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu_a(self.bn1(self.conv1(x)))
        out = self.relu_b(self.bn2(self.conv2(out)))
        return self.relu_c(self.bn3(self.conv3(out)) + identity)
