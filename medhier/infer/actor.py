"""The model actor: one model per Ray actor, loaded (and compiled, or quantized) once.

A callable class for ``map_batches``: image rows in, the same rows out without their image and
with the task's prediction arrays (and ``scored_ms``: when the model scored the row's batch).
Rows without an image (error rows) pass through with the task's empty predictions. Archive
scoring, evaluation after training and the online endpoint all run their models through it.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import numpy as np
import ray
import torch
from ray.data import ActorPoolStrategy

from medhier import columns as C
from medhier.config import Config, StorageConfig
from medhier.infer import compiled as compiled_module
from medhier.infer import int8 as int8_module
from medhier.infer.compiled import PACKAGE_FILE, CompiledModel, ModelCache, Variant, as_tuple, build_package, code_hash, fingerprint, load_package
from medhier.infer.int8 import Agreement, agreement, check_agreement, quantize
from medhier.io import storage
from medhier.runtime import cpu_threads, execute_pipeline
from medhier.train.checkpoint import Loaded, ModelTask, built, load_checkpoint
from medhier.train.precision import autocast_dtype, precision_name

__all__ = ["SCORED_MS", "ActorReport", "ActorSettings", "InferTask", "Int8Settings", "ModelActor", "Predictor", "actor_resources",
           "compiled_variant", "model_cache", "predict_dataset"]

log = logging.getLogger(__name__)

SCORED_MS = "scored_ms"  # (N,) int64: when the model scored the row's batch, ms since the epoch (UTC)


class Predictor(Protocol):
    """A task's view of its model's outputs, for one checkpoint's config."""

    preset: torch.nn.Module  # uint8 (B, S, S) -> the model's input

    def outputs(self, out: Any, n: int) -> dict[str, np.ndarray]:
        """The model's outputs for a batch -> prediction arrays of its first ``n`` rows."""

    def empty(self, n: int) -> dict[str, np.ndarray]:
        """The same arrays for ``n`` rows without an image (NaN probabilities, -1 classes)."""


class InferTask(ModelTask, Protocol):
    """A task whose models run through :class:`ModelActor`."""

    def predictor(self, loaded: Loaded) -> Predictor:
        """The predictor for a checkpoint: its config and what it fitted after training
        (``Loaded.task_meta``, e.g. the classifier's temperatures)."""

    # The module that defines the task's network: its source is part of a compiled model's cache
    # key (medhier.infer.compiled.code_hash), without building the network.
    model_module: str

    def prepare_int8(self, model: torch.nn.Module) -> None:
        """Rewrite a copy of the model, in place, into a form int8 quantization matches."""


@dataclass(frozen=True)
class ActorSettings:
    """How the actor runs its model."""

    precision: str = "auto"  # auto, bf16, fp16, fp32 or int8 (CPU)
    channels_last: bool = True
    threads: int = 0  # torch intra-op threads on CPUs; 0 = torch's default
    compile: bool = False  # compiled ahead of time (AOTInductor) at the one batch shape; int8 always is
    batch_size: int = 32  # images per forward pass
    # Compiled models kept across runs (medhier/infer/compiled.py): a folder or s3:// URI; "" =
    # compiled for this actor only.
    model_cache: str = ""
    # A folder (URI) where each compiled actor writes how it got its model, as JSON (ActorReport);
    # "" = nowhere.
    report: str = ""


@dataclass(frozen=True)
class Int8Settings:
    """int8 scoring: the calibration and check images, and the agreement it must reach.

    ``images``: a .npz URI with "calibration" and "check", (N, S, S) uint8 as decode tasks make
    them; "" when the run expects the quantized model in the model cache, in which case an actor
    that does not find it there calls ``sample`` for the same arrays."""

    images: str
    min_agreement: float  # below this share of equal predicted classes on the check images, refuse
    calibration_images: int  # how many the run asked for: part of the compiled model's cache key
    sample: Callable[[], dict[str, np.ndarray]] | None = None


@dataclass
class ActorReport:
    """How a compiled actor got its model: written as JSON to ``ActorSettings.report``."""

    variant: str  # Variant.name
    cache: str  # "hit": loaded from the model cache; "built": compiled now and kept there; "not kept": no cache
    folder: str  # the cache entry ("" when not kept)
    built_at: str  # when the entry was built (hits)
    build_seconds: float = 0.0  # calibrating (int8), compiling and checking, when built now
    int8: dict[str, Any] = field(default_factory=dict)  # int8's comparison with fp32, made when the model was built
    seconds: float = 0.0  # the actor's whole start-up: checkpoint, model, cache or build
    ready_at: float = 0.0  # when its model was ready (Unix seconds)


