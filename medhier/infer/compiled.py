"""Compiled models kept across runs, per model id and machine type: the nightly job's warm start.

    model ──torch.export (int8: calibrated and converted first)──▶ program ──AOTInductor──▶ model.pt2
    CACHE/<model_id>/<variant>/<machine>/model.pt2    the compiled package (kernels and weights)
                                        /meta.json    what it was built from and for; written last

A scoring run whose model, variant and machine are in the cache loads the package (about a
second) instead of calibrating int8 (ResNet50 on 2 cores: ~20 s) and compiling (~20 s); a run
that does not find it builds and stores it for the next one. The variant is what the package
computes: precision, batch size (packages run one batch shape; callers pad), the input shape
after preprocessing, memory format, and for int8 the number of calibration images.

What a package depends on besides the weights is its **fingerprint** (:func:`fingerprint`):
torch, torchao and Python versions; the CPU model and the instruction sets inductor generates
code for (AVX-512, VNNI, AMX...), or the GPU's name, compute capability and CUDA version; and a
hash of the code that defines the model and the compilation. The machine folder is a hash of it,
and ``meta.json`` keeps it whole: an entry whose fingerprint is not this machine's, whose package
does not hash to the recorded sha256, or that fails to load is ignored (logged) and rebuilt,
never run. The package holds native code, so the cache must be as trusted as the checkpoint
folder: by default it lives under the scoring output (``score.model_cache``).

AOTInductor (``torch._inductor.aoti_compile_and_package`` / ``aoti_load_package``, PyTorch's
documented ahead-of-time path) rather than ``torch.compile`` with inductor's caches: a warm
``torch.compile`` still traces the model with Dynamo in every process (seconds to tens of
seconds on 2 cores), where a package loads without tracing anything.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from medhier.config import StorageConfig
from medhier.io import storage

__all__ = ["PACKAGE_FILE", "CompiledModel", "ModelCache", "Variant", "as_tuple", "build_package", "code_hash", "cpu_info", "fingerprint", "load_package"]

log = logging.getLogger(__name__)

PACKAGE_FILE = "model.pt2"
META_FILE = "meta.json"
# Instruction sets that change the kernels inductor writes for a CPU (cpu_vec_isa, mkldnn, AMX).
_ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class Variant:
    """What a compiled package computes, besides the model's weights."""

    precision: str  # int8, bf16, fp16 or fp32
    batch_size: int  # the one batch shape the package runs
    input_shape: tuple[int, ...]  # one preprocessed sample, e.g. (3, 224, 224)
    channels_last: bool
    calibration_images: int = 0  # int8: how many images set the activation ranges

    @property
    def name(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        cal = f"-cal{self.calibration_images}" if self.precision == "int8" else ""
        return f"{self.precision}-b{self.batch_size}-{shape}{'-cl' if self.channels_last else ''}{cal}"


def cpu_info() -> tuple[str, frozenset[str]]:
    """The CPU's model name and its feature flags, from /proc/cpuinfo; off Linux, the platform's
    name and no flags (a narrower cache key, still not shared across CPU types)."""
    name, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = frozenset(value.split())
                    break
    except OSError:
        pass
    return name, flags


def _cpu() -> dict[str, str]:
    name, flags = cpu_info()
    return {"cpu": name, "isa": ",".join(f for f in _ISA_FLAGS if f in flags)}


def code_hash(*objects: Any) -> str:
    """Hash (16 hex digits) of the source of the modules defining ``objects`` (classes,
    functions or modules): a compiled package is stale when the code it was traced from changes."""
    h = hashlib.sha256()
    for name in sorted({o.__name__ if inspect.ismodule(o) else o.__module__ for o in objects}):
        h.update(name.encode())
        h.update(inspect.getsource(sys.modules[name]).encode())
    return h.hexdigest()[:16]


def fingerprint(device: torch.device, code: str) -> dict[str, str]:
    """What a package built on this machine depends on (module docstring): versions, device, code."""
    try:  # int8 packages hold torchao's quantized operators; its version without importing it (~2 s: torch._dynamo)
        torchao_version = importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        torchao_version = ""
    out = {"torch": torch.__version__, "torchao": torchao_version, "python": platform.python_version(), "code": code,
           "device": device.type}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        out.update(gpu=torch.cuda.get_device_name(device), capability=f"{major}.{minor}", cuda=str(torch.version.cuda))
    else:
        out.update(_cpu())
    return out


class _AsTuple(nn.Module):
    """A model whose output is a dataclass of tensors, returning them as a tuple (what export traces)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(x)
        return tuple(getattr(out, f.name) for f in fields(out))


class _Autocast(nn.Module):
    """The model under autocast, inside its forward so that export records the casts."""

    def __init__(self, model: nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.model, self.device_type, self.dtype = model, device_type, dtype

    def forward(self, x: torch.Tensor):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(x)


def as_tuple(model: nn.Module, amp_dtype: torch.dtype | None = None, device_type: str = "cpu") -> nn.Module:
    """``model`` (dataclass outputs) as a module returning a tuple of tensors, under autocast
    to ``amp_dtype`` when given: what :func:`build_package` and int8 export trace."""
    return _AsTuple(_Autocast(model, device_type, amp_dtype) if amp_dtype is not None else model)


class CompiledModel(nn.Module):
    """A compiled package with the eager model's interface (its outputs dataclass,
    ``output_type``), for batches of exactly ``batch_size`` inputs (callers pad)."""

    def __init__(self, compiled: Callable, batch_size: int, output_type: type):
        super().__init__()
        self.compiled = compiled
        self.batch_size = batch_size
        self.output_type = output_type

    def forward(self, x: torch.Tensor):
        if x.shape[0] != self.batch_size:
            raise ValueError(f"compiled model: batches of exactly {self.batch_size} inputs, got {x.shape[0]}")
        return self.output_type(*self.compiled(x))


class _Package:
    """A loaded AOTInductor package called as torch's ``aoti_load_package`` result is: the
    inputs flattened by the package's call spec, the outputs unflattened by it."""

    def __init__(self, loader: Any):
        self.loader = loader
        self.out_spec = pytree.treespec_loads(loader.get_call_spec()[1])

    def __call__(self, *args: torch.Tensor):
        flat = [x for x in pytree.tree_flatten((args, {}))[0] if isinstance(x, torch.Tensor)]
        return pytree.tree_unflatten(self.loader.boxed_run(flat), self.out_spec)


