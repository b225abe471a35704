"""medhier's GPU figures in one command, on a fresh GPU machine, in under six minutes:

  (a) training images/s per GPU: ResNet50 at 224 px, AMP (bf16, fp16 where bf16 is missing),
      channels_last, through medhier's Ray Train harness (the cache, the TorchTrainer, DDP over
      every GPU), against
  (b) plain PyTorch on the same GPU: the same model, augmentation and loss, one process, images
      already on the GPU (the ceiling for one GPU);
  (c) scoring images/s from the cache (the evaluation path: cache rows -> model actor), and end to
      end from DICOM (`medhier score`: list, decode on the CPUs, model actors on the GPUs,
      report), against
  (d) the model alone: the scoring model actor on preprocessed images in GPU memory;
  (e) GPU utilisation during each phase (nvidia-smi, sampled every 0.5 s).

    python3 benchmarks/gpu.py                 # on a GPU machine; installs medhier into .venv-gpu first if needed
    python3 benchmarks/gpu.py --dry-run       # the same code path on CPU with tiny sizes (checks it runs)

Run from anywhere in the repository. When medhier's dependencies are not importable, the script
makes a virtual environment beside the repository (``.venv-gpu``), installs medhier there with
pip (PyPI's Linux torch wheels carry CUDA) and runs itself again inside it. Without a GPU it
refuses (use ``--dry-run``). The results table is printed and appended to benchmarks/RESULTS.md
(``--results`` elsewhere; the dry run appends nowhere unless given ``--results``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import venv

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
VENV = os.path.join(REPO, ".venv-gpu")


def ensure_installed(args: argparse.Namespace) -> None:
    """Run inside an environment that has medhier's dependencies: this one, or .venv-gpu made now."""
    try:
        import pydicom  # noqa: F401  (a dependency only medhier brings)
        import ray  # noqa: F401
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as exc:
        if args.no_install:
            raise SystemExit(f"gpu.py: {exc.name} is missing and --no-install was given: pip install -e {REPO}") from None
        python = os.path.join(VENV, "bin", "python")
        if not os.path.exists(python):
            print(f"gpu.py: {exc.name} is missing; installing medhier into {VENV} (minutes)", flush=True)
            venv.create(VENV, with_pip=True)
        subprocess.check_call([python, "-m", "pip", "install", "--quiet", "-e", REPO])
        os.execv(python, [python, os.path.abspath(__file__), *sys.argv[1:], "--no-install"])


class GpuSampler:
    """nvidia-smi's utilisation of every GPU, sampled every ``interval`` seconds in a thread;
    :meth:`mean` over a time window. Empty (``None`` means) where there is no nvidia-smi."""

    def __init__(self, interval: float = 0.5):
        self.samples: list[tuple[float, list[float]]] = []
        self.interval = interval
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GpuSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5, check=True).stdout
                self.samples.append((time.time(), [float(v) for v in out.split()]))
            except (subprocess.SubprocessError, ValueError):  # a failed sample is a missing sample
                pass
            self._stop.wait(self.interval)

    def mean(self, start: float, end: float) -> float | None:
        """Mean utilisation (%) over all GPUs between two time.time() stamps."""
        values = [statistics.mean(v) for t, v in self.samples if start <= t <= end and v]
        return statistics.mean(values) if values else None


class Phases:
    """Named measurements with their time windows and images/s, for the table."""

    def __init__(self, sampler: GpuSampler):
        self.sampler, self.rows = sampler, []

    def add(self, name: str, images_per_s: float, start: float, end: float, note: str = "") -> None:
        self.rows.append((name, images_per_s, self.sampler.mean(start, end), note))

    def value(self, name: str) -> float:
        return next(r[1] for r in self.rows if r[0] == name)


