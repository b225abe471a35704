"""medhier's GPU figures in one command, on a fresh GPU machine, in under ten minutes:

  (a) training images/s per GPU: ResNet50 at 224 px, AMP (bf16, fp16 where bf16 is missing),
      channels_last, through medhier's Ray Train harness (the cache, the TorchTrainer, DDP over
      every GPU), against
  (b) plain PyTorch on the same GPU: the same model, augmentation and loss, one process, images
      already on the GPU (the ceiling for one GPU);
  (c) scoring images/s from the cache (the evaluation path: cache rows -> model actor), and end to
      end from DICOM (`medhier score`: list, decode on the CPUs, model actors on the GPUs,
      report), against
  (d) the model alone: the scoring model actor on preprocessed images in GPU memory;
  (e) GPU utilisation during each phase (nvidia-smi, sampled every 0.5 s);
  and the same for the plaque segmentation model (2.5-D MONAI U-Net on phantom carotid MR):
  (f) training slices/s per GPU through the harness (``plaque train-seg``) against (g) its step
      in plain PyTorch on one GPU, slices resident there; (h) ``plaque segment`` end to end from
      DICOM (listing, series to volumes, registration, model actors on the GPUs, SEG, measures)
      against (i) the segmentation model alone (``Segmenter``) on slices in memory.

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
                "score_batch": 16, "plain_steps": 6, "model_seconds": 3.0, "seg_patients": 3, "seg_epochs": 2, "seg_batch": 8}
    return {"arch": "resnet50", "image_size": 224, "dicom_size": 256, "images": args.images, "batch": args.batch, "epochs": 3,
            "workers": max(gpus, 1), "score_batch": 256, "plain_steps": 60, "model_seconds": 15.0, "seg_patients": 16,
            "seg_epochs": 5, "seg_batch": 64}


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
        plaque_phases(args, s, gpus, phases, np, torch)
    minutes = (time.time() - started) / 60

    device = f"{gpus} x {torch.cuda.get_device_name()}" if gpus else "CPU (dry run, tiny sizes: not GPU figures)"
    lines = [
        f"\n## GPU — `benchmarks/gpu.py{' --dry-run' if args.dry_run else ''}` ({time.strftime('%Y-%m-%d')})\n",
        f"{machine(gpu=True)} | {device} | torch {torch.__version__} | {s['arch']} at {s['image_size']} px, "
        f"{s['images']} phantom DICOMs ({s['dicom_size']}x{s['dicom_size']}) | training batch {s['batch']} per GPU | {minutes:.1f} minutes\n",
        "| measurement | images/s | GPU utilisation | note |",
        "| --- | ---: | ---: | --- |",
    ]
    for name, rate, util, note in sorted(phases.rows, key=lambda row: row[0][:3]):  # (a)..(i), measured in another order
        lines.append(f"| {name} | {rate:,.1f} | {'n/a' if util is None else f'{util:.0f} %'} | {note} |")
    train, plain = phases.value("(a) Ray Train, per GPU"), phases.value("(b) plain PyTorch, one GPU")
    e2e, alone = phases.value("(c) scoring end to end from DICOM"), phases.value("(d) the model alone")
    lines += ["", f"Ray Train per GPU / plain PyTorch = {train / plain:.2f}; scoring end to end / the model alone = {e2e / alone:.2f}; "
                  f"from the cache / the model alone = {phases.value('(c) scoring from the cache') / alone:.2f}; plaque U-Net: "
                  f"Ray Train per GPU / plain PyTorch = {phases.value(SEG_TRAIN) / phases.value(SEG_PLAIN):.2f}, "
                  f"segment end to end / the model alone = {phases.value(SEG_JOB) / phases.value(SEG_ALONE):.3f}"]
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


SEG_TRAIN, SEG_PLAIN = "(f) plaque U-Net training, Ray Train, per GPU (slices/s)", "(g) plaque U-Net training, plain PyTorch, one GPU (slices/s)"
SEG_JOB, SEG_ALONE = "(h) plaque segment end to end from DICOM (slices/s)", "(i) the plaque U-Net alone (slices/s)"


def plaque_phases(args, s: dict, gpus: int, phases: Phases, np, torch) -> None:
    """(f)-(i): the plaque segmentation model's training through the harness and alone, its
    segment job end to end and the model alone, on a phantom carotid archive."""
    from common import carotid_archive
    from medhier.config import load_config
    from medhier.plaque.seg_train import train_segmentation
    from medhier.plaque.segment import segment_archive
    from medhier.plaque.segmenter import Segmenter
    from medhier.runtime import init_ray, shutdown_ray

    use_gpu = "true" if gpus else "false"
    cfg = load_config(None, [
        "runtime.progress=false", "plaque.register=true", "seg.context=1", f"train.epochs={s['seg_epochs']}",
        f"train.num_workers={s['workers']}", f"train.batch_size={s['seg_batch']}", "train.early_stopping_patience=0",
        f"train.use_gpu={use_gpu}", "train.cpus_per_worker=1", "train.precision=auto", f"score.use_gpu={use_gpu}",
        "data.train_fraction=0.6", "data.val_fraction=0.2",
    ])
    root = carotid_archive(args.workdir, s["seg_patients"], seed=3)
    run, out = os.path.join(args.workdir, "plaque-train"), os.path.join(args.workdir, "plaque-segment")
    init_ray(cfg.runtime)
    try:
        t0 = time.time()
        fit = train_segmentation(cfg, root, run)
        t1 = time.time()
        rates = [h["train_images_per_s"] for h in json.load(open(os.path.join(run, "history.json")))]
        phases.add(SEG_TRAIN, max(rates[1:] or rates) / s["workers"], t0, t1,
                   f"{s['workers']} worker(s), {s['seg_patients']} patients, 2.5-D, batch {s['seg_batch']}; epochs: "
                   f"{', '.join(f'{r:,.0f}' for r in rates)} slices/s in all")
        t0 = time.time()
        summary = segment_archive(cfg, root, fit.best_checkpoint, out)
        t1 = time.time()
        slices = summary.visits_ok * 10  # the phantom's 10 slices per visit
        phases.add(SEG_JOB, slices / (t1 - t0), t0, t1, f"{summary.visits_ok} visits, whole run; "
                   f"{slices / max(summary.measure_seconds, 1e-9):,.0f} slices/s over its pipeline")
    finally:
        shutdown_ray()
    t0 = time.time()
    plain = plain_seg_training(cfg, s, torch)
    phases.add(SEG_PLAIN, plain, t0, time.time(), "the harness's step: device augmentation, DiceCELoss, AMP, channels_last")
    segmenter = Segmenter(fit.best_checkpoint)
    x = np.random.default_rng(0).random((max(segmenter.batch_size, 64), segmenter.channels, segmenter.size, segmenter.size), dtype=np.float32)
    segmenter.segment(x)
    t0, done = time.time(), 0
    while time.time() - t0 < s["model_seconds"]:
        segmenter.segment(x)
        done += len(x)
    phases.add(SEG_ALONE, done / (time.time() - t0), t0, time.time(), f"Segmenter, batch {segmenter.batch_size}, autocast")


def plain_seg_training(cfg, s: dict, torch) -> float:
    """Slices/s of the plaque task's own training step in a plain loop on one device, on random
    slices already there (as :func:`plain_training` for the classifier)."""
    from medhier.plaque.seg_inputs import input_channels
    from medhier.plaque.seg_samples import INPUTS, LABEL_MAP
    from medhier.plaque.seg_task import PLAQUE_SEG
    from medhier.train.loop import Env
    from medhier.train.precision import autocast_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = Env(device, autocast_dtype(cfg.train.precision, device), torch.channels_last, 0, 1)
    step = PLAQUE_SEG.make_step(cfg, env, {})
    model = PLAQUE_SEG.build_model(cfg).to(device, memory_format=torch.channels_last).train()
    n, size = s["seg_batch"], cfg.seg.image_size
    batch = {INPUTS: torch.rand(n, input_channels(cfg.seg), size, size, device=device).half(),
             LABEL_MAP: torch.randint(0, 7, (n, size, size), dtype=torch.uint8, device=device)}
    return timed_steps(step, model, batch, s["plain_steps"], device, torch)


def timed_steps(step, model, batch: dict, steps: int, device, torch) -> float:
    """Samples/s of ``steps`` training steps (``step.loss``, backward, AdamW, the fp16 scaler where
    AMP is fp16) on one batch resident on ``device``, after a few warm-up steps."""
    optimizer = torch.optim.AdamW(step.param_groups(model))
    scaler = torch.amp.GradScaler(enabled=step.env.amp_dtype == torch.float16)
    generator = torch.Generator(device=device).manual_seed(0)

    def one() -> int:
        loss, n = step.loss(model, batch, generator)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return n

    for _ in range(max(3, steps // 6)):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t, done = time.perf_counter(), 0
    for _ in range(steps):
        done += one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - t)


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
    n, size = s["batch"], s["image_size"]
    batch = {C.IMAGE: torch.randint(0, 256, (n, size, size), dtype=torch.uint8, device=device),
             MAIN_INDEX: torch.randint(0, 3, (n,), device=device), LEAF_INDEX: torch.zeros(n, dtype=torch.long, device=device)}
    leaf_main = torch.as_tensor(step.taxonomy.leaf_main, device=device)
    batch[LEAF_INDEX] = torch.stack([torch.nonzero(leaf_main == m)[0, 0] for m in batch[MAIN_INDEX]])
    return timed_steps(step, model, batch, s["plain_steps"], device, torch)


if __name__ == "__main__":
    main()
