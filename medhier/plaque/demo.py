"""``medhier plaque demo``: the plaque job end to end on phantoms, on a local Ray.

    phantoms (training archive, later visits archive) ──plaque measure──▶ one row per visit
    ──change factors + patients.csv──▶ plaque fit (mean / ridge / XGBoost on Ray Train)
    ──plaque predict (register, segment, measure, predict each patient's latest visit)──▶ report
    ──against the phantoms' true rates──▶ printed

Two phantom archives in ``WORKDIR``: ``train-archive`` (:data:`TRAIN_PATIENTS` patients, seed 0)
whose visits are measured and fitted on, and ``new-archive`` (:data:`NEW_PATIENTS` other
patients, seed 1) whose latest visits are predicted and compared with their true rates
(``truth_rates.parquet``). Nothing is downloaded.

Segmentation: the label maps are the archives' own DICOM SEGs (``seg:archive``). The
segmentation model (issue 19: ``medhier plaque train-seg``) is not part of this install yet;
when it is, its checkpoint goes to ``plaque predict --seg-checkpoint`` and this demo gains the
training stage.

Registration runs in the predict stage (as a user's run does); the training archive is measured
without it (``plaque.register: false``): its SEGs are drawn on the reference series, whose grid
the measurements use, so registering the other sequences changes no measurement and would
cost most of the demo's time.
"""

from __future__ import annotations

import dataclasses
import os
import time

import pyarrow.parquet as pq

from medhier import columns as C
from medhier.config import Config, load_config
from medhier.infer.ledger import Ledger
from medhier.plaque.api import measure_archive
from medhier.plaque.fit import fit_model
from medhier.plaque.predict import LEDGER_KEY, predict_archive
from medhier.runtime import init_ray
from medhier.synthetic import carotid

__all__ = ["DEMO_CONFIG", "NEW_PATIENTS", "TRAIN_PATIENTS", "plaque_demo_config", "run_plaque_demo"]

# Embedded so that an installed package runs the demo without the repository around it.
DEMO_CONFIG = """
data:
  decode_batch_size: 64
predict:
  num_workers: 1
  cpus_per_worker: 1
runtime:
  progress: false
"""

TRAIN_PATIENTS = 120
NEW_PATIENTS = 6


def plaque_demo_config(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    return load_config(None, overrides, text=DEMO_CONFIG)


def run_plaque_demo(workdir: str, cfg: Config, verbose: bool = False, *, train_patients: int = TRAIN_PATIENTS,
                    new_patients: int = NEW_PATIENTS) -> int:
    """Phantoms -> measure -> fit -> predict -> compare, under ``workdir``; -> exit status.
    Stages whose output is already there are reused (a second run starts at the fit)."""
    start = time.perf_counter()
    workdir = os.path.abspath(workdir)
    train, new = os.path.join(workdir, "train-archive"), os.path.join(workdir, "new-archive")
    visits, model, predictions = (os.path.join(workdir, d) for d in ("visits", "model", "predictions"))

    _stage(f"1/5 phantom archives -> {train} ({train_patients} patients), {new} ({new_patients} other patients)")
    for root, patients, seed in ((train, train_patients, 0), (new, new_patients, 1)):
        if os.path.exists(os.path.join(root, "truth_rates.parquet")):
            print(f"{root}: already there, reused")
        else:
            print(carotid.generate_plaque_archive(root, patients, seed=seed, patient_salt=cfg.dicom.patient_salt).table())

    init_ray(cfg.runtime, verbose=verbose)
    _stage(f"2/5 measuring every visit of the training archive (its DICOM SEGs, no registration: they lie on the reference grid) -> {visits}")
    unregistered = dataclasses.replace(cfg, plaque=dataclasses.replace(cfg.plaque, register=False))
    print(measure_archive(unregistered, train, visits).table())

    _stage(f"3/5 change factors and the prediction model (mean, ridge, XGBoost on Ray Train) -> {model}")
    fitted = fit_model(cfg, visits, os.path.join(train, "patients.csv"), model)
    print(fitted.table())

    _stage(f"4/5 predicting each new patient's latest visit (register, segment: the archive's SEGs, measure, predict) -> {predictions}")
    print(predict_archive(cfg, new, os.path.join(new, "patients.csv"), model, predictions).table())

    _stage("5/5 predicted against the phantoms' true rates")
    print(_comparison(predictions, new, fitted.metrics, cfg))
    print(f"\nplaque demo finished in {time.perf_counter() - start:,.0f} s; the report is {predictions}/report, "
          f"the model's metrics {model}/metrics.json (plots beside it)")
    return 0


def _comparison(predictions: str, archive: str, metrics: dict, cfg: Config) -> str:
    """Per factor: how many patients' true rate lies inside the predicted interval, and the
    mean absolute error against the held-out RMSE the fit reported."""
    rows = {r[C.PATIENT_KEY]: r for r in Ledger(predictions, cfg.storage, key=LEDGER_KEY).report().to_pylist() if r[C.STATUS] == C.STATUS_OK}
    truth = pq.read_table(os.path.join(archive, "truth_rates.parquet")).to_pylist()
    lines = [f"{'factor':<36}{'unit':>7}{'patients':>9}{'MAE':>9}{'RMSE (fit)':>11}{'inside':>8}"]
    for factor, f in metrics["factors"].items():
        pairs = [(rows[t[C.PATIENT_KEY]], t[factor]) for t in truth if t[C.PATIENT_KEY] in rows and factor in t]
        if not pairs:
            lines.append(f"{factor:<36}{f['unit']:>7}{'no true rate in the phantoms':>37}")
            continue
        mae = sum(abs(r[factor] - true) for r, true in pairs) / len(pairs)
        inside = sum(r[f"{factor}_lower"] <= true <= r[f"{factor}_upper"] for r, true in pairs)
        lines.append(f"{factor:<36}{f['unit']:>7}{len(pairs):>9}{mae:>9.3f}{f['test']['xgboost']['rmse']:>11.3f}{inside:>5}/{len(pairs)}")
    return "\n".join(lines)


def _stage(title: str) -> None:
    print(f"\n== {title}", flush=True)
