"""``medhier plaque train-seg``: the segmentation model trained on an archive's labelled visits with
Ray Train, through the platform's harness (:func:`medhier.train.loop.train_on_cache`: DDP,
checkpoints, resume after a lost worker, early stopping, bf16/fp16, the per-epoch report), then
evaluated on the held-out patients.

    archive ──data.study_cache (per study: plaque.seg_samples)──▶ OUTPUT/cache: one row per slice
    cache ──Ray Data (train split sharded)──▶ TorchTrainer (PLAQUE_SEG's step) ──▶ OUTPUT/train, best/
    best/ + the test split ──model actor (plaque.segmenter.SegActor)──▶ per visit: Dice, HD95,
          confusion, measurements (plaque.seg_metrics) ──▶ OUTPUT/metrics.json, OUTPUT/plots/

Output (besides the harness's ``train/``, ``best/``, ``history.json``, ``config.yaml``):
``cache/`` (unless ``data.cache`` points elsewhere), ``metrics.json`` (:func:`medhier.plaque.seg_metrics.summarise`
of the test split, or of the validation split when the test split is empty, with ``split``
and ``model_id``), ``plots/overlays.png`` (``seg.overlays`` test slices, those with the most
plaque-component voxels, the reference sequence under the truth and under the model) and
``plots/bland_altman.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from ray.data import ActorPoolStrategy

from medhier import columns as C
from medhier.config import Config
from medhier.data.cache import load_cache
from medhier.data.study_cache import StudyPrepareSummary, prepare_studies
from medhier.infer.actor import actor_resources
from medhier.io import storage
from medhier.plaque import labels as L
from medhier.plaque.seg_inputs import input_channels
from medhier.plaque.seg_metrics import STRUCTURES, bland_altman_png, overlays_png, score_visit, summarise
from medhier.plaque.segmenter import PREDICTED, ActorOptions, SegActor
from medhier.plaque.seg_samples import INPUTS, LABEL_MAP, SLICE, SLICE_MM, sampler
from medhier.plaque.seg_task import PLAQUE_SEG
from medhier.runtime import execute_pipeline
from medhier.train.checkpoint import load_checkpoint
from medhier.train.loop import TrainResult, train_on_cache

__all__ = ["SegFitResult", "evaluate_segmentation", "prepare", "train_segmentation"]


def prepare(cfg: Config, archive: str, cache: str, force: bool = False) -> StudyPrepareSummary:
    """The segmentation model's cache of ``archive`` (one row per slice of each labelled visit)."""
    return prepare_studies(cfg, archive, cache, sampler(cfg), force=force)


@dataclass
class SegFitResult(TrainResult):
    def table(self) -> str:
        return "\n".join(([self.prepare_table, ""] if self.prepare_table else []) + self.run_lines()) + (
            "\n" + summary_table(self.test_metrics) if self.test_metrics else "")


