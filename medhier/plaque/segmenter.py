"""The trained segmentation model at work: a checkpoint loaded once per process or actor, slices in,
label maps out.

* :class:`Segmenter` — a plaque-seg checkpoint (:data:`medhier.plaque.seg_task.PLAQUE_SEG`) on this
  process's device (a GPU when there is one), in the checkpoint's own ``seg`` settings:
  model inputs (:mod:`medhier.plaque.seg_inputs`) -> uint8 label maps, on the model grid or, given
  a :class:`~medhier.plaque.seg_inputs.ModelGrid`, on the reference grid (logits interpolated back,
  then the argmax).
* :class:`SegActor` — the same as a callable class for Ray Data's ``map_batches`` (the pattern of
  :class:`medhier.infer.actor.ModelActor`: model loaded once per actor, batches on its device,
  bf16/fp16 autocast, ``inference_mode``): rows with ``inputs`` (float16 (K, C, S, S) bytes)
  and optionally ``grid`` (a ModelGrid as JSON) in, as Arrow tables, the same rows (without
  ``inputs`` unless kept) and with ``predicted`` (uint8 (K, Y, X) bytes; empty where ``inputs`` is) and
  ``segmented_at`` out.
* :class:`ModelSegmentations` — the model as a
  :class:`~medhier.plaque.segmentations.SegmentationSource`: ``plaque measure``'s per-study
  tasks can measure the model's label maps with no other change (the model runs inside each
  task, on its CPU); the segment job (:mod:`medhier.plaque.segment`) runs it on actors instead.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from medhier.config import StorageConfig
from medhier.io import storage
from medhier.io.seg import Labels
from medhier.plaque import labels as L
from medhier.plaque.seg_inputs import ModelGrid, input_channels, model_inputs
from medhier.plaque.seg_samples import INPUTS
from medhier.plaque.segmentations import Located, Segmentation, SegmentationInput
from medhier.plaque.seg_task import PLAQUE_SEG
from medhier.plaque.visits import USED, StudyPlan
from medhier.runtime import cpu_threads
from medhier.train.checkpoint import load_checkpoint
from medhier.train.precision import autocast_dtype

__all__ = ["GRID", "PREDICTED", "SEGMENTED_AT", "ActorOptions", "ModelSegmentations", "SegActor", "Segmenter"]

GRID = "grid"  # JSON of a ModelGrid: predictions go back onto that reference grid
PREDICTED = "predicted"  # uint8 (K, Y, X) label maps, bytes
SEGMENTED_AT = "segmented_at"  # when the model segmented the row's batch (timestamp, UTC)
FORMAT = "plaque-seg"  # Segmentation.format of the model's label maps


class Segmenter:
    """A plaque-seg checkpoint ready to segment (module docstring). ``precision``: auto, bf16,
    fp16 or fp32; ``threads``: torch's intra-op threads on a CPU (0: torch's default);
    ``batch_size``: slices per forward pass (0: the checkpoint's ``seg.batch_size``)."""

    def __init__(self, checkpoint: str, storage_cfg: StorageConfig | None = None, *, precision: str = "auto", threads: int = 0,
                 batch_size: int = 0):
        if threads:
            torch.set_num_threads(cpu_threads(threads))
        loaded = load_checkpoint(checkpoint, PLAQUE_SEG, storage_cfg)
        self.checkpoint, self.model_id, self.seg = checkpoint, loaded.model_id, loaded.cfg.seg
        self.meta = loaded.task_meta
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = loaded.model.to(self.device, memory_format=torch.channels_last).eval()
        self.amp_dtype = autocast_dtype(precision, self.device)
        self.batch_size = batch_size or self.seg.batch_size
        self.channels, self.size = input_channels(self.seg), self.seg.image_size

    @torch.inference_mode()
    def segment(self, inputs: np.ndarray, grid: ModelGrid | None = None) -> np.ndarray:
        """float (K, C, S, S) model inputs -> uint8 (K, S, S) label maps on the model grid, or
        (K, Y, X) on the reference grid ``grid`` lies over."""
        if inputs.ndim != 4 or inputs.shape[1:] != (self.channels, self.size, self.size):
            raise ValueError(f"Segmenter: inputs of shape {inputs.shape}, the model takes (K, {self.channels}, {self.size}, {self.size})")
        back = None if grid is None or grid.identity else torch.from_numpy(grid.reference_points()).to(self.device)
        out = []
        for start in range(0, len(inputs), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(inputs[start : start + self.batch_size], np.float32)).to(self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = self.model(x.contiguous(memory_format=torch.channels_last)).float()
            if back is not None:
                # bilinear logits on the reference grid; beyond the model grid every logit is 0 -> background
                logits = F.grid_sample(logits, back.expand(len(logits), -1, -1, -1), mode="bilinear", padding_mode="zeros",
                                       align_corners=True)
            out.append(logits.argmax(1).to(torch.uint8).cpu().numpy())
        shape = grid.shape if back is not None else (self.size, self.size)
        return np.concatenate(out) if out else np.zeros((0, *shape), np.uint8)


@dataclass(frozen=True)
class ActorOptions:
    """How a :class:`SegActor` runs its model."""

    precision: str = "auto"
    threads: int = 0  # torch intra-op threads on CPUs; 0 = torch's default
    batch_size: int = 0  # slices per forward pass; 0 = the checkpoint's seg.batch_size
    keep_inputs: bool = False  # pass ``inputs`` on (an evaluation draws them); by default dropped


class SegActor:
    """A :class:`Segmenter` as a callable class for ``map_batches`` (module docstring)."""

    def __init__(self, checkpoint: str, storage_cfg: StorageConfig, options: ActorOptions = ActorOptions()):
        self.keep_inputs = options.keep_inputs
        self.segmenter = Segmenter(checkpoint, storage_cfg, precision=options.precision, threads=options.threads,
                                   batch_size=options.batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        s = self.segmenter
        grids = batch[GRID].to_pylist() if GRID in batch.column_names else [None] * batch.num_rows
        blobs = batch[INPUTS].to_pylist()
        predicted: list[bytes] = [b""] * batch.num_rows
        # rows on the model grid (a cache's slices) go through the model together, in full batches
        plain = [i for i, (blob, grid) in enumerate(zip(blobs, grids)) if blob and not grid]
        if plain:
            stacked = np.concatenate([np.frombuffer(blobs[i], np.float16).reshape(-1, s.channels, s.size, s.size) for i in plain])
            maps, start = s.segment(stacked), 0
            for i in plain:
                k = len(blobs[i]) // (2 * s.channels * s.size * s.size)
                predicted[i], start = maps[start : start + k].tobytes(), start + k
        for i, (blob, grid) in enumerate(zip(blobs, grids)):
            if blob and grid:  # a visit, back onto its reference grid
                inputs = np.frombuffer(blob, np.float16).reshape(-1, s.channels, s.size, s.size)
                predicted[i] = s.segment(inputs, ModelGrid.from_json(grid)).tobytes()
        stamp = pa.array(np.full(batch.num_rows, int(time.time() * 1000), np.int64).astype("datetime64[ms]"), pa.timestamp("ms", tz="UTC"))
        out = batch if self.keep_inputs else batch.drop_columns([INPUTS])
        return out.append_column(PREDICTED, pa.array(predicted, pa.binary())).append_column(SEGMENTED_AT, stamp)


@functools.lru_cache(maxsize=2)
def _segmenter(checkpoint: str, storage_json: str) -> Segmenter:
    """One loaded model per checkpoint and process: a measure job's tasks share their worker's.
    The storage settings come as JSON: the cache needs a hashable key, and some of them are lists."""
    return Segmenter(checkpoint, StorageConfig(**json.loads(storage_json)))


@dataclass(frozen=True)
class ModelSegmentations:
    """The model as a segmentation source (module docstring). ``model_id``: the checkpoint's;
    ``reference``: the visit's reference sequence (``plaque.reference``)."""

    checkpoint: str
    model_id: str
    reference: str
    storage: StorageConfig = field(default_factory=StorageConfig)

    def locate(self) -> Located:
        return Located()

    def archive_paths(self, plan: StudyPlan) -> list[str]:
        # the reference's own files: a SEG written on the reference series needs their headers
        return [p for ref in plan.candidates.get(self.reference, ()) for p in ref.paths]

    def labels(self, visit: SegmentationInput) -> Segmentation:
        segmenter = _segmenter(storage.normalize(self.checkpoint), json.dumps(asdict(self.storage), sort_keys=True))
        grid = ModelGrid.over(visit.reference, segmenter.seg)
        array = segmenter.segment(model_inputs(visit.reference, visit.sequences, segmenter.seg, self.reference), grid)
        present = {int(v): L.NAMES[int(v)] for v in np.unique(array) if v}
        labels = Labels(array=array, mapped=present, unmapped={}, resampled=not grid.identity, outside=0)
        entry = {"path": self.checkpoint, "outcome": USED, "reason": None, "message": f"segmented by model {self.model_id}",
                 "unmapped": {}, "resampled": labels.resampled, "outside_voxels": 0}
        return Segmentation(labels, self.checkpoint, FORMAT, [entry])