def settings(args: argparse.Namespace, gpus: int) -> dict:
    if args.dry_run:  # the same path, small enough for a CPU in a minute or two
        return {"arch": "resnet18", "image_size": 64, "dicom_size": 64, "images": 48, "batch": 8, "epochs": 2, "workers": 2,
                "score_batch": 16, "plain_steps": 6, "model_seconds": 3.0}
    return {"arch": "resnet50", "image_size": 224, "dicom_size": 256, "images": args.images, "batch": args.batch, "epochs": 3,
            "workers": max(gpus, 1), "score_batch": 256, "plain_steps": 60, "model_seconds": 15.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check that the script runs")
    parser.add_argument("--images", type=int, default=4096, help="phantom DICOMs (256x256) to train and score on")
    parser.add_argument("--batch", type=int, default=128, help="training images per GPU per step")
    parser.add_argument("--workdir", default="/tmp/medhier-gpu-bench")
    parser.add_argument("--results", default=None, help="the Markdown file the table is appended to "
                        "(default benchmarks/RESULTS.md; the dry run appends only where given)")
    parser.add_argument("--no-install", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    ensure_installed(args)

    import numpy as np
    import torch

    sys.path.insert(0, REPO)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import machine  # noqa: E402  (after the install: it imports torch)

    gpus = torch.cuda.device_count()
    if not gpus and not args.dry_run:
        raise SystemExit("gpu.py: no CUDA GPU visible (torch.cuda.device_count() == 0); run with --dry-run to check the script on CPU")
    s = settings(args, gpus)
    started = time.time()
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    with GpuSampler() as sampler:
        phases = Phases(sampler)
        run_phases(args, s, gpus, phases, np, torch)
    minutes = (time.time() - started) / 60

    device = f"{gpus} x {torch.cuda.get_device_name()}" if gpus else "CPU (dry run, tiny sizes: not GPU figures)"
    lines = [
        f"\n## GPU — `benchmarks/gpu.py{' --dry-run' if args.dry_run else ''}` ({time.strftime('%Y-%m-%d')})\n",
        f"{machine(gpu=True)} | {device} | torch {torch.__version__} | {s['arch']} at {s['image_size']} px, "
        f"{s['images']} phantom DICOMs ({s['dicom_size']}x{s['dicom_size']}) | training batch {s['batch']} per GPU | {minutes:.1f} minutes\n",
        "| measurement | images/s | GPU utilisation | note |",
        "| --- | ---: | ---: | --- |",
    ]
    for name, rate, util, note in phases.rows:
        lines.append(f"| {name} | {rate:,.1f} | {'n/a' if util is None else f'{util:.0f} %'} | {note} |")
    train, plain = phases.value("(a) Ray Train, per GPU"), phases.value("(b) plain PyTorch, one GPU")
    e2e, alone = phases.value("(c) scoring end to end from DICOM"), phases.value("(d) the model alone")
    lines += ["", f"Ray Train per GPU / plain PyTorch = {train / plain:.2f}; scoring end to end / the model alone = {e2e / alone:.2f}; "
                  f"from the cache / the model alone = {phases.value('(c) scoring from the cache') / alone:.2f}"]
    text = "\n".join(lines)
    print(text)
    results = args.results or (None if args.dry_run else os.path.join(REPO, "benchmarks", "RESULTS.md"))
    if results:
        with open(results, "a") as f:
            f.write(text + "\n")
        print(f"\nappended to {results}")


def run_phases(args, s: dict, gpus: int, phases: Phases, np, torch) -> None:
    from medhier.classify.api import prepare
    from medhier.classify.report import PRED_LEAF
    from medhier.classify.score import score
    from medhier.classify.task import CLASSIFY
    from medhier.config import load_config
    from medhier.data.cache import load_cache
    from medhier.infer.actor import ActorSettings, ModelActor, predict_dataset
    from medhier.runtime import init_ray, shutdown_ray
    from medhier.synthetic import spine

    cfg = load_config(None, [
        f"model.arch={s['arch']}", "model.pretrained=none", f"preprocess.image_size={s['image_size']}", "dicom.windows.CT=bone",
        f"train.epochs={s['epochs']}", f"train.batch_size={s['batch']}", f"train.num_workers={s['workers']}",
        "train.early_stopping_patience=0", f"train.use_gpu={'true' if gpus else 'false'}", "train.cpus_per_worker=1",
        "train.channels_last=true", "train.precision=auto", f"score.batch_size={s['score_batch']}", "runtime.progress=false",
        "score.compile=false",
    ])
    archive, cache, out = (os.path.join(args.workdir, name) for name in ("archive", "cache", "train"))
    spine.generate_archive(archive, s["images"], seed=11, size=s["dicom_size"], workers=os.cpu_count() or 1)
    init_ray(cfg.runtime)
    try:
        prepare(cfg, archive, cache)

        # (a) through the harness: per-epoch training images/s of all workers, from history.json
        t0 = time.time()
        from medhier.train.loop import train_on_cache

        train_on_cache(cfg, cache, out, CLASSIFY)
        t1 = time.time()
        history = json.load(open(os.path.join(out, "history.json")))
        rates = [h["train_images_per_s"] for h in history]
        best = max(rates[1:] or rates)  # the first epoch includes cuDNN autotuning and the pipeline's fill
        phases.add("(a) Ray Train, per GPU", best / s["workers"], t0, t1,
                   f"{s['workers']} worker(s); epochs: {', '.join(f'{r:,.0f}' for r in rates)} images/s in all")

        # (b) the same step in one plain process, images resident on the GPU
        t0 = time.time()
        plain = plain_training(cfg, s, torch)
        phases.add("(b) plain PyTorch, one GPU", plain, t0, time.time(), "same model, augmentation, loss, AMP and channels_last")

        checkpoint = os.path.join(out, "best")
        # (c) scoring from the cache: the evaluation path (Ray Data rows -> one model actor)
        t0 = time.time()
        rows, _ = load_cache(cache, cfg.storage, None, columns=list(CLASSIFY.columns))
        n = len(predict_dataset(rows, CLASSIFY, checkpoint, cfg, batch_size=s["score_batch"])[PRED_LEAF])
        t1 = time.time()
        phases.add("(c) scoring from the cache", n / (t1 - t0), t0, t1, f"{n} images, one model actor, eager")

        # (c) end to end from DICOM
        t0 = time.time()
        summary = score(cfg, archive, checkpoint, os.path.join(args.workdir, "score"))
        t1 = time.time()
        phases.add("(c) scoring end to end from DICOM", summary.images_ok / (t1 - t0), t0, t1,
                   f"{summary.images_ok} images, whole run ({summary.images_per_s:,.0f} images/s in the pipeline), {summary.precision}")
    finally:
        shutdown_ray()

    # (d) the model alone, in the scoring actor, on preprocessed images in memory
    actor = ModelActor(CLASSIFY, checkpoint, cfg.storage, ActorSettings(precision="auto", batch_size=s["score_batch"]))
    images = np.random.default_rng(0).integers(0, 256, (s["score_batch"], s["image_size"], s["image_size"]), dtype=np.uint8)
    for _ in range(3):
        actor.predict_images(images)
    t0, done = time.time(), 0
    while time.time() - t0 < s["model_seconds"]:
        actor.predict_images(images)
        done += len(images)
    phases.add("(d) the model alone", done / (time.time() - t0), t0, time.time(), f"batch {s['score_batch']}, eager, autocast")


def plain_training(cfg, s: dict, torch) -> float:
    """Images/s of medhier's own training step (augmentation, loss, AMP) in a plain loop on one
    device, on random uint8 images already there: no Ray, no data pipeline, no DDP."""
    from medhier.classify.step import ClassifyStep
    from medhier.classify.task import CLASSIFY
    from medhier.classify.labels import LEAF_INDEX, MAIN_INDEX
    from medhier.train.loop import Env
    from medhier.train.precision import autocast_dtype
    from medhier import columns as C

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = Env(device, autocast_dtype(cfg.train.precision, device), torch.channels_last, 0, 1)
    step = ClassifyStep(cfg, env, {})
    model = CLASSIFY.build_model(cfg).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(step.param_groups(model))
    scaler = torch.amp.GradScaler(enabled=env.amp_dtype == torch.float16)
    generator = torch.Generator(device=device).manual_seed(0)
    n, size = s["batch"], s["image_size"]
    batch = {C.IMAGE: torch.randint(0, 256, (n, size, size), dtype=torch.uint8, device=device),
             MAIN_INDEX: torch.randint(0, 3, (n,), device=device), LEAF_INDEX: torch.zeros(n, dtype=torch.long, device=device)}
    leaf_main = torch.as_tensor(step.taxonomy.leaf_main, device=device)
    batch[LEAF_INDEX] = torch.stack([torch.nonzero(leaf_main == m)[0, 0] for m in batch[MAIN_INDEX]])

    def one() -> None:
        loss, _ = step.loss(model, batch, generator)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(max(3, s["plain_steps"] // 6)):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(s["plain_steps"]):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return s["plain_steps"] * n / (time.perf_counter() - t)


if __name__ == "__main__":
    main()
