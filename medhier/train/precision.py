"""Which floating-point precision a model runs in, on which device (training and inference)."""

from __future__ import annotations

import torch

__all__ = ["autocast_dtype", "precision_name"]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a ``precision`` setting (auto/bf16/fp16/fp32) on ``device``;
    None means fp32 (no autocast)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16 if device.type == "cuda" else torch.bfloat16  # no fp16 autocast on CPU
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # CPU: bf16 pays off only with native bf16 matrix units (AMX / AVX512-BF16)
    return torch.bfloat16 if _cpu_has_bf16() else None


def precision_name(precision: str, device: torch.device) -> str:
    """What a ``precision`` setting runs as on ``device``: int8, bf16, fp16 or fp32."""
    if precision == "int8":
        return precision
    dtype = autocast_dtype(precision, device)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags
