"""A frozen phantom cohort for the prediction model's tests: what ``medhier plaque measure``
reports for every visit of ``PATIENTS`` carotid phantom patients (the measurements of their
truth label maps, which the archive's own SEGs give exactly), their ``patients.csv`` and their
true rates, without rendering a single image at test time.

Rendering and measuring a visit costs ~0.2 s of a core, so the cohort the model's statistical
checks need (hundreds of held-out visit pairs) is made once by ``python -m tests.plaque.cohort``
and kept in ``tests/plaque/data/``; ``test_cohort_still_matches_the_generator`` renders its
first patients again and compares, so a change to the phantoms or the measurements that would
make the frozen cohort stale fails a test instead of going unnoticed.

Files (keys are :func:`medhier.io.dicom.patient_key` with :data:`SALT`):

* ``cohort_visits.parquet``: one row per visit: patient_key, study_instance_uid, visit_date,
  status ("ok"), every :data:`medhier.plaque.measure.MEASUREMENTS` column (the measure report's
  columns);
* ``cohort_patients.csv``: the covariates, as ``medhier plaque synth`` writes them;
* ``cohort_rates.parquet``: truth_rates.parquet of the cohort (the true rates per patient).
"""

from __future__ import annotations

import csv
import io
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import fields
from functools import lru_cache

import pyarrow as pa
import pyarrow.parquet as pq

from medhier.plaque.measure import MEASUREMENTS
from medhier.synthetic import carotid

PATIENTS, SEED, SALT = 1000, 101, "cohort-salt"
DATA = os.path.join(os.path.dirname(__file__), "data")
VISITS, PATIENTS_CSV, RATES = (os.path.join(DATA, n) for n in ("cohort_visits.parquet", "cohort_patients.csv", "cohort_rates.parquet"))


def _measured(plan: carotid.PatientPlan) -> dict[int, dict]:
    return {v.index: carotid.measure_truth(carotid.render_labels(v)[0]) for v in plan.visits}


def build(plans: list[carotid.PatientPlan], workers: int = 1) -> dict[str, bytes]:
    """The cohort files of ``plans`` -> {path: bytes}."""
    with ProcessPoolExecutor(workers) as pool:
        measured = {(p.index, v): m for p, per in zip(plans, pool.map(_measured, plans, chunksize=8)) for v, m in per.items()}
    truth = carotid.truth_tables(plans, measured, SALT)
    visits = truth["truth.parquet"]
    visits = pa.table({
        "patient_key": visits["patient_key"], "study_instance_uid": visits["study_instance_uid"],
        "visit_date": visits["study_date"], "status": pa.array(["ok"] * visits.num_rows),
        **{name: visits[name] for name in MEASUREMENTS},
    })
    text = io.StringIO()
    rows = csv.writer(text, lineterminator="\n")
    names = [f.name for f in fields(carotid.Covariates)]
    rows.writerow(["patient_key", *names])
    for p in plans:
        values = [getattr(p.covariates, n) for n in names]
        rows.writerow([p.key(SALT), *(int(v) if isinstance(v, bool) else v for v in values)])
    return {VISITS: _parquet(visits), PATIENTS_CSV: text.getvalue().encode(), RATES: _parquet(truth["truth_rates.parquet"])}


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", compression_level=19)
    return buf.getvalue()


@lru_cache(maxsize=1)
def frozen() -> tuple[pa.Table, pa.Table]:
    """(visits, true rates) of the frozen cohort (``cohort_patients.csv`` is read by the code
    under test itself)."""
    return pq.read_table(VISITS), pq.read_table(RATES)


if __name__ == "__main__":  # python -m tests.plaque.cohort [workers]
    workers = int(sys.argv[1]) if len(sys.argv) > 1 else os.cpu_count() or 1
    files = build(carotid.plan_plaque_archive(PATIENTS, SEED), workers)
    os.makedirs(DATA, exist_ok=True)
    for path, data in files.items():
        with open(path, "wb") as f:
            f.write(data)
        print(f"{path}: {len(data):,} bytes")
