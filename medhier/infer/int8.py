"""int8 inference on CPUs: post-training static quantization of a medhier model.

PyTorch 2 export quantization (torchao's ``X86InductorQuantizer``): the model is exported,
observers record the activation ranges of calibration images, and the converted graph is
compiled by inductor into int8 convolution and linear kernels (VNNI on AVX-512 CPUs, AMX where
present). On a CPU without bf16 matrix units this gives ResNet50 1.6-2x the images/s of compiled bf16
(benchmarks/RESULTS.md). It is a CPU path: GPUs score in bf16/fp16.

int8 changes the numbers a little, so :func:`agreement` compares the quantized model with the
fp32 one on held-out check images, and the scorer refuses to run below a set agreement.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from medhier.classify.model import CBAM


class _BasicBlock(BasicBlock):
    """torchvision's block, but with one ReLU module per use: the quantizer matches conv → add →
    relu patterns per module, and one ReLU module called twice reads as one pattern with two
    outputs ("Input partition has more than one output node")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu_a(self.bn1(self.conv1(x)))
        return self.relu_b(self.bn2(self.conv2(out)) + identity)


class _Bottleneck(Bottleneck):
    """See :class:`_BasicBlock`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu_a(self.bn1(self.conv1(x)))
        out = self.relu_b(self.bn2(self.conv2(out)))
        return self.relu_c(self.bn3(self.conv3(out)) + identity)


class _CBAM(CBAM):
    """medhier's CBAM with its shared MLP run once on both poolings (concatenated along the
    batch), for the same reason as :class:`_BasicBlock`: the same function, one call. Only in the
    int8 copy: training keeps the two calls, so that its runs stay bit-for-bit as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg, peak = self.mlp(torch.cat([x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)])).chunk(2)
        x = x * torch.sigmoid(avg + peak)
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


def _untie_shared_modules(model: nn.Module) -> None:
    """Give every module call its own module (in place; :func:`quantize` works on a copy)."""
    for module in model.modules():
        if type(module) is CBAM:
            module.__class__ = _CBAM
        elif type(module) is BasicBlock:
            module.__class__ = _BasicBlock
            module.relu_a, module.relu_b = nn.ReLU(), nn.ReLU()
        elif type(module) is Bottleneck:
            module.__class__ = _Bottleneck
            module.relu_a, module.relu_b, module.relu_c = nn.ReLU(), nn.ReLU(), nn.ReLU()


class _AsTuple(nn.Module):
    """The model with its :class:`~medhier.model.Outputs` as a tuple (what export traces)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(x)
        return out.main_logits, out.log_p_main, out.log_p_sub, out.log_p_leaf


class Int8Model(nn.Module):
    """A quantized, compiled model with the fp32 model's interface (``Outputs``), for batches of
    exactly ``batch_size`` images (the graph is exported for one shape; callers pad)."""

    def __init__(self, compiled: nn.Module, batch_size: int):
        super().__init__()
        self.compiled = compiled
        self.batch_size = batch_size

    def forward(self, x: torch.Tensor):
        from medhier.classify.model import Outputs

        if x.shape[0] != self.batch_size:
            raise ValueError(f"int8 model: batches of exactly {self.batch_size} images, got {x.shape[0]}")
        return Outputs(*self.compiled(x))


def _batches(images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Calibration images in batches of exactly ``batch_size``, the last one filled up by
    repeating images from the start (repeats leave the observed ranges unchanged)."""
    n = len(images)
    order = np.arange(-(-n // batch_size) * batch_size) % n
    return [images[order[i : i + batch_size]] for i in range(0, len(order), batch_size)]


def quantize(model: nn.Module, calibration: torch.Tensor, batch_size: int, compile: bool = True) -> Int8Model:
    """int8 copy of ``model`` (left untouched), calibrated on ``calibration`` (N, 3, S, S),
    preprocessed as for inference, and compiled with inductor for batches of ``batch_size``.
    ``compile=False`` keeps the converted graph as it is: quantize/dequantize steps around fp32
    operators, which computes what the int8 kernels compute, slowly (for tests)."""
    if not len(calibration):
        raise ValueError("int8 quantization needs at least one calibration image")
    # torchao registers an enum with torch's pytree at import and torch logs a warning about it.
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        import torch._inductor.config as inductor_config
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    finally:
        pytree_log.setLevel(level)

    fp32 = copy.deepcopy(model).float().eval()
    _untie_shared_modules(fp32)
    batches = _batches(calibration.float(), batch_size)
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    with torch.no_grad():
        exported = torch.export.export(_AsTuple(fp32), (batches[0],)).module()
        prepared = prepare_pt2e(exported, quantizer)
        for batch in batches:
            prepared(batch)
        converted = convert_pt2e(prepared)
    inductor_config.freezing = True  # fold the int8 weights and their scales into the kernels
    # inductor's int8 lowering copies a tensor with torch.tensor() and warns about it, once per conv
    warnings.filterwarnings("ignore", message="To copy construct from a tensor", module=r"torch\._inductor\.mkldnn_lowerings")
    return Int8Model(torch.compile(converted) if compile else converted, batch_size)


@dataclass
class Agreement:
    """How the int8 model's predictions compare with the fp32 model's on the same images."""

    images: int  # 0: not checked, and the figures below are None
    leaf_agreement: float | None  # share of images with the same predicted leaf
    main_agreement: float | None
    max_abs_diff: float | None  # largest |P_int8(leaf) - P_fp32(leaf)| over images and leaves
    mean_abs_diff: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def agreement(fp32: dict[str, np.ndarray], int8: dict[str, np.ndarray]) -> Agreement:
    """Compare two prediction dicts (``p_leaf``, ``pred_main``, ``pred_leaf``, as
    ``Scorer.predict_images`` returns) on the same images."""
    n = len(fp32["pred_leaf"])
    if not n:
        return Agreement(0, None, None, None, None)
    diff = np.abs(fp32["p_leaf"].astype(np.float64) - int8["p_leaf"].astype(np.float64))
    return Agreement(
        images=n,
        leaf_agreement=float(np.mean(fp32["pred_leaf"] == int8["pred_leaf"])),
        main_agreement=float(np.mean(fp32["pred_main"] == int8["pred_main"])),
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
    )


def check_agreement(result: Agreement, min_agreement: float) -> None:
    """Raise when the int8 model's predicted leaf differs from fp32's too often."""
    if result.images and result.leaf_agreement < min_agreement:
        raise Int8AgreementError(
            f"int8 model: its predicted leaf matches the fp32 model's on {result.leaf_agreement:.1%} of "
            f"{result.images} check images, below score.int8_min_agreement={min_agreement:g} (largest probability "
            f"difference {result.max_abs_diff:.3f}); score with score.precision=bf16 or fp32, or lower the threshold"
        )


class Int8AgreementError(RuntimeError):
    """The quantized model disagrees with the fp32 one more than allowed."""
