"""Plaque prediction end to end, side by side in one run on the same phantom patients:

  (m) the model: ``medhier plaque fit`` on the tests' frozen phantom cohort (1,000 patients,
      tests/plaque/cohort.py), R² per factor for the mean predictor, ridge and XGBoost on its
      held-out test patients, and the intervals' coverage there;
  (a) per patient on one core, in this process, bytes already in memory, each patient's latest
      visit: headers, volume assembly (four series), registration (three rigid registrations
      onto T1w), measurement (its SEG read and measured), prediction (the model on one row)
      -> patients/s per core for each stage and for their sum (wall and CPU seconds);
  (b) the Ray Data job (medhier.plaque.predict.predict_archive, fresh output) on an archive of
      those patients: patients/s over the whole run (listing, headers, groupby, the per-study
      tasks, commit) and over its per-study pipeline alone, against cores x (a)'s sum; and, since
      this VM's cores are shared, the CPU seconds of the job's own processes (driver, Ray's
      workers, actors, daemons) per patient against (a)'s CPU seconds per patient;
  (c) the job's predictions against the phantoms' true rates (truth_rates.parquet): per factor
      the mean absolute error beside the held-out RMSE of (m), and how many true rates lie
      inside their interval.

    python benchmarks/plaque_predict.py [--patients 12] [--seed 5] [--cpus N]

Prints Markdown for benchmarks/RESULTS.md.
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
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import busy_share, carotid_archive, cpu_by_role, cpu_times, machine, process_cpu  # noqa: E402

from medhier import columns as C  # noqa: E402
from medhier.config import RuntimeConfig, StorageConfig, load_config  # noqa: E402
from medhier.infer.ledger import Ledger  # noqa: E402
from medhier.io.dicom import patient_key, read_dataset  # noqa: E402
from medhier.io.seg import read_seg  # noqa: E402
from medhier.io.volume import read_series  # noqa: E402
from medhier.plaque.measure import measure  # noqa: E402
from medhier.plaque.model import PredictionModel, load_model  # noqa: E402
from medhier.plaque.patients import read_patients  # noqa: E402
from medhier.plaque.register import register_rigid  # noqa: E402
from medhier.plaque.segmentations import label_mapping  # noqa: E402
from medhier.synthetic import carotid  # noqa: E402
from tests.plaque.cohort import PATIENTS_CSV, VISITS  # noqa: E402

STAGES = ("headers", "assembly", "registration", "measurement", "prediction")


def fit(workdir: str, cfg) -> tuple[str, dict]:
    """(m): the model fitted on the frozen cohort -> (output, metrics)."""
    from medhier.plaque.fit import fit_model  # after Ray is up

    out = os.path.join(workdir, "model")
    shutil.rmtree(out, ignore_errors=True)
    summary = fit_model(cfg, VISITS, PATIENTS_CSV, out)
    return out, summary.metrics | {"seconds": summary.seconds}


def per_patient(root: str, model: PredictionModel, cfg) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(a): wall and CPU seconds per patient's latest visit for each stage."""
    mapping = label_mapping(cfg.plaque)
    records = {r[C.PATIENT_KEY]: r for r in read_patients(os.path.join(root, "patients.csv"), model.space.covariate_specs,
                                                            StorageConfig()).to_pylist()}
    times: dict[str, list[float]] = {s: [] for s in STAGES}
    cpu: dict[str, list[float]] = {s: [] for s in STAGES}

    def clock(stage: str, t: float, c: float) -> None:
        times[stage].append(time.perf_counter() - t)
        cpu[stage].append(time.process_time() - c)

    for patient in sorted(glob.glob(os.path.join(root, "P*"))):
        visit = sorted(glob.glob(os.path.join(patient, "V*")))[-1]
        files = [(p, open(p, "rb").read()) for p in sorted(glob.glob(os.path.join(visit, "*", "*.dcm"))) if "/SEG/" not in p]
        seg = open(os.path.join(visit, "SEG", "seg.dcm"), "rb").read()
        t, c = time.perf_counter(), time.process_time()
        headers = [read_dataset(data, source=path, pixels=False) for path, data in files + [("seg", seg)]]
        clock("headers", t, c)
        t, c = time.perf_counter(), time.process_time()
        volumes = {v.sources[0].split(os.sep)[-2]: v for v in read_series(files)}
        clock("assembly", t, c)
        reference = volumes[carotid.REFERENCE]
        t, c = time.perf_counter(), time.process_time()
        for seq in carotid.SEQUENCES:
            if seq != carotid.REFERENCE:
                register_rigid(reference.volume, volumes[seq].volume)
        clock("registration", t, c)
        t, c = time.perf_counter(), time.process_time()
        values = measure(read_seg(seg, reference, mapping).array, reference.spacing).to_dict()
        clock("measurement", t, c)
        first = headers[0]
        record = records[patient_key(str(first.PatientID), str(first.get("IssuerOfPatientID", "") or ""))]
        t, c = time.perf_counter(), time.process_time()
        row = {name: pa.array([values[name]], pa.float64()) for name in model.space.measurements}
        row |= {name: pa.array([record[name]]) for name in model.space.covariate_specs}
        model.predict(pa.table(row))
        clock("prediction", t, c)
    return times, cpu


def job(root: str, model_dir: str, workdir: str, cfg) -> tuple[float, float, int, dict[str, float]]:
    """(b): one fresh run -> (whole run s, per-study pipeline s, latest visits predicted, CPU s
    of the job's own processes by role)."""
    from medhier.plaque.predict import predict_archive  # after Ray is up

    out = os.path.join(workdir, "predictions")
    shutil.rmtree(out, ignore_errors=True)
    before = process_cpu()
    summary = predict_archive(cfg, root, os.path.join(root, "patients.csv"), model_dir, out)
    roles = cpu_by_role(before, process_cpu(), os.getpid())
    assert summary.ok == summary.predicted, summary.errors
    return summary.seconds, summary.predict_seconds, summary.predicted, {k: v for k, v in roles.items() if k != "other"}


def accuracy(root: str, workdir: str, metrics: dict) -> list[tuple[str, str, int, float, float, int]]:
    """(c): per factor (name, unit, n, MAE against the true rates, held-out RMSE, inside the interval)."""
    from medhier.plaque.predict import LEDGER_KEY  # after Ray is up (it loads Ray Data)

    rows = {r[C.PATIENT_KEY]: r for r in Ledger(os.path.join(workdir, "predictions"), StorageConfig(), key=LEDGER_KEY).report().to_pylist()}
    truth = pq.read_table(os.path.join(root, "truth_rates.parquet")).to_pylist()
    out = []
    for factor, f in metrics["factors"].items():
        pairs = [(rows[t[C.PATIENT_KEY]], t[factor]) for t in truth if factor in t]
        if not pairs:
            continue
        mae = float(np.mean([abs(r[factor] - true) for r, true in pairs]))
        inside = sum(r[f"{factor}_lower"] <= true <= r[f"{factor}_upper"] for r, true in pairs)
        out.append((factor, f["unit"], len(pairs), mae, f["test"]["xgboost"]["rmse"], inside))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=12)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="cores the job may use (Ray's logical CPUs)")
    parser.add_argument("--workdir", default="/tmp/medhier-bench-plaque-predict")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    cfg = load_config(None, ["runtime.progress=false"])

    from medhier.runtime import init_ray

    init_ray(RuntimeConfig(local_num_cpus=args.cpus, progress=False))
    model_dir, metrics = fit(args.workdir, cfg)
    model = load_model(model_dir, StorageConfig())
    root = carotid_archive(args.workdir, args.patients, args.seed)

    times, cpu = per_patient(root, model, cfg)
    stage = {k: statistics.median(v) for k, v in times.items()}
    stage_cpu = {k: sum(v) / len(v) for k, v in cpu.items()}
    one_core, one_core_cpu = sum(stage.values()), sum(stage_cpu.values())
    before = cpu_times()
    load = os.getloadavg()[0]
    whole, pipeline, n, roles = job(root, model_dir, args.workdir, cfg)
    busy, _ = busy_share(before, cpu_times())
    job_cpu = sum(roles.values())

    print(f"\n{machine()} | {args.patients} phantom patients (seed {args.seed}), latest visit each, 4 MR series of 64 x 64 x 10, "
          f"registration on | Ray with {args.cpus} CPUs | {time.strftime('%Y-%m-%d')}\n")
    splits = metrics["splits"]
    print(f"(m) fit on the frozen cohort in {metrics['seconds']:,.0f} s; test split {splits['test']['patients']} patients / "
          f"{splits['test']['pairs']} pairs\n")
    print("| factor | unit | R² mean | R² ridge | R² XGBoost | RMSE XGBoost | interval coverage (test) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, f in metrics["factors"].items():
        t = f["test"]
        print(f"| `{name}` | {f['unit']} | {t['mean']['r2']:.3f} | {t['ridge']['r2']:.3f} | {t['xgboost']['r2']:.3f} | "
              f"{t['xgboost']['rmse']:.3f} | {f['interval']['test_coverage']:.3f} |")
    ic = metrics["interval_coverage"]
    print(f"\nAll factors: coverage {ic['test']:.3f} of {ic['n']} held-out predictions (stated {ic['stated']:.2f}).\n")
    print("| measurement | patients/s |")
    print("| --- | ---: |")
    for name, seconds in stage.items():
        print(f"| (a) one core: {name} (median {seconds * 1000:,.1f} ms wall, mean {stage_cpu[name] * 1000:,.1f} ms CPU per patient) "
              f"| {1 / seconds:,.2f} |")
    print(f"| (a) one core: the stages' sum | {1 / one_core:,.2f} |")
    print(f"| (a) x {args.cpus} cores: the bound | {args.cpus / one_core:,.2f} |")
    print(f"| (b) the job, its per-study pipeline ({pipeline:,.1f} s) | {n / pipeline:,.2f} ({n / pipeline / (args.cpus / one_core):.0%} of the bound) |")
    print(f"| (b) the job, whole run ({whole:,.1f} s: listing, headers, study index, commit included) | {n / whole:,.2f} "
          f"({n / whole / (args.cpus / one_core):.0%}) |")
    print(f"| (b) CPU per patient: the job's processes {job_cpu / n:,.2f} s against (a)'s {one_core_cpu:,.2f} s: patients per "
          f"CPU-second | {n / job_cpu:,.2f} / {1 / one_core_cpu:,.2f} ({one_core_cpu * n / job_cpu:.0%}) |")
    shares = ", ".join(f"{role} {seconds / n:,.2f} s" for role, seconds in roles.items())
    print(f"| (b) the job's CPU per patient by process: {shares} | |")
    print(f"\nDuring (b) the machine's cores were busy {busy:.0%} of the time (every process on the VM); load average {load:.1f} "
          "at its start.")
    print("\n| factor | unit | patients | MAE vs true rate (c) | held-out RMSE (m) | true rate inside the 90 % interval |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for factor, unit, k, mae, rmse, inside in accuracy(root, args.workdir, metrics):
        print(f"| `{factor}` | {unit} | {k} | {mae:.3f} | {rmse:.3f} | {inside}/{k} |")


if __name__ == "__main__":
    main()