def load_package(path: str, device_index: int = -1) -> Callable:
    """The package file ``path`` loaded to run. Through torch's C++ package loader when this
    torch has it: ``torch._inductor.aoti_load_package`` is the same loader, but importing
    inductor (and torch._dynamo with it) costs a fresh model actor ~1.5 s here, and a nightly
    run's start-up waits for that actor. Other torch versions: inductor's own function."""
    loader = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
    if loader is None:
        from torch._inductor import aoti_load_package  # this torch has no C++ loader in torch._C: inductor's own

        return aoti_load_package(path, device_index=device_index)
    return _Package(loader(path, "model", False, 1, device_index))


def build_package(module: nn.Module, example: torch.Tensor, path: str) -> str:
    """Export ``module`` (tuple outputs) at ``example``'s shape and compile it ahead of time into
    the package file ``path`` (AOTInductor, weights frozen into the kernels) -> ``path``."""
    from torch._inductor import aoti_compile_and_package  # inductor loads only when a package is built (seconds)

    # inductor's int8 lowering copies a tensor with torch.tensor() and warns about it, once per conv
    warnings.filterwarnings("ignore", message="To copy construct from a tensor", module=r"torch\._inductor\.mkldnn_lowerings")
    with torch.no_grad():
        program = torch.export.export(module, (example,))
        return aoti_compile_and_package(program, package_path=path, inductor_configs={"freezing": True})