def model_cache(root: str, storage_cfg: StorageConfig | None, device: torch.device, task: InferTask) -> ModelCache:
    """The compiled models under ``root`` that this machine (``device``'s) can run for ``task``'s
    model code: the fingerprint hashes the task's model module and the compilation code."""
    return ModelCache(root, storage_cfg, fingerprint(device, code_hash(importlib.import_module(task.model_module), compiled_module, int8_module)))


def compiled_variant(preset: torch.nn.Module, image_size: int, settings: ActorSettings, device: torch.device,
                     calibration_images: int = 0) -> Variant:
    """The compiled model an actor with ``settings`` runs on ``device`` (its model cache key);
    ``calibration_images``: what int8 asks for."""
    with torch.inference_mode():
        shape = tuple(preset.to(device)(torch.zeros((1, image_size, image_size), dtype=torch.uint8, device=device)).shape[1:])
    precision = precision_name(settings.precision, device)
    return Variant(precision, settings.batch_size, shape, settings.channels_last, calibration_images if precision == "int8" else 0)


Annotator = Callable[["ModelActor", dict[str, np.ndarray], np.ndarray, np.ndarray, dict[str, np.ndarray]], dict[str, np.ndarray]]
"""Per-batch work beside the predictions that needs the model (the classifier's Grad-CAM):
``(actor, batch, ok mask, images (K, S, S) of the ok rows, predictions) -> extra columns``."""


