"""Plaque measure throughput, side by side in one run on the same phantom visits:

  (a) per visit on one core, in this process, bytes already in memory: volume assembly
      (io.volume.read_series of the visit's four series), registration (three rigid
      registrations onto T1w, one ITK thread), measurement (io.seg.read_seg of the visit's SEG
      and plaque.measure.measure) -> visits/s per core for each, and for the three together;
  (b) the Ray Data job (medhier.plaque.api.measure_archive, fresh output each time) on the same
      archive, registration on and off: visits/s over the whole run (listing, headers, groupby,
      measuring, commit) and over its measuring pipeline alone, against cores x (a)'s rate; and,
      since this VM's cores are shared, the CPU seconds the job's own processes (driver, Ray's
      workers, actors and daemons) spent per visit against (a)'s CPU seconds per visit;
  (c) registration against the phantom's known motion (truth_motion.parquet): how far each
      transform puts the reference volume's centre from where the truth puts it.

    python benchmarks/plaque_measure.py [--patients 8] [--seed 3] [--cpus N] [--jobs both|on|off]

(a)'s registration and (c) run on the first 20 visits (seconds each); ``--jobs off`` runs (b)
only without registration (a larger archive in minutes).

Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import sys
import time

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import busy_share, carotid_archive, cpu_by_role, cpu_times, machine, process_cpu  # noqa: E402

from medhier.config import PlaqueConfig, RuntimeConfig, load_config  # noqa: E402
from medhier.io.dicom import read_dataset  # noqa: E402
from medhier.io.volume import read_series  # noqa: E402
from medhier.io.seg import read_seg  # noqa: E402
from medhier.plaque.measure import measure  # noqa: E402
from medhier.plaque.register import register_rigid  # noqa: E402
from medhier.plaque.segmentations import label_mapping  # noqa: E402
from medhier.synthetic import carotid  # noqa: E402


REGISTRATION_SAMPLE = 20  # visits registered in (a) and (c)


def per_visit(root: str) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]]]:
    """(a) and (c): wall and CPU seconds per visit for each stage; registration error (mm) per sequence."""
    mapping = label_mapping(PlaqueConfig())
    truth = {r["series_instance_uid"]: np.array(r["matrix"]).reshape(4, 4) for r in pq.read_table(os.path.join(root, "truth_motion.parquet")).to_pylist()}
    times: dict[str, list[float]] = {"headers": [], "assembly": [], "registration": [], "measurement": []}
    cpu: dict[str, list[float]] = {k: [] for k in times}
    errors: dict[str, list[float]] = {seq: [] for seq in carotid.SEQUENCES if seq != carotid.REFERENCE}
    for n, visit in enumerate(sorted(glob.glob(os.path.join(root, "P*", "V*")))):
        files = [(p, open(p, "rb").read()) for p in sorted(glob.glob(os.path.join(visit, "*", "*.dcm"))) if "/SEG/" not in p]
        seg = open(os.path.join(visit, "SEG", "seg.dcm"), "rb").read()
        t, c = time.perf_counter(), time.process_time()
        for path, data in files + [("seg", seg)]:  # what the job's header pass does for each object
            read_dataset(data, source=path, pixels=False)
        times["headers"].append(time.perf_counter() - t)
        cpu["headers"].append(time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        volumes = {v.sources[0].split(os.sep)[-2]: v for v in read_series(files)}
        times["assembly"].append(time.perf_counter() - t)
        cpu["assembly"].append(time.process_time() - c)
        reference = volumes[carotid.REFERENCE]
        centre = np.append(np.asarray(reference.volume.center_position), 1.0)
        if n < REGISTRATION_SAMPLE:
            t, c = time.perf_counter(), time.process_time()
            transforms = {seq: register_rigid(reference.volume, volumes[seq].volume) for seq in errors}
            times["registration"].append(time.perf_counter() - t)
            cpu["registration"].append(time.process_time() - c)
            for seq, transform in transforms.items():
                expected = truth[volumes[seq].series_uid]
                errors[seq].append(float(np.linalg.norm((transform.matrix @ centre - expected @ centre)[:3])))
        t, c = time.perf_counter(), time.process_time()
        labels = read_seg(seg, reference, mapping)
        measure(labels.array, reference.spacing)
        times["measurement"].append(time.perf_counter() - t)
        cpu["measurement"].append(time.process_time() - c)
    return times, cpu, errors


def job(root: str, workdir: str, register: bool) -> tuple[float, float, int, dict[str, float]]:
    """(b): one fresh run -> (whole run s, measuring pipeline s, visits, CPU s of the job's own processes by role)."""
    from medhier.plaque.api import measure_archive  # after Ray is up

    out = os.path.join(workdir, f"out-{'reg' if register else 'noreg'}")
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(None, ["runtime.progress=false", f"plaque.register={str(register).lower()}"])
    before = process_cpu()
    summary = measure_archive(cfg, root, out)
    roles = cpu_by_role(before, process_cpu(), os.getpid())
    return summary.seconds, summary.measure_seconds, summary.visits, {k: v for k, v in roles.items() if k != "other"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="cores the job may use (Ray's logical CPUs)")
    parser.add_argument("--workdir", default="/tmp/medhier-bench-plaque")
    parser.add_argument("--jobs", choices=["both", "on", "off"], default="both", help="(b) with registration on, off or both")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    root = carotid_archive(args.workdir, args.patients, args.seed)
    visits = len(glob.glob(os.path.join(root, "P*", "V*")))

    times, cpu, errors = per_visit(root)
    stage = {k: statistics.median(v) for k, v in times.items()}
    stage_cpu = {k: sum(v) / len(v) for k, v in cpu.items()}
    with_reg = stage["assembly"] + stage["registration"] + stage["measurement"]
    without_reg = stage["assembly"] + stage["measurement"]

    from medhier.runtime import init_ray

    init_ray(RuntimeConfig(local_num_cpus=args.cpus, progress=False))
    job(root, args.workdir, register=False)  # warm-up: Ray's workers start and import once
    before = cpu_times()
    which = {"both": (True, False), "on": (True,), "off": (False,)}[args.jobs]
    runs = {register: job(root, args.workdir, register) for register in which}
    busy, _ = busy_share(before, cpu_times())

    print(f"\n{machine()} | {args.patients} phantom patients, {visits} visits, 4 MR series of 64 x 64 x 10 each | "
          f"Ray with {args.cpus} CPUs | {time.strftime('%Y-%m-%d')}\n")
    print("| measurement | visits/s |")
    print("| --- | ---: |")
    for name, seconds in stage.items():
        print(f"| (a) one core: {name} (median {seconds * 1000:,.0f} ms wall, mean {stage_cpu[name] * 1000:,.0f} ms CPU "
              f"per visit) | {1 / seconds:,.2f} |")
    print(f"| (a) one core: assembly + registration + measurement (headers not included) | {1 / with_reg:,.2f} |")
    print(f"| (a) one core: assembly + measurement (plaque.register: false) | {1 / without_reg:,.2f} |")
    for register, (whole, measuring, n, roles) in runs.items():
        label = "registration on" if register else "plaque.register: false"
        ideal = args.cpus / (with_reg if register else without_reg)
        alone = stage_cpu["assembly"] + stage_cpu["measurement"] + (stage_cpu["registration"] if register else 0.0)
        job_cpu = sum(roles.values())
        print(f"| (b) Ray Data job, {label}: whole run {whole:,.1f} s / measuring pipeline {measuring:,.1f} s | "
              f"{n / whole:,.2f} / {n / measuring:,.2f} |")
        print(f"| (b) ideal: {args.cpus} cores x (a), {label} | {ideal:,.2f} |")
        print(f"| (b) CPU per visit, {label}: the job's processes {job_cpu / n:,.2f} s against (a)'s {alone:,.2f} s: "
              f"visits per CPU-second | {n / job_cpu:,.2f} / {1 / alone:,.2f} |")
        shares = ", ".join(f"{role} {seconds / n:,.2f} s" for role, seconds in roles.items())
        print(f"| (b) the job's CPU per visit by process, {label}: {shares} | |")
    print(f"\nThe machine's cores were busy {busy:.0%} of the time during (b) (every process on the VM, not only this one).")
    print("\nRegistration against the phantom's known motion: distance (mm) between where the transform and the truth put "
          "the reference volume's centre, median / largest over the visits; transforms past the job's plausibility "
          "limits (10 mm, 10 degrees) are rejected by it:\n")
    print("| sequence | median mm | largest mm | > 2 mm |")
    print("| --- | ---: | ---: | ---: |")
    for seq, values in errors.items():
        print(f"| {seq} | {statistics.median(values):.2f} | {max(values):.2f} | {sum(v > 2 for v in values)} of {len(values)} |")


if __name__ == "__main__":
    main()
