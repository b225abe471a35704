"""Scoring throughput, side by side in one run on the same phantom archive:

  (a) medhier end to end: `medhier score` (list, decode in CPU tasks, model actor, report);
  (b) the model-only ceiling on this machine: the same model, precision and batch on
      preprocessed tensors already in memory (eager bf16, compiled bf16 with inductor freezing,
      and int8: static quantization compiled by inductor, medhier/infer/int8.py);
  (c) a naive sequential baseline, what a user would write from the seed's tutorial: per file
      pydicom.dcmread, min-max normalise, resize, fp32 model on a batch of one;
  (d) the storage: every file read once before the runs (this also puts an archive that fits
      in the page cache there, so that (a) and (c) measure the code and not the disk).

    python benchmarks/score.py [--n 4000] [--small 300] [--size 512] [--image-size 224] [--arch resnet50]
                               [--links K] [--large-runs bf16,int8]
    python benchmarks/score.py --increment 1500 [--base 300]

``--increment K`` measures the nightly job instead: a first ``medhier score`` run (int8) scores a
base archive and keeps its compiled int8 model in the model cache; then K new files arrive, and
a second run, in a fresh process as a scheduled job starts, scores only them: its driver joins a
Ray head that is already up (``ray start --head``, as on a cluster a job is submitted to with
``ray job submit``). Then K more files arrive and the same second run is measured again starting
a local Ray of its own (a job run without a cluster pays Ray's start too). Side by side in
the same run: the same K files scored cold (a fresh output and an empty model cache: calibration
and compilation again, what every night cost before the cache), the naive per-file loop, and the
model-only ceiling of the cached int8 model. Start-up is process start to the first scored
batch (the earliest ``scored_at`` of the run's rows); whole-run images/s is the K images over the
process's wall time, Ray's start and the commit included.

ResNet50 at 224 px with random weights (throughput does not depend on them; int8's agreement
with fp32 on a trained model is benchmarks/int8_agreement.py's). The large archive is scored
twice, compiled bf16 and int8 (int8 only where no GPU is visible: medhier refuses it on GPUs);
it amortises Ray's start-up and the model's compilation; the small one shows the fixed costs.
--links K scores K hard-linked copies of the large archive's files as one archive of K x --n
objects: a run long enough to amortise start-up that still reads from the page cache.
Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

from medhier import columns as C  # noqa: E402
from medhier.classify.task import CLASSIFY  # noqa: E402
from medhier.config import load_config  # noqa: E402
from medhier.runtime import default_local_cpus  # noqa: E402
from medhier.synthetic import spine as synthetic  # noqa: E402
from common import RayHead, archive_files, machine, make_checkpoint, read_through  # noqa: E402


def make_archive(workdir: str, n: int, size: int, seed: int = 5) -> str:
    root = os.path.join(workdir, f"score-archive-{n}-{size}" + (f"-s{seed}" if seed != 5 else ""))
    if not os.path.exists(os.path.join(root, "labels.csv")):
        shutil.rmtree(root, ignore_errors=True)
        synthetic.generate_archive(root, n, seed=seed, size=size, workers=os.cpu_count() or 1)
    return root


def link_archive(archive: str, copies: int) -> str:
    """An archive of ``copies`` x the objects of ``archive``: hard links under copy-K/ folders.
    Every path is scored as its own object, while the page cache holds one copy of the data:
    a long run without a disk-bound archive (this VM's page cache keeps ~2 GB)."""
    root = f"{archive}-x{copies}"
    if not os.path.isdir(os.path.join(root, f"copy-{copies - 1}")):
        shutil.rmtree(root, ignore_errors=True)
        files = archive_files(archive)
        for k in range(copies):
            for path in files:
                target = os.path.join(root, f"copy-{k}", os.path.relpath(path, archive))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.link(path, target)
    return root


def end_to_end(archive: str, checkpoint: str, workdir: str, compile_: bool, batch: int,
               precision: str = "auto") -> tuple[float, float, float, float]:
    """-> (images/s of the scoring stage, images/s of the whole run, whole-run seconds,
    images/s in the steady state after the model's first batch (its compilation))."""
    from medhier.classify.score import score
    from medhier.infer.batch import report_table
    from medhier.runtime import init_ray, shutdown_ray

    out = os.path.join(workdir, f"score-out-{time.time_ns()}")
    # an empty model cache: this measures a run that compiles, as every run did before the cache
    cfg = load_config(None, ["runtime.progress=false", f"score.batch_size={batch}", f"score.compile={'true' if compile_ else 'false'}",
                             f"score.precision={precision}", f"score.model_cache={out}-compiled"])
    init_ray(cfg.runtime)
    t = time.perf_counter()
    summary = score(cfg, archive, checkpoint, out)
    seconds = time.perf_counter() - t
    ended_ms = time.time() * 1000.0
    shutdown_ray()
    # Report rows carry the time the model actor scored their batch. The steady state runs from
    # the first stamp (the first batch, which waited for compilation) to the end of the whole
    # run, commit included.
    stamps = np.sort(report_table(out, columns=[C.SCORED_AT])[C.SCORED_AT].to_numpy().astype("datetime64[ms]").astype(np.int64))
    first = stamps[0]
    later = int((stamps > first).sum())
    steady = later / max((ended_ms - first) / 1000.0, 1e-9) if later else float("nan")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(f"{out}-compiled", ignore_errors=True)
    return summary.images_per_s, summary.images_ok / seconds, seconds, steady


def model_ceiling(checkpoint: str, batch: int, size: int, compile_: bool, workdir: str, precision: str = "auto",
                  seconds: float = 20.0, cache: str = "") -> float:
    """Images/s of the model alone on preprocessed uint8 tensors in memory, all cores, in the
    model actor scoring uses. int8 calibrates on random images (the rate does not depend on what
    it calibrated on) unless ``cache`` holds the compiled model already."""
    from medhier.infer.actor import ActorSettings, Int8Settings, ModelActor

    threads = os.cpu_count() or 1
    images = np.random.default_rng(0).integers(0, 256, (2 * batch, size, size), dtype=np.uint8)
    int8 = None
    if precision == "int8":
        path = os.path.join(workdir, "int8-ceiling.npz")
        np.savez(path, calibration=images, check=images[:0])
        int8 = Int8Settings(images=path, min_agreement=0.0, calibration_images=64)
    settings = ActorSettings(precision=precision, compile=compile_, batch_size=batch, threads=threads, model_cache=cache)
    actor = ModelActor(CLASSIFY, checkpoint, load_config().storage, settings, int8=int8)
    images = images[:batch]
    for _ in range(3):
        actor.predict_images(images)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        actor.predict_images(images)
        n += batch
    return n / (time.perf_counter() - t)


def naive(paths: list[str], checkpoint: str) -> float:
    """The tutorial way: one file at a time, fp32, batch of one."""
    import pydicom
    from PIL import Image

    from medhier.classify.task import CLASSIFY
    from medhier.train.checkpoint import load_checkpoint

    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the tutorial's .to(device)
    loaded = load_checkpoint(checkpoint, CLASSIFY)
    model, size = loaded.model.eval().to(device), loaded.cfg.preprocess.image_size
    mean = torch.tensor(loaded.cfg.preprocess.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(loaded.cfg.preprocess.std, device=device).view(1, 3, 1, 1)
    t = time.perf_counter()
    with torch.no_grad():
        for path in paths:
            ds = pydicom.dcmread(path)
            image = ds.pixel_array.astype(np.float32)
            image = (image - image.min()) / max(float(image.max() - image.min()), 1e-6)
            image = np.asarray(Image.fromarray(image, mode="F").resize((size, size)))
            x = (torch.from_numpy(image).to(device)[None, None].expand(1, 3, -1, -1) - mean) / std
            model(x).main_logits.cpu()  # the tutorial reads its prediction back
    return len(paths) / (time.perf_counter() - t)


def scoring_process(archive: str, checkpoint: str, output: str, overrides: list[str], env: dict[str, str] | None = None) -> dict:
    """``medhier score`` in a fresh process, as a scheduled job runs it -> wall seconds, start-up
    seconds (process start to the run's first scored batch), the run's summary.json. ``env``:
    more environment (``RayHead.client_env``: join a running Ray instead of starting one)."""
    from medhier.infer.batch import report_table

    cmd = [sys.executable, "-m", "medhier.cli", "score", "--archive", archive, "--checkpoint", checkpoint, "--output", output,
           "runtime.progress=false", *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p), **(env or {})}
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.time() - started
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads(Path(output, "summary.json").read_text())
    table = report_table(output, columns=[C.RUN_ID, C.SCORED_AT]).to_pandas()
    stamps = table[table[C.RUN_ID] == summary["run_id"]][C.SCORED_AT]
    first = stamps.min().timestamp()
    # Where the start-up went: the run id is stamped (to the second) when score_archive has loaded
    # the checkpoint, after Python's imports and Ray's start; the summary says when the first
    # model actor was ready.
    run_started = calendar.timegm(time.strptime(summary["run_id"].split("-")[0], "%Y%m%dT%H%M%SZ"))
    actor_ready = summary["compiled_model"].get("ready_at", float("nan"))
    return {"wall_s": wall, "start_s": first - started, "summary": summary, "images": summary["images_ok"],
            "images_per_s": summary["images_ok"] / wall,
            "phases": (run_started - started, actor_ready - run_started, first - actor_ready, summary["compiled_model"].get("start_s", 0.0))}


def link_into(source: str, target: str, folder: str) -> None:
    """Hard-link every file of the archive ``source`` into ``target/folder/``: new files arriving."""
    for path in archive_files(source):
        dest = os.path.join(target, folder, os.path.relpath(path, source))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.link(path, dest)


def increment(args: argparse.Namespace, checkpoint: str) -> None:
    """The nightly job, measured (module docstring: ``--increment``)."""
    base_src, new_src = make_archive(args.workdir, args.base, args.size), make_archive(args.workdir, args.increment, args.size, seed=6)
    root = os.path.join(args.workdir, f"nightly-{time.time_ns()}")
    archive, out = os.path.join(root, "archive"), os.path.join(root, "out")
    link_into(base_src, archive, "day-0")
    read_through(archive_files(base_src) + archive_files(new_src))
    int8 = ["score.precision=int8", f"score.batch_size={args.batch}"]
    load = [os.getloadavg()[0]]
    first = scoring_process(archive, checkpoint, out, int8)  # builds the compiled int8 model and keeps it
    link_into(new_src, archive, "day-1")  # the day's new files arrive
    load.append(os.getloadavg()[0])
    # the nightly job as a scheduler runs it: a driver joining the cluster that is already up
    with RayHead(args.workdir, default_local_cpus()) as head:
        load.append(os.getloadavg()[0])
        warm = scoring_process(archive, checkpoint, out, int8, env=head.client_env)
    link_into(new_src, archive, "day-2")  # the same number of new files again (other paths: new objects)
    load.append(os.getloadavg()[0])
    local = scoring_process(archive, checkpoint, out, int8)  # the same job starting a Ray of its own
    load.append(os.getloadavg()[0])
    # the same increment scored as every night was before the cache: calibrate and compile again
    cold_archive = os.path.join(root, "cold-archive")
    link_into(new_src, cold_archive, "day-1")
    cold = scoring_process(cold_archive, checkpoint, os.path.join(root, "cold-out"),
                           [*int8, f"score.model_cache={os.path.join(root, 'empty-cache')}"])
    load.append(os.getloadavg()[0])
    c_rate = naive(archive_files(new_src)[: args.naive_files], checkpoint)
    ceiling = model_ceiling(checkpoint, args.batch, args.image_size, compile_=True, workdir=args.workdir, precision="int8",
                            cache=os.path.join(out, "compiled"))
    load.append(os.getloadavg()[0])
    shutil.rmtree(root, ignore_errors=True)

    cm = warm["summary"]["compiled_model"]
    print(f"\n{machine(gpu=True)} | {args.arch} at {args.image_size} px, batch {args.batch}, {args.size}x{args.size} CT phantoms | "
          f"{args.base} files, then {args.increment} new | load average {', '.join(f'{v:.1f}' for v in load)} | {time.strftime('%Y-%m-%d')}\n")
    print("| measurement | start-up (s) | wall (s) | images/s |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| first run, {first['images']} files, int8 built and kept (compiled model: {first['summary']['compiled_model']['cache']}) | "
          f"{first['start_s']:.1f} | {first['wall_s']:.1f} | {first['images_per_s']:.1f} |")
    print(f"| **second run, {warm['images']} new files, int8 from the model cache, joining a running Ray** (compiled model: "
          f"{cm['cache']}, actor start-up {cm['start_s']:.1f} s) | {warm['start_s']:.1f} | {warm['wall_s']:.1f} | {warm['images_per_s']:.1f} |")
    lcm = local["summary"]["compiled_model"]
    print(f"| second run again ({local['images']} other new files), starting a Ray of its own (compiled model: {lcm['cache']}, "
          f"actor start-up {lcm['start_s']:.1f} s) | {local['start_s']:.1f} | {local['wall_s']:.1f} | {local['images_per_s']:.1f} |")
    print(f"| the same {cold['images']} files cold: empty model cache, int8 calibrated and compiled again "
          f"(actor start-up {cold['summary']['compiled_model']['start_s']:.1f} s) | {cold['start_s']:.1f} | {cold['wall_s']:.1f} | "
          f"{cold['images_per_s']:.1f} |")
    print(f"| naive: dcmread + min-max + resize + fp32 model, batch 1 ({args.naive_files} of the new files) | | | {c_rate:.1f} |")
    print(f"| model only: the cached int8 model on preprocessed images in memory, batch {args.batch} | | | {ceiling:.1f} |")
    print(f"\nsecond run (joining a running Ray): start-up {warm['start_s']:.1f} s (target <= 15); whole run {warm['images_per_s'] / c_rate:.1f}x the naive loop "
          f"(target >= 3), {warm['images_per_s'] / ceiling:.2f} of the model-only ceiling; "
          f"{cold['wall_s'] / warm['wall_s']:.1f}x faster than the same increment cold")
    print(f"second run starting its own Ray: start-up {local['start_s']:.1f} s; whole run {local['images_per_s'] / c_rate:.1f}x the naive loop")
    print(f"scoring stage of the second run (score_archive's own clock: listing to commit): {warm['summary']['seconds']:.1f} s, "
          f"{warm['summary']['images_per_s']:.1f} images/s in the pipeline")
    for name, run in (("second run (joining)", warm), ("second run (own Ray)", local), ("cold run", cold)):
        imports, to_actor, to_batch, actor = run["phases"]
        print(f"{name} start-up: process start to the run's start (imports, Ray's start, the checkpoint) {imports:.1f} s; to the model actor ready "
              f"{to_actor:.1f} s (listing, todo, pipeline start; the actor itself {actor:.1f} s); to the first scored batch {to_batch:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="large archive (amortises start-up and compilation; "
                        "4,000 512x512 files are 1.9 GB, about what this VM's page cache holds)")
    parser.add_argument("--links", type=int, default=1, help="score --links x the large archive's files (hard links, "
                        "so that a long run still reads from the page cache)")
    parser.add_argument("--large-runs", default="bf16,int8", help="which end-to-end runs score the large archive")
    parser.add_argument("--small", type=int, default=300, help="small archive (fixed costs visible)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--naive-files", type=int, default=60)
    parser.add_argument("--workdir", default="/tmp/medhier-bench")
    parser.add_argument("--increment", type=int, default=0, help="measure the nightly job instead: this many new files scored "
                        "after a first run, with the model cache warm (see the module docstring)")
    parser.add_argument("--base", type=int, default=300, help="--increment: files the first run scores")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    checkpoint = make_checkpoint(args.workdir, args.arch, args.image_size)
    if args.increment:
        increment(args, checkpoint)
        return
    large, small = make_archive(args.workdir, args.n, args.size), make_archive(args.workdir, args.small, args.size)
    if args.links > 1:
        large = link_archive(large, args.links)
    n_large = args.n * args.links
    runs = set(args.large_runs.split(","))

    d_large, d_large_mb = read_through(archive_files(large))
    d_small, d_small_mb = read_through(archive_files(small))
    c_rate = naive(archive_files(small)[: args.naive_files], checkpoint)
    b_eager = model_ceiling(checkpoint, args.batch, args.image_size, compile_=False, workdir=args.workdir)
    b_compiled = model_ceiling(checkpoint, args.batch, args.image_size, compile_=True, workdir=args.workdir)
    cpu_only = not torch.cuda.is_available()  # int8 is a CPU path: medhier refuses it on GPUs
    b_int8 = model_ceiling(checkpoint, args.batch, args.image_size, compile_=True, workdir=args.workdir, precision="int8") if cpu_only else None
    ceiling = max(b for b in (b_eager, b_compiled, b_int8) if b is not None)
    a_small = end_to_end(small, checkpoint, args.workdir, compile_=False, batch=args.batch)
    a_large = end_to_end(large, checkpoint, args.workdir, compile_=True, batch=args.batch) if "bf16" in runs else None
    a_int8 = end_to_end(large, checkpoint, args.workdir, compile_=True, batch=args.batch, precision="int8") if cpu_only and "int8" in runs else None

    print(f"\n{machine(gpu=True)} | "
          f"{args.arch} at {args.image_size} px, batch {args.batch}, {args.size}x{args.size} CT phantoms | {time.strftime('%Y-%m-%d')}\n")
    print("| measurement | images/s |")
    print("| --- | ---: |")
    print(f"| (c) naive: dcmread + min-max + resize + fp32 model, batch 1 ({args.naive_files} files) | {c_rate:,.1f} |")
    print(f"| (b) model only, eager bf16 + channels_last, batch {args.batch} | {b_eager:,.1f} |")
    print(f"| (b) model only, torch.compile (inductor, freezing) bf16 + channels_last | {b_compiled:,.1f} |")
    if b_int8 is not None:
        print(f"| (b) model only, int8 (static quantization, inductor) + channels_last | {b_int8:,.1f} |")
    print(f"| (a) medhier, {args.small} files, eager (scoring stage / whole run {a_small[2]:.0f} s) | {a_small[0]:,.1f} / {a_small[1]:,.1f} |")
    if a_large is not None:
        print(f"| (a) medhier, {n_large} files, compiled (scoring stage / whole run {a_large[2]:.0f} s) | {a_large[0]:,.1f} / {a_large[1]:,.1f} |")
        print(f"| (a) medhier, {n_large} files, compiled, steady state after the first (compiling) batch | {a_large[3]:,.1f} |")
    if a_int8 is not None:
        print(f"| (a) medhier, {n_large} files, int8 (scoring stage / whole run {a_int8[2]:.0f} s) | {a_int8[0]:,.1f} / {a_int8[1]:,.1f} |")
        print(f"| (a) medhier, {n_large} files, int8, steady state after the first batch | {a_int8[3]:,.1f} |")
    print(f"| (d) reading every file once before the runs, 4 threads: {n_large} paths ({d_large_mb:,.0f} MB/s) / "
          f"{args.small} files ({d_small_mb:,.0f} MB/s) | {d_large:,.1f} / {d_small:,.1f} |")
    print(f"\nbest ceiling: {ceiling:,.1f} images/s")
    for name, run, own in (("bf16", a_large, b_compiled), ("int8", a_int8, b_int8)):
        if run is None:
            continue
        if run[3] > own:  # the model's stamps make this unlikely; say so if it happens anyway
            print(f"{name}: the steady-state figure is above the model's own ceiling: not valid in this run")
        print(f"{name}: (a)/(b) = {run[0] / ceiling:.2f} of the best ceiling (target >= 0.9); whole run {run[1] / ceiling:.2f}; "
              f"steady state {run[3] / ceiling:.2f}; steady state / its own precision's ceiling {run[3] / own:.2f}")
        print(f"{name}: (a)/(c) = {run[0] / c_rate:.1f}x the naive loop (target >= 6); whole run {run[1] / c_rate:.1f}x; "
              f"steady state {run[3] / c_rate:.1f}x")
    print(f"small archive, eager: {a_small[1] / c_rate:.1f}x the naive loop")


if __name__ == "__main__":
    main()