def _plain(variant: Variant) -> dict[str, Any]:
    """The variant as meta.json holds it (JSON types: the shape as a list)."""
    return json.loads(json.dumps(asdict(variant)))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ModelCache:
    """The compiled packages under ``root`` (a folder or s3:// URI) for one machine's
    ``fingerprint`` (:func:`fingerprint`)."""

    def __init__(self, root: str, storage_cfg: StorageConfig | None, fingerprint: dict[str, str]):
        self.root = storage.normalize(root)
        self.storage = storage_cfg
        self.fingerprint = dict(fingerprint)
        self.machine = _sha256(json.dumps(self.fingerprint, sort_keys=True).encode())[:16]

    def folder(self, model_id: str, variant: Variant) -> str:
        return storage.join(self.root, model_id, variant.name, self.machine)

    def meta(self, model_id: str, variant: Variant) -> dict[str, Any] | None:
        """The entry's meta.json when it exists and was built for this machine's fingerprint and
        this variant; None (and a log line saying why) otherwise."""
        uri = storage.join(self.folder(model_id, variant), META_FILE)
        try:
            meta = json.loads(storage.read_bytes(uri, self.storage))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning("compiled model cache: %s is unreadable (%s); ignored", uri, exc)
            return None
        if meta.get("fingerprint") != self.fingerprint or meta.get("variant") != _plain(variant) or meta.get("model_id") != model_id:
            theirs = meta.get("fingerprint") or {}
            differ = sorted(k for k in set(theirs) | set(self.fingerprint) if theirs.get(k) != self.fingerprint.get(k))
            log.warning("compiled model cache: %s was built for another machine, code or variant (%s differ); ignored", uri,
                        ", ".join(differ) or "variant")
            return None
        return meta

    def fingerprints(self, model_id: str, variant: Variant) -> list[dict[str, str]]:
        """The fingerprints of every machine the cache holds ``variant`` of ``model_id`` for."""
        folder = storage.join(self.root, model_id, variant.name)
        if not storage.exists(folder, self.storage):
            return []
        out = []
        for page in storage.list_objects(folder, self.storage):
            for obj in page:
                if obj.path.endswith("/" + META_FILE):
                    try:
                        out.append(json.loads(storage.read_bytes(storage.join(folder, obj.path), self.storage)).get("fingerprint", {}))
                    except (FileNotFoundError, ValueError, UnicodeDecodeError):  # being replaced, or unreadable: not an entry
                        continue
        return out

    def load(self, model_id: str, variant: Variant, device: torch.device) -> tuple[Callable, dict[str, Any]] | None:
        """(the loaded package, its meta.json) from the cache, or None when there is no usable
        entry: missing, built elsewhere (:meth:`meta`), corrupted or failing to load."""
        meta = self.meta(model_id, variant)
        if meta is None:
            return None
        uri = storage.join(self.folder(model_id, variant), PACKAGE_FILE)
        try:
            data = storage.read_bytes(uri, self.storage)
        except FileNotFoundError:
            log.warning("compiled model cache: %s is missing beside its meta.json; ignored", uri)
            return None
        if _sha256(data) != meta.get("sha256"):
            log.warning("compiled model cache: %s does not hash to its recorded sha256 (corrupted?); ignored", uri)
            return None
        with tempfile.TemporaryDirectory() as tmp:  # the loader reads a local file, then holds what it needs in memory
            local = os.path.join(tmp, PACKAGE_FILE)
            with open(local, "wb") as f:
                f.write(data)
            try:
                runner = load_package(local, device.index if device.index is not None else -1)
            except Exception as exc:  # a package that does not load is rebuilt, whatever the reason
                log.warning("compiled model cache: %s failed to load (%s: %s); ignored", uri, type(exc).__name__, exc)
                return None
        return runner, meta

    def store(self, model_id: str, variant: Variant, package: str, info: dict[str, Any] | None = None) -> dict[str, Any]:
        """Put the package file ``package`` into the cache with its meta.json (written last: an
        entry without it is not an entry) -> the meta.json written. ``info``: what else to keep
        (the int8 comparison with fp32, the seconds it took to build)."""
        with open(package, "rb") as f:
            data = f.read()
        folder = self.folder(model_id, variant)
        storage.write_bytes(storage.join(folder, PACKAGE_FILE), data, self.storage)
        meta = {"model_id": model_id, "variant": _plain(variant), "fingerprint": self.fingerprint, "sha256": _sha256(data),
                "bytes": len(data), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(info or {})}
        storage.write_text(storage.join(folder, META_FILE), json.dumps(meta, indent=2), self.storage)
        return meta
