"""The model actor: one model per Ray actor, loaded (and compiled, or quantized) once.

A callable class for ``map_batches``: image rows in, the same rows out without their image and
with the task's prediction arrays (and ``scored_ms``: when the model scored the row's batch).
Rows without an image (error rows) pass through with the task's empty predictions. Archive
scoring, evaluation after training and the online endpoint all run their models through it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import ray
import torch
from ray.data import ActorPoolStrategy

from medhier import columns as C
from medhier.config import Config, StorageConfig
from medhier.infer.int8 import agreement, check_agreement, quantize
from medhier.io import storage
from medhier.runtime import execute_pipeline
from medhier.train.checkpoint import Loaded, ModelTask, load_checkpoint
from medhier.train.precision import autocast_dtype

__all__ = ["SCORED_MS", "ActorSettings", "InferTask", "Int8Settings", "ModelActor", "Predictor", "actor_resources", "predict_dataset"]

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

    def prepare_int8(self, model: torch.nn.Module) -> None:
        """Rewrite a copy of the model, in place, into a form int8 quantization matches."""


@dataclass(frozen=True)
class ActorSettings:
    """How the actor runs its model."""

    precision: str = "auto"  # auto, bf16, fp16, fp32 or int8 (CPU)
    channels_last: bool = True
    threads: int = 0  # torch intra-op threads on CPUs; 0 = torch's default
    compile: bool = False  # torch.compile (inductor, freezing) at the one batch shape
    batch_size: int = 32  # images per forward pass


@dataclass(frozen=True)
class Int8Settings:
    """int8 scoring: where the calibration and check images are, where the comparison goes."""

    images: str  # .npz URI: "calibration" and "check", (N, S, S) uint8 as decode tasks make them
    report: str  # folder URI; each actor writes its comparison with fp32 there as JSON
    min_agreement: float  # below this share of equal predicted classes on the check images, refuse


Annotator = Callable[["ModelActor", dict[str, np.ndarray], np.ndarray, np.ndarray, dict[str, np.ndarray]], dict[str, np.ndarray]]
"""Per-batch work beside the predictions that needs the model (the classifier's Grad-CAM):
``(actor, batch, ok mask, images (K, S, S) of the ok rows, predictions) -> extra columns``."""


class ModelActor:
    """See the module docstring. ``task``: the checkpoint's task (it rebuilds the model and reads
    its outputs); ``annotator``: optional per-batch extra columns (:data:`Annotator`)."""

    def __init__(self, task: InferTask, checkpoint: str, storage_cfg: StorageConfig, settings: ActorSettings,
                 int8: Int8Settings | None = None, annotator: Annotator | None = None):
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.storage = storage_cfg
        loaded = load_checkpoint(checkpoint, task, storage_cfg)
        self.loaded, self.model_id = loaded, loaded.model_id
        self.predictor = task.predictor(loaded)
        self.image_size = loaded.cfg.preprocess.image_size
        self.memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        self.model = loaded.model.to(self.device, memory_format=self.memory_format).eval()
        self.preset = self.predictor.preset.to(self.device)
        self.amp_dtype = None if settings.precision == "int8" else autocast_dtype(settings.precision, self.device)
        self.batch_size = settings.batch_size
        self.compiled = settings.compile or settings.precision == "int8"
        self.annotator = annotator
        # Gradients (Grad-CAM) and the int8 check need the eager model even when a compiled one scores.
        self.eager = self.model
        if settings.precision == "int8":
            self._quantize(task, int8)
        elif settings.compile:
            import torch._inductor.config as inductor_config  # inductor loads only when compiling

            inductor_config.freezing = True  # constant-fold the weights: the CPU speed-up lives here
            self.model = torch.compile(self.model)
            # Compile now, at the one batch shape it will ever see (partial batches are padded).
            self.predict_images(np.zeros((self.batch_size, self.image_size, self.image_size), np.uint8))

    def _quantize(self, task: InferTask, int8: Int8Settings | None) -> None:
        """Replace the model by its int8 version (medhier/infer/int8.py), calibrated on the
        calibration images, then compare it with the fp32 model on the check images: below
        ``min_agreement`` it raises. The comparison goes to ``int8.report`` as JSON."""
        if self.device.type != "cpu":
            raise ValueError("score.precision=int8 is a CPU path; this actor runs on a GPU: use bf16 or fp16 there")
        if int8 is None:
            raise ValueError("score.precision=int8 needs calibration images: none were given")
        with np.load(io.BytesIO(storage.read_bytes(int8.images, self.storage))) as images:
            calibration, check = images["calibration"], images["check"]
        if not len(calibration):
            raise ValueError(f"score.precision=int8: {int8.images} holds no calibration image")
        started = time.perf_counter()
        with torch.inference_mode():
            x = self.preset(torch.from_numpy(calibration).to(self.device))
        self.model = quantize(self.eager, x.contiguous(memory_format=self.memory_format), self.batch_size, prepare=task.prepare_int8)
        fp32, quantized = [], []
        for start in range(0, len(check), self.batch_size):
            part = check[start : start + self.batch_size]
            quantized.append(self.predict_images(part))  # the first call compiles
            fp32.append(self.predict_images(part, eager=True))
        if not len(check):
            self.predict_images(np.zeros((self.batch_size, self.image_size, self.image_size), np.uint8))  # compile now
        join = lambda parts: {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}  # noqa: E731
        result = agreement(join(fp32), join(quantized)) if fp32 else agreement({"pred_leaf": np.zeros(0)}, {})
        summary = {"calibration_images": len(calibration), **result.to_dict(), "seconds": round(time.perf_counter() - started, 1)}
        where = f"{socket.gethostname()}-{os.getpid()}"
        storage.write_text(storage.join(int8.report, f"{where}.json"), json.dumps(summary), self.storage)
        log.info("int8: %s", summary)
        check_agreement(result, int8.min_agreement)

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
    otherwise the CPUs of the largest node less one. An actor holding every CPU of its node
    leaves none there for the decode tasks that feed it: if the other nodes go (preempted,
    scaled down), the pipeline would wait forever for a CPU."""
    if use_gpu == "true" or (use_gpu == "auto" and ray.cluster_resources().get("GPU", 0) >= 1):
        return 1, 1.0
    total = int(ray.cluster_resources().get("CPU", 1))
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
    return 0, float(max(1, min(int(largest) - 1, total - 1)))


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