class ModelActor:
    """See the module docstring. ``task``: the checkpoint's task (it rebuilds the model and reads
    its outputs); ``annotator``: optional per-batch extra columns (:data:`Annotator`)."""

    def __init__(self, task: InferTask, checkpoint: str, storage_cfg: StorageConfig, settings: ActorSettings,
                 int8: Int8Settings | None = None, annotator: Annotator | None = None):
        started = time.perf_counter()
        if settings.threads:
            torch.set_num_threads(cpu_threads(settings.threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.storage = storage_cfg
        loaded = load_checkpoint(checkpoint, task, storage_cfg, build=False)  # built when needed: see eager
        self.task, self.loaded, self.model_id = task, loaded, loaded.model_id
        self.predictor = task.predictor(loaded)
        self.image_size = loaded.cfg.preprocess.image_size
        self.memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        self._eager: torch.nn.Module | None = None
        self.preset = self.predictor.preset.to(self.device)
        self.amp_dtype = None if settings.precision == "int8" else autocast_dtype(settings.precision, self.device)
        self.batch_size = settings.batch_size
        self.compiled = settings.compile or settings.precision == "int8"
        self.annotator = annotator
        self.report: ActorReport | None = None
        if not self.compiled:
            self.model = self.eager
        else:
            cache = model_cache(settings.model_cache, storage_cfg, self.device, task) if settings.model_cache else None
            variant = compiled_variant(self.preset, self.image_size, settings, self.device, int8.calibration_images if int8 else 0)
            self.report = self._int8(task, int8, cache, variant) if variant.precision == "int8" else self._compile(cache, variant)
            self.report.seconds = round(time.perf_counter() - started, 1)
            self.report.ready_at = int(time.time() * 1000) / 1000  # ms, down: never after its first batch's stamp
            if settings.report:
                where = f"{socket.gethostname()}-{os.getpid()}"
                storage.write_text(storage.join(settings.report, f"{where}.json"), json.dumps(asdict(self.report)), storage_cfg)
            log.info("compiled model: %s", asdict(self.report))
            if self.report.int8:
                check_agreement(Agreement(**{f.name: self.report.int8[f.name] for f in fields(Agreement)}), int8.min_agreement)

    @property
    def eager(self) -> torch.nn.Module:
        """The checkpoint's eager model on this actor's device, built on first use. Uncompiled
        scoring, compiling, the int8 check and Grad-CAM need it; an actor that runs a compiled
        model from the cache never builds it (nor imports what defines it: seconds of start-up)."""
        if self._eager is None:
            self._eager = built(self.loaded, self.task).to(self.device, memory_format=self.memory_format).eval()
        return self._eager

    def _output_type(self, meta: dict[str, Any], example: torch.Tensor) -> type:
        """The dataclass the eager model returns (a compiled one returns its fields as a tuple):
        the one a cache entry's meta.json names, else found by running the eager model once."""
        module, _, name = str(meta.get("output_type", "")).partition(":")
        if module and name:
            try:
                found = getattr(importlib.import_module(module), name)
                if isinstance(found, type):
                    return found
            except (ImportError, AttributeError):  # renamed since the entry was built: ask the model
                pass
        with torch.inference_mode():
            return type(self.eager(example[:1]))

    def _example(self) -> torch.Tensor:
        """A preprocessed batch of ``batch_size`` blank images: the shape packages are built for."""
        with torch.inference_mode():
            x = self.preset(torch.zeros((self.batch_size, self.image_size, self.image_size), dtype=torch.uint8, device=self.device))
        return x.clone().contiguous(memory_format=self.memory_format)

    def _packaged(self, cache: ModelCache | None, variant: Variant, module: Callable[[], torch.nn.Module],
                  info: Callable[[CompiledModel], dict[str, Any]] | None = None) -> tuple[CompiledModel, ActorReport]:
        """The compiled model of ``variant``: from the cache when it holds one for this machine,
        else built from ``module()`` (tuple outputs), checked by ``info`` (which may raise: then
        nothing is kept) and stored -> (the model, how it was had)."""
        example = self._example()
        if cache is not None:
            hit = cache.load(self.model_id, variant, self.device)
            if hit is not None:
                runner, meta = hit
                return CompiledModel(runner, self.batch_size, self._output_type(meta, example)), ActorReport(
                    variant.name, "hit", cache.folder(self.model_id, variant), meta["built_at"], int8=meta.get("int8", {}))
        output_type = self._output_type({}, example)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            path = build_package(module(), example, os.path.join(tmp, PACKAGE_FILE))
            model = CompiledModel(load_package(path), self.batch_size, output_type)
            extra = info(model) if info is not None else {}
            built_s = round(time.perf_counter() - started, 1)
            where = ""
            if cache is not None:
                cache.store(self.model_id, variant, path, {"build_seconds": built_s, "output_type": f"{output_type.__module__}:{output_type.__qualname__}",
                                                           **extra})
                where = cache.folder(self.model_id, variant)
        return model, ActorReport(variant.name, "built" if cache is not None else "not kept", where, "", built_s, extra.get("int8", {}))

    def _compile(self, cache: ModelCache | None, variant: Variant) -> ActorReport:
        """Replace the model by its compiled version (bf16/fp16 autocast inside the package)."""
        self.model, report = self._packaged(cache, variant, lambda: as_tuple(self.eager, self.amp_dtype, self.device.type))
        return report

    def _int8(self, task: InferTask, int8: Int8Settings | None, cache: ModelCache | None, variant: Variant) -> ActorReport:
        """Replace the model by its int8 version (medhier/infer/int8.py): from the cache, or
        calibrated on the calibration images and compared with the fp32 model on the check
        images (the comparison is kept with the compiled model). The caller refuses agreement
        below ``min_agreement``."""
        if self.device.type != "cpu":
            raise ValueError("score.precision=int8 is a CPU path; this actor runs on a GPU: use bf16 or fp16 there")
        if int8 is None:
            raise ValueError("score.precision=int8 needs calibration images: none were given")
        state: dict[str, Any] = {}

        def quantized() -> torch.nn.Module:
            if int8.images:
                with np.load(io.BytesIO(storage.read_bytes(int8.images, self.storage))) as images:
                    state["calibration"], state["check"] = images["calibration"], images["check"]
            elif int8.sample is not None:  # the run expected this model in the cache; this machine has none there
                sampled = int8.sample()
                state["calibration"], state["check"] = sampled["calibration"], sampled["check"]
            else:
                raise ValueError("score.precision=int8: no calibration images and no compiled int8 model in the cache")
            if not len(state["calibration"]):
                raise ValueError(f"score.precision=int8: {int8.images or 'the sample'} holds no calibration image")
            state["started"] = time.perf_counter()
            with torch.inference_mode():
                x = self.preset(torch.from_numpy(state["calibration"]).to(self.device))
            return quantize(self.eager, x.contiguous(memory_format=self.memory_format), self.batch_size, prepare=task.prepare_int8).compiled

        def compare(model: CompiledModel) -> dict[str, Any]:
            self.model = model
            check = state["check"]
            fp32, scored = [], []
            for start in range(0, len(check), self.batch_size):
                part = check[start : start + self.batch_size]
                scored.append(self.predict_images(part))
                fp32.append(self.predict_images(part, eager=True))
            join = lambda parts: {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}  # noqa: E731
            result = agreement(join(fp32), join(scored)) if fp32 else agreement({"pred_leaf": np.zeros(0)}, {})
            summary = {"calibration_images": len(state["calibration"]), **result.to_dict(),
                       "seconds": round(time.perf_counter() - state["started"], 1)}
            check_agreement(result, int8.min_agreement)  # a model that disagrees is not kept
            return {"int8": summary}

        self.model, report = self._packaged(cache, variant, quantized, compare)
        return report

    @torch.inference_mode()
    def predict_images(self, images: np.ndarray, eager: bool = False) -> dict[str, np.ndarray]:
        """(N, S, S) uint8 -> the task's prediction arrays. ``eager``: with the uncompiled model
        (fp32 for int8 scoring), as a reference."""
        n = len(images)
        if self.compiled and not eager and n < self.batch_size:  # one shape, one compiled graph
            images = np.concatenate([images, np.zeros((self.batch_size - n, *images.shape[1:]), np.uint8)])
        if not images.flags.writeable:  # a view of Arrow's buffer; torch wants memory it may own
            images = images.copy()
        x = torch.from_numpy(images).to(self.device, non_blocking=True)
        x = self.preset(x).contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = (self.eager if eager else self.model)(x)
        return self.predictor.outputs(out, n)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        blobs = batch[C.IMAGE]
        n = len(blobs)
        ok = np.array([len(b) > 0 for b in blobs], dtype=bool)
        result = {**self.predictor.empty(n), SCORED_MS: np.full(n, -1, np.int64)}
        images = None
        if ok.any():
            images = np.frombuffer(b"".join(blobs[ok]), dtype=np.uint8).reshape(-1, self.image_size, self.image_size)
            for start in range(0, len(images), self.batch_size):
                part = self.predict_images(images[start : start + self.batch_size])
                rows = np.flatnonzero(ok)[start : start + self.batch_size]
                for key, values in part.items():
                    result[key][rows] = values
                result[SCORED_MS][rows] = int(time.time() * 1000)
        result[SCORED_MS][result[SCORED_MS] < 0] = int(time.time() * 1000)  # error rows: when their batch passed
        out = {k: v for k, v in batch.items() if k != C.IMAGE}
        out.update(result)
        if self.annotator is not None and images is not None:
            out.update(self.annotator(self, batch, ok, images, result))
        return out


def actor_resources(use_gpu: str = "auto") -> tuple[int, float]:
    """(GPUs, CPUs) for one model actor: a GPU when asked for or when the cluster has one;
    otherwise the CPUs of the largest node less one, and no more than the CPUs free now less
    one. An actor holding every CPU of its node leaves none there for the decode tasks that
    feed it: if the other nodes go (preempted, scaled down), the pipeline would wait forever for
    a CPU. CPUs another job holds (a Serve replica, a training run) are not free either: sized
    without them, the actor took the last CPU the decode tasks needed and the job hung."""
    if use_gpu == "true" or (use_gpu == "auto" and ray.cluster_resources().get("GPU", 0) >= 1):
        return 1, 1.0
    total = int(ray.cluster_resources().get("CPU", 1))
    free = int(ray.available_resources().get("CPU", total))
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
    return 0, float(max(1, min(int(largest) - 1, total - 1, free - 1)))


def predict_dataset(ds, task: InferTask, checkpoint: str, cfg: Config, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Score a (small) dataset of image rows with one actor and gather the results on the
    driver -> the task's prediction arrays and the dataset's other columns ({} for no rows).
    For evaluation sets; archive scoring streams instead of gathering."""
    gpus, cpus = actor_resources(cfg.score.use_gpu)
    settings = ActorSettings(threads=0 if gpus else int(cpus), batch_size=batch_size)

    def run() -> list[dict[str, np.ndarray]]:
        scored = ds.map_batches(ModelActor, fn_constructor_kwargs={"task": task, "checkpoint": checkpoint, "storage_cfg": cfg.storage,
                                                                   "settings": settings},
                                batch_size=batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=1),
                                num_gpus=gpus, num_cpus=cpus)
        return list(scored.iter_batches(batch_size=None, batch_format="numpy"))

    batches = [b for b in execute_pipeline(run) if len(b[SCORED_MS])]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0] if k != SCORED_MS} if batches else {}
