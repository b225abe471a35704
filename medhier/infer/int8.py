"""int8 inference on CPUs: post-training static quantization of a medhier model.

PyTorch 2 export quantization (torchao's ``X86InductorQuantizer``): the model is exported,
observers record the activation ranges of calibration images, and the converted graph is
compiled by inductor (:mod:`medhier.infer.compiled`, ahead of time, kept across runs) into int8
convolution and linear kernels (VNNI on AVX-512 CPUs, AMX where
present). On a CPU without bf16 matrix units this gives ResNet50 1.6-2x the images/s of compiled bf16
(benchmarks/RESULTS.md). It is a CPU path: GPUs score in bf16/fp16.

int8 changes the numbers a little, so :func:`agreement` compares the quantized model with the
fp32 one on held-out check images, and the scorer refuses to run below a set agreement.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from medhier.infer.compiled import CompiledModel, as_tuple


def _batches(images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Calibration images in batches of exactly ``batch_size``, the last one filled up by
    repeating images from the start (repeats leave the observed ranges unchanged)."""
    n = len(images)
    order = np.arange(-(-n // batch_size) * batch_size) % n
    return [images[order[i : i + batch_size]] for i in range(0, len(order), batch_size)]


def quantize(model: nn.Module, calibration: torch.Tensor, batch_size: int,
             prepare: Callable[[nn.Module], None] | None = None) -> CompiledModel:
    """int8 copy of ``model`` (left untouched), calibrated on ``calibration`` (N, C, S, S),
    preprocessed as for inference, for batches of ``batch_size``. The model returns a dataclass
    of tensors; the int8 copy returns the same dataclass. ``prepare``: the task's in-place
    rewrite of the copy into a form the quantizer matches (e.g. one module per call).

    The copy's ``compiled`` is the converted graph: quantize/dequantize steps around fp32
    operators, which computes what the int8 kernels compute, slowly. Compiling it
    (:func:`medhier.infer.compiled.build_package`) makes the int8 kernels."""
    if not len(calibration):
        raise ValueError("int8 quantization needs at least one calibration image")
    # torchao registers an enum with torch's pytree at import and torch logs a warning about it.
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:  # torchao loads only for int8 scoring (seconds), under the quieted logger
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    finally:
        pytree_log.setLevel(level)

    fp32 = copy.deepcopy(model).float().eval()
    if prepare is not None:
        prepare(fp32)
    batches = _batches(calibration.float(), batch_size)
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    with torch.no_grad():
        output_type = type(fp32(batches[0][:1]))  # the dataclass the int8 copy must return too
        exported = torch.export.export(as_tuple(fp32), (batches[0],)).module()
        prepared = prepare_pt2e(exported, quantizer)
        for batch in batches:
            prepared(batch)
        converted = convert_pt2e(prepared)
    return CompiledModel(converted, batch_size, output_type)


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
