"""Plaque segmentation throughput, side by side in one run on the same phantom archive:

  (a) training: slices/s per worker through the platform's harness (``medhier plaque train-seg``:
      Ray Data shard, device augmentation, DiceCELoss, DDP; the mean ``train_images_per_s`` of
      the epochs after the first, divided by the workers) against the model alone (forward,
      DiceCELoss and backward on one batch held in memory, the same batch size, augmentation
      included, in this process);
  (b) segmentation: slices/s end to end (``medhier plaque segment``, fresh output: listing,
      headers, groupby, volumes, model inputs, model actors, SEG writing, measurement, commit;
      over the whole run and over its pipeline alone) against the model alone (``Segmenter``
      on the same slices held in memory, forward and argmax, one batch of ``seg.batch_size``);
  and the CPU seconds of the job's own processes (driver, Ray's workers and actors, daemons)
  for training and for segmenting, since this VM's cores are shared.

    python benchmarks/plaque_seg.py [--patients 8] [--seed 3] [--epochs 8] [--cpus N]

Prints a Markdown table for benchmarks/RESULTS.md. CPU only unless the machine has a GPU (then
``train.use_gpu`` and ``score.use_gpu`` are auto: the same script gives the GPU figures).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import carotid_archive, cpu_by_role, machine, process_cpu  # noqa: E402

from medhier.config import RuntimeConfig, load_config  # noqa: E402


def model_alone_training(cfg, batch: int, steps: int) -> float:
    """Slices/s of forward + DiceCELoss + backward + AdamW step on one in-memory batch (augmented on
    the device), as a training worker runs them: its CPUs' threads (Ray sets OMP_NUM_THREADS to a
    worker's CPUs), channels_last, the autocast of train.precision."""
    import torch
    from monai.losses import DiceCELoss

    from medhier.train.precision import autocast_dtype

    from medhier.plaque.seg_inputs import input_channels
    from medhier.plaque.seg_network import build_network
    from medhier.plaque.seg_presets import train_preset

    torch.manual_seed(0)
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    seg = cfg.seg
    model = build_network(seg).train().to(memory_format=torch.channels_last)
    amp = autocast_dtype(cfg.train.precision, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=seg.lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    augment = train_preset(seg)
    x = torch.rand(batch, input_channels(seg), seg.image_size, seg.image_size).half()
    y = torch.randint(0, 7, (batch, seg.image_size, seg.image_size), dtype=torch.uint8)
    for step in range(steps + 2):
        if step == 2:  # two warm-up steps
            start = time.perf_counter()
        inputs, labels = augment(x, y)
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            logits = model(inputs.contiguous(memory_format=torch.channels_last))
        loss = loss_fn(logits.float(), labels[:, None])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - start)


def model_alone_segmenting(checkpoint: str, slices: int, repeats: int, threads: int) -> float:
    """Slices/s of the Segmenter (forward, argmax) on ``slices`` in-memory slices, ``threads`` torch threads."""
    from medhier.plaque.segmenter import Segmenter

    s = Segmenter(checkpoint, threads=threads)
    x = np.random.default_rng(0).random((slices, s.channels, s.size, s.size), dtype=np.float32)
    s.segment(x[: s.batch_size])  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        s.segment(x)
    return slices * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=8, help="Ray's logical CPUs")
    parser.add_argument("--workdir", default="/tmp/medhier-bench-plaque-seg")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    root = carotid_archive(args.workdir, args.patients, args.seed)

    from medhier.runtime import init_ray, shutdown_ray

    overrides = ["runtime.progress=false", "plaque.register=false", f"train.epochs={args.epochs}", "train.num_workers=1",
                 "train.batch_size=16", "train.early_stopping_patience=0", "data.train_fraction=0.6", "data.val_fraction=0.2"]
    cfg = load_config(None, overrides)
    init_ray(RuntimeConfig(local_num_cpus=args.cpus, progress=False))
    try:
        from medhier.plaque.segment import segment_archive
        from medhier.plaque.seg_train import train_segmentation

        run = os.path.join(args.workdir, "run")
        shutil.rmtree(run, ignore_errors=True)
        before = process_cpu()
        started = time.perf_counter()
        fit = train_segmentation(cfg, root, run)
        fit_seconds = time.perf_counter() - started
        fit_cpu = sum(v for k, v in cpu_by_role(before, process_cpu(), os.getpid()).items() if k != "other")
        with open(os.path.join(run, "history.json")) as f:
            history = json.load(f)
        harness = float(np.mean([r["train_images_per_s"] for r in history[1:]])) / cfg.train.num_workers
        with open(os.path.join(run, "cache", "cache.json")) as f:
            counts = json.load(f)["counts"]

        out = os.path.join(args.workdir, "segmented")
        shutil.rmtree(out, ignore_errors=True)
        before = process_cpu()
        summary = segment_archive(cfg, root, fit.best_checkpoint, out)
        seg_cpu = sum(v for k, v in cpu_by_role(before, process_cpu(), os.getpid()).items() if k != "other")
    finally:
        shutdown_ray()
    slices = summary.visits_ok * 10  # the phantom's 10 slices per visit
    alone_train = model_alone_training(cfg, cfg.train.batch_size, steps=20)
    # one thread per core: more threads than cores (the job's actor takes Ray's logical CPUs less
    # one) make OpenMP's threads wait on each other on a shared VM
    alone_seg = model_alone_segmenting(fit.best_checkpoint, slices, repeats=3, threads=os.cpu_count() or 1)

    print(f"\n{machine(gpu=True)} | {args.cpus} logical CPUs | {args.patients} patients, {summary.visits} studies, "
          f"{counts['ok']} cached slices (train {counts['samples'].get('train', 0)}) | U-Net {cfg.seg.channels} at "
          f"{cfg.seg.image_size} px, batch {cfg.train.batch_size}\n")
    print("| what | harness / job | model alone | ratio |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| training, slices/s per worker (epochs 2..{args.epochs}) | {harness:,.0f} | {alone_train:,.0f} | {harness / alone_train:.2f} |")
    print(f"| segmenting, slices/s over the whole run ({summary.seconds:,.1f} s) | {slices / summary.seconds:,.1f} | {alone_seg:,.0f} | "
          f"{slices / summary.seconds / alone_seg:.3f} |")
    print(f"| segmenting, slices/s over its pipeline ({summary.measure_seconds:,.1f} s) | {slices / max(summary.measure_seconds, 1e-9):,.1f} | "
          f"{alone_seg:,.0f} | {slices / max(summary.measure_seconds, 1e-9) / alone_seg:.3f} |")
    print(f"\ntrain-seg: {fit_seconds:,.1f} s wall (cache, {fit.epochs_run} epochs, evaluation), {fit_cpu:,.1f} CPU s of its processes; "
          f"segment: {summary.seconds:,.1f} s wall, {seg_cpu:,.1f} CPU s ({seg_cpu / max(summary.visits, 1):,.2f} per visit)")
    dice = fit.test_metrics.get("dice", {})
    print("held-out Dice: " + ", ".join(f"{k} {v['mean']:.3f}" for k, v in dice.items() if v["mean"] is not None))


if __name__ == "__main__":
    main()
