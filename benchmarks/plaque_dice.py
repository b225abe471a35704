"""Plaque segmentation accuracy on held-out phantom patients (issue 19's check: Dice >= 0.85 for
lumen and outer wall, >= 0.6 for each plaque component).

One ``medhier plaque train-seg`` (``train_segmentation``: cache, Ray Train, evaluation of
``best/`` on the test split) on a phantom archive of ``--patients`` patients, then the same
``best/`` evaluated on the validation split. Patients are dealt 60 / 20 / 20 % into train,
validation (picks ``best/``) and test; the test split is never seen before the evaluation.
Prints, per structure and split, the Dice per visit (mean) and pooled over the split's voxels
(:mod:`medhier.plaque.seg_metrics`), the visits that have the structure, and the truth voxels,
as Markdown for benchmarks/RESULTS.md.

    python benchmarks/plaque_dice.py [--patients 96] [--epochs 120] [--seed 7] [override ...]

e.g. ``seg.class_weights=inverse_sqrt_fg`` or ``seg.context=0`` as extra overrides. The
defaults are what RESULTS.md reports: U-Net [16, 32, 64, 128], 2.5-D (one neighbouring slice on
each side), no class weights, batch 16, one worker.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import carotid_archive, machine  # noqa: E402

from medhier.config import RuntimeConfig, load_config  # noqa: E402
from medhier.plaque import labels as L  # noqa: E402
from medhier.plaque.seg_metrics import STRUCTURES  # noqa: E402
from medhier.plaque.seg_train import evaluate_segmentation, train_segmentation  # noqa: E402
from medhier.runtime import init_ray, shutdown_ray  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cpus", type=int, default=8, help="Ray's logical CPUs")
    parser.add_argument("--workdir", default="/tmp/medhier-bench-plaque-dice")
    parser.add_argument("overrides", nargs="*", help="config overrides (section.key=value)")
    args = parser.parse_args()
    root = carotid_archive(args.workdir, args.patients, args.seed)
    cache, out = os.path.join(args.workdir, f"cache-{args.patients}"), os.path.join(args.workdir, "run")
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(None, ["runtime.progress=false", "plaque.register=false", "data.decode_batch_size=64", f"data.cache={cache}",
                             "data.train_fraction=0.6", "data.val_fraction=0.2", f"train.epochs={args.epochs}", "train.num_workers=1",
                             "train.batch_size=16", "train.warmup_epochs=1", "train.early_stopping_patience=0", "seg.context=1",
                             "seg.class_weights=none", *args.overrides])
    init_ray(RuntimeConfig(local_num_cpus=args.cpus, progress=False))
    try:
        t = time.perf_counter()
        fit = train_segmentation(cfg, root, out)
        wall = time.perf_counter() - t
        splits = {"test": fit.test_metrics, "val": evaluate_segmentation(fit.best_checkpoint, cache, cfg, os.path.join(out, "val-eval"), split="val")}
    finally:
        shutdown_ray()
    s = cfg.seg
    print(f"\n{machine()} | {args.patients} patients (seed {args.seed}), {args.epochs} epochs, {s.arch} {s.channels}, context {s.context}, "
          f"class weights {s.class_weights} | train-seg {wall / 60:.1f} min (cache, training, test evaluation) | {time.strftime('%Y-%m-%d')}\n")
    print("| structure | " + " | ".join(f"{split} Dice per visit | {split} pooled | {split} visits | {split} truth voxels" for split in splits) + " |")
    print("| --- |" + " ---: | ---: | ---: | ---: |" * len(splits))
    for name in STRUCTURES:
        cells = []
        for m in splits.values():
            truth = _truth_voxels(np.array(m["confusion"]["voxels"]), name)
            cells += [_fmt(m["dice"][name]["mean"]), _fmt(m["dice_pooled"][name]), str(m["dice"][name]["n"]), f"{truth:,}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nvisits: " + ", ".join(f"{split} {m['visits']}" for split, m in splits.items()) + f"; best/ from epoch {fit.best_epoch}")


def _truth_voxels(confusion: np.ndarray, structure: str) -> int:
    """Truth voxels of a structure: the label confusion matrix's rows (truth labels) of the labels
    the structure holds (its own test applied to every label value)."""
    return int(confusion.sum(1)[STRUCTURES[structure](np.arange(len(L.NAMES)))].sum())


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