def summary_table(metrics: dict[str, Any]) -> str:
    """The evaluation's headline figures as text: Dice (mean over visits, and pooled over their
    voxels) and HD95 per structure, measurement errors."""
    lines = [f"evaluation       {metrics['visits']} visits of the {metrics['split']} split (model {metrics['model_id']})",
             f"  {'structure':<16}{'Dice':>8}{'pooled':>8}{'HD95 mm':>10}{'visits':>8}"]
    for s in STRUCTURES:
        d, h = metrics["dice"][s], metrics["hd95_mm"][s]
        lines.append(f"  {s:<16}{_fmt(d['mean']):>8}{_fmt(metrics.get('dice_pooled', {}).get(s)):>8}{_fmt(h['mean']):>10}{d['n']:>8}")
    lines.append(f"  {'measurement':<28}{'MAE':>9}{'rel':>8}{'bias':>9}  limits of agreement")
    for name, e in metrics["measurements"].items():
        limits = "" if e["limits_of_agreement"] is None else f"[{e['limits_of_agreement'][0]:.3g}, {e['limits_of_agreement'][1]:.3g}]"
        lines.append(f"  {name:<28}{_fmt(e['mean_abs_error']):>9}{_fmt(e['mean_rel_error']):>8}{_fmt(e['bias']):>9}  {limits}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def train_segmentation(cfg: Config, archive: str, output: str, hooks: tuple = ()) -> SegFitResult:
    """``medhier plaque train-seg``: cache, train, evaluate (module docstring). Re-running with the
    same output resumes from the last checkpoint. ``hooks``: see ``train_on_cache``. Needs Ray."""
    start = time.perf_counter()
    output = storage.normalize(output)
    cache = cfg.data.cache or storage.join(output, "cache")
    prepared = prepare(cfg, archive, cache)
    summary = train_on_cache(cfg, cache, output, PLAQUE_SEG, hooks=hooks)
    best = storage.join(output, "best")
    return SegFitResult.of_run(output, summary, test_metrics=evaluate_segmentation(best, cache, cfg, output),
                               seconds=time.perf_counter() - start, prepare_table=prepared.table(), metric=cfg.seg.metric)


_EVAL_COLUMNS = [C.STUDY_INSTANCE_UID, SLICE, SLICE_MM, INPUTS, LABEL_MAP]


def evaluate_segmentation(checkpoint: str, cache: str, cfg: Config, output: str, split: str = "test") -> dict[str, Any]:
    """Segment every visit of a cache split with ``checkpoint`` and score it against its truth
    (:mod:`medhier.plaque.seg_metrics`); write ``metrics.json`` and the plots under ``output``.
    Falls back to the validation split when the test split is empty. -> the summary ({} if no rows)."""
    loaded = load_checkpoint(checkpoint, PLAQUE_SEG, cfg.storage)
    seg = loaded.cfg.seg
    for name in ([split, "val"] if split == "test" else [split]):
        try:
            ds, _ = load_cache(cache, cfg.storage, name, columns=_EVAL_COLUMNS)
        except FileNotFoundError:
            continue
        table = _segment_rows(ds, checkpoint, cfg)
        if not table.num_rows:
            continue
        visits, slices = _visits(table, seg.image_size, input_channels(seg), seg.spacing_mm)
        scores = [score_visit(uid, truth, pred, spacing) for uid, (truth, pred, spacing) in visits.items()]
        metrics = {**summarise(scores), "split": name, "model_id": loaded.model_id}
        storage.write_text(storage.join(output, "metrics.json"), json.dumps(metrics, indent=2), cfg.storage)
        storage.write_bytes(storage.join(output, "plots", "bland_altman.png"), bland_altman_png(scores), cfg.storage)
        reference = seg.sequences.index(loaded.cfg.plaque.reference) if loaded.cfg.plaque.reference in seg.sequences else 0
        images, truths, preds, titles = _overlay_slices(slices, seg.overlays, reference + seg.context * len(seg.sequences))
        storage.write_bytes(storage.join(output, "plots", "overlays.png"), overlays_png(images, truths, preds, titles), cfg.storage)
        return metrics
    return {}


def _segment_rows(ds, checkpoint: str, cfg: Config) -> pa.Table:
    """A cache split's slices through one model actor -> the rows with ``predicted``, gathered."""
    gpus, cpus = actor_resources(cfg.score.use_gpu)
    options = ActorOptions(precision=cfg.train.precision, threads=0 if gpus else int(cpus), keep_inputs=True)

    def run() -> list[pa.Table]:
        scored = ds.map_batches(SegActor, fn_constructor_kwargs={"checkpoint": checkpoint, "storage_cfg": cfg.storage, "options": options},
                                batch_size=256, batch_format="pyarrow", compute=ActorPoolStrategy(size=1), num_gpus=gpus, num_cpus=cpus)
        return list(scored.iter_batches(batch_size=None, batch_format="pyarrow"))

    tables = [t for t in execute_pipeline(run) if t.num_rows]
    return pa.concat_tables(tables) if tables else pa.table({})


def _visits(table: pa.Table, size: int, channels: int, pixel_mm: float):
    """Slice rows -> {study: (truth (Z, S, S), prediction (Z, S, S), spacing)} and the slices
    themselves (study, k, inputs, truth, prediction) for the overlays."""
    by_study: dict[str, list] = {}
    for row in table.to_pylist():
        by_study.setdefault(row[C.STUDY_INSTANCE_UID], []).append(row)
    visits, slices = {}, []
    for uid, rows in sorted(by_study.items()):
        rows.sort(key=lambda r: r[SLICE])
        truth = np.stack([np.frombuffer(r[LABEL_MAP], np.uint8).reshape(size, size) for r in rows])
        pred = np.stack([np.frombuffer(r[PREDICTED], np.uint8).reshape(size, size) for r in rows])
        visits[uid] = (truth, pred, (rows[0][SLICE_MM], pixel_mm, pixel_mm))
        for r, t, p in zip(rows, truth, pred):
            slices.append((uid, r[SLICE], np.frombuffer(r[INPUTS], np.float16).reshape(channels, size, size), t, p))
    return visits, slices


def _overlay_slices(slices: list, count: int, channel: int):
    """The ``count`` slices with the most plaque-component voxels in truth, from different visits
    first."""
    component = lambda t: int(np.isin(t, [L.LIPID, L.HAEMORRHAGE, L.CALCIFICATION, L.CAP]).sum())  # noqa: E731
    ranked = sorted(range(len(slices)), key=lambda i: -component(slices[i][3]))
    chosen, seen = [], set()
    for i in ranked:  # one per visit, then the rest
        if slices[i][0] not in seen and len(chosen) < count:
            chosen.append(i)
            seen.add(slices[i][0])
    chosen += [i for i in ranked if i not in chosen][: max(0, count - len(chosen))]
    chosen = [slices[i] for i in chosen]
    return ([s[2][channel].astype(np.float32) for s in chosen], [s[3] for s in chosen], [s[4] for s in chosen],
            [f"{s[0][-8:]} slice {s[1]}" for s in chosen])
