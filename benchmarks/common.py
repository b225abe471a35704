"""What the benchmark scripts share: the machine line of every table, and a random-weights checkpoint.

The development VM is not always the same CPU (it has been an Intel part with AMX and an AMD EPYC
without it), and bf16 inference speed differs by ~1.5x between the two: every table names the CPU.
"""

from __future__ import annotations

import os
import platform

import torch

from medhier.checkpoint import save_checkpoint
from medhier.config import load_config
from medhier.model import build_model
from medhier.taxonomy import Taxonomy


def cpu_model() -> str:
    """The CPU's model name and whether it has AMX (bf16 matrix units), from /proc/cpuinfo."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:  # not Linux: the platform's own name
        return name
    return f"{name} ({'AMX' if 'amx_bf16' in flags else 'no AMX'}{', avx512_bf16' if 'avx512_bf16' in flags else ''})"


def machine(gpu: bool = False) -> str:
    """``host | N cores | CPU model [| GPU name]``: the start of every table's header line."""
    line = f"{platform.node()} | {os.cpu_count()} cores | {cpu_model()}"
    if gpu and torch.cuda.is_available():
        line += f" | GPU {torch.cuda.get_device_name()}"
    return line


def make_checkpoint(workdir: str, arch: str, image_size: int) -> str:
    """A checkpoint of ``arch`` with random weights (seed 0) under ``workdir``, made once."""
    path = os.path.join(workdir, f"ckpt-{arch}-{image_size}")
    if not os.path.exists(os.path.join(path, "model.pt")):
        cfg = load_config(None, [f"model.arch={arch}", "model.pretrained=none", f"preprocess.image_size={image_size}", "dicom.windows.CT=bone"])
        tax = Taxonomy.from_config(cfg.taxonomy)
        torch.manual_seed(0)
        save_checkpoint(path, build_model(cfg.model, tax), cfg, tax, epoch=0)
    return path
