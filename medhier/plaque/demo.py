"""``medhier plaque demo``: the plaque job end to end on phantoms, on a local Ray.

    phantoms (segmentation archive, training archive, later visits archive)
    ──plaque train-seg (MONAI U-Net on Ray Train, CPU)──▶ segmentation model (best/, metrics.json)
    ──plaque measure (the training archive's visits)──▶ one row per visit
    ──change factors + patients.csv──▶ plaque fit (mean / ridge / XGBoost on Ray Train)
    ──plaque predict --seg-checkpoint (register, segment with the model, measure, predict each
      patient's latest visit)──▶ report
    ──against the phantoms' true rates──▶ printed

Three phantom archives in ``WORKDIR``, nothing downloaded:

* ``seg-archive`` (:data:`SEG_PATIENTS` patients, seed 2): the visits (and their truth DICOM
  SEGs) the segmentation model is trained on (``plaque train-seg``, output ``segmentation/``):
  a narrow U-Net for :data:`DEMO_CONFIG`'s ``train.epochs`` epochs on the CPU, split by patient
  with the first ``data.split_seed`` from the configured one that leaves a patient for
  validation and one for test. A separate small archive: the training archive's 230 visits
  would take the model's cache alone about 5 minutes on 2 cores (1.2 s a visit), and 8 patients
  already give the lumen and outer wall a held-out Dice of 0.95 (the plaque components, a few
  hundred voxels in the training split, are not learnt: 0).
* ``train-archive`` (:data:`TRAIN_PATIENTS` patients, seed 0): its visits are measured from
  their own SEGs and the prediction model is fitted on them.
* ``new-archive`` (:data:`NEW_PATIENTS` other patients, seed 1): each patient's latest visit is
  segmented by the trained model, measured and predicted, and the predictions are compared with
  the patients' true rates (``truth_rates.parquet``).

Registration runs in the predict stage (as a user's run does); segmentation training and the
training archive's measurements go without it (``plaque.register: false``): the SEGs are drawn
on the reference series, whose grid the measurements use, so registering the other sequences
changes no measurement and would cost most of the demo's time.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time

import pyarrow.parquet as pq

from medhier import columns as C
from medhier.config import Config, load_config
from medhier.data.splits import assign_split
from medhier.infer.ledger import Ledger
from medhier.plaque.api import measure_archive
from medhier.plaque.fit import fit_model
from medhier.plaque.predict import LEDGER_KEY, predict_archive
from medhier.plaque.seg_train import train_segmentation
from medhier.runtime import init_ray
from medhier.synthetic import carotid

__all__ = ["DEMO_CONFIG", "NEW_PATIENTS", "SEG_PATIENTS", "TRAIN_PATIENTS", "plaque_demo_config", "run_plaque_demo"]

# Embedded so that an installed package runs the demo without the repository around it.
DEMO_CONFIG = """
data:
  decode_batch_size: 64
predict:
  num_workers: 1
  cpus_per_worker: 1
runtime:
  progress: false
# the segmentation model: small enough to train on 2 CPU cores in a couple of minutes
seg:
  channels: [8, 16, 32, 64]
  overlays: 3
train:
  epochs: 20
  batch_size: 8
  num_workers: 1
  warmup_epochs: 0.5
  early_stopping_patience: 0
"""

TRAIN_PATIENTS = 100
NEW_PATIENTS = 6
SEG_PATIENTS = 8


def plaque_demo_config(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    return load_config(None, overrides, text=DEMO_CONFIG)


def run_plaque_demo(workdir: str, cfg: Config, verbose: bool = False, *, train_patients: int = TRAIN_PATIENTS,
                    new_patients: int = NEW_PATIENTS, seg_patients: int = SEG_PATIENTS) -> int:
    """Phantoms -> train-seg -> measure -> fit -> predict with the segmentation model -> compare,
    under ``workdir``; -> exit status. Stages whose output is already there are reused (a
    second run finds the archives, resumes the segmentation training at its end and starts
    again at the measurements)."""
    start = time.perf_counter()
    workdir = os.path.abspath(workdir)
    seg_archive, train, new = (os.path.join(workdir, d) for d in ("seg-archive", "train-archive", "new-archive"))
    segmentation, visits, model, predictions = (os.path.join(workdir, d) for d in ("segmentation", "visits", "model", "predictions"))

    _stage(f"1/6 phantom archives -> {seg_archive} ({seg_patients} patients), {train} ({train_patients}), "
           f"{new} ({new_patients} other patients)")
    for root, patients, seed in ((seg_archive, seg_patients, 2), (train, train_patients, 0), (new, new_patients, 1)):
        if os.path.exists(os.path.join(root, "truth_rates.parquet")):
            print(f"{root}: already there, reused")
        else:
            print(carotid.generate_plaque_archive(root, patients, seed=seed, patient_salt=cfg.dicom.patient_salt).table())

    init_ray(cfg.runtime, verbose=verbose)
    unregistered = dataclasses.replace(cfg, plaque=dataclasses.replace(cfg.plaque, register=False))
    seg_cfg = dataclasses.replace(unregistered, data=dataclasses.replace(cfg.data, split_seed=_seg_split_seed(seg_archive, cfg)))
    _stage(f"2/6 training the segmentation model on {seg_archive} (U-Net, {cfg.train.epochs} epochs on the CPU, split seed "
           f"{seg_cfg.data.split_seed}) -> {segmentation}")
    seg = train_segmentation(seg_cfg, seg_archive, segmentation)
    print(seg.table())
    dice = seg.test_metrics.get("dice", {})
    print("segmentation model held-out Dice: " + ", ".join(f"{s} {d['mean']:.3f}" for s, d in dice.items() if d.get("mean") is not None))

    _stage(f"3/6 measuring every visit of the training archive (its DICOM SEGs, no registration: they lie on the reference grid) -> {visits}")
    print(measure_archive(unregistered, train, visits).table())

    _stage(f"4/6 change factors and the prediction model (mean, ridge, XGBoost on Ray Train) -> {model}")
    fitted = fit_model(cfg, visits, os.path.join(train, "patients.csv"), model)
    print(fitted.table())

    _stage(f"5/6 predicting each new patient's latest visit (register, segment with the model {seg.best_checkpoint}, measure, "
           f"predict) -> {predictions}")
    print(predict_archive(cfg, new, os.path.join(new, "patients.csv"), model, predictions, seg_checkpoint=seg.best_checkpoint).table())

    _stage("6/6 predicted against the phantoms' true rates")
    print(_comparison(predictions, new, fitted.metrics, cfg))
    print(f"\nplaque demo finished in {time.perf_counter() - start:,.0f} s; the report is {predictions}/report, "
          f"the model's metrics {model}/metrics.json, the segmentation model's {segmentation}/metrics.json (plots beside them)")
    return 0


def _seg_split_seed(archive: str, cfg: Config) -> int:
    """The first ``data.split_seed`` from the configured one that leaves at least one of the
    archive's patients (patients.csv) for validation and one for test: with a handful of
    patients, many seeds leave one of them empty."""
    with open(os.path.join(archive, "patients.csv")) as f:
        keys = [row[C.PATIENT_KEY] for row in csv.DictReader(f)]
    d = cfg.data
    for seed in range(d.split_seed, d.split_seed + 1000):
        splits = [assign_split(k, seed, d.train_fraction, d.val_fraction) for k in keys]
        if "val" in splits and "test" in splits and splits.count("train") >= len(keys) // 2:
            return seed
    raise ValueError(f"{archive}: no data.split_seed leaves a validation and a test patient among {len(keys)} patients")


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
