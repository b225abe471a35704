"""Small carotid phantom archives shared by the plaque job's tests, and studies built from them
without Ray (headers read by the platform's own reader)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import numpy as np

from medhier import columns as C
from medhier.config import StorageConfig, load_config
from medhier.data.series import MEMBER_FIELDS, SeriesSettings, Study, read_headers
from medhier.io import storage
from medhier.synthetic import carotid

PATIENTS, SEED = 3, 11  # 3 patients, 7 visits (P0002 has three), 64 x 64 x 10 per series


@dataclass(frozen=True)
class Phantom:
    root: str
    summary: carotid.PlaqueArchiveSummary
    plans: list[carotid.PatientPlan]


def make_phantom(root: str, patients: int = PATIENTS, seed: int = SEED, broken: bool = True) -> Phantom:
    summary = carotid.generate_plaque_archive(root, patients, seed=seed, broken=broken)
    return Phantom(root, summary, carotid.plan_plaque_archive(patients, seed))


def copy_archive(phantom: Phantom, target: str) -> str:
    """A private copy tests may change."""
    shutil.copytree(phantom.root, target)
    return target


def cfg(*overrides: str):
    """The job's config for tests: no progress bars, registration off unless asked, small header tasks."""
    return load_config(None, ["runtime.progress=false", "plaque.register=false", "data.decode_batch_size=64", *overrides])


def studies_of(root: str, folder: str = "", storage_cfg: StorageConfig | None = None, **extra) -> dict[str, Study]:
    """The studies whose objects lie under ``root``/``folder``, by StudyInstanceUID, as
    :func:`medhier.data.series.map_studies` hands them to a task (headers read without Ray)."""
    settings = SeriesSettings(storage.normalize(root), storage_cfg or StorageConfig())
    where = storage.join(root, folder) if folder else storage.normalize(root)
    prefix = f"{folder}/" if folder else ""
    objects = [o for page in storage.list_objects(where, storage_cfg) for o in page]
    batch = {
        C.PATH: np.array([prefix + o.path for o in objects], dtype=object),
        C.SIZE: np.array([o.size for o in objects]),
        C.ETAG: np.array([o.etag for o in objects], dtype=object),
        C.MTIME: np.array([o.mtime for o in objects]),
    }
    groups: dict[str, list[dict]] = {}
    for r in read_headers(batch, settings).to_pylist():
        if r[C.STATUS] == C.STATUS_OK:
            groups.setdefault(r[C.STUDY_INSTANCE_UID], []).append(r)
    out = {}
    for uid, rows in groups.items():
        members = tuple(sorted(({k: r[k] for k in MEMBER_FIELDS} for r in rows), key=lambda m: m[C.PATH]))
        first = rows[0]
        out[uid] = Study(uid, first[C.PATIENT_KEY], first["study_date"], first["study_time"], f"digest-{uid}", members,
                         dict(extra), settings)
    return out


def study_of(root: str, folder: str, storage_cfg: StorageConfig | None = None, **extra) -> Study:
    """The one study under ``root``/``folder`` (e.g. "P0001/V01")."""
    studies = studies_of(root, folder, storage_cfg, **extra)
    assert len(studies) == 1, f"{folder} holds {len(studies)} studies"
    return next(iter(studies.values()))


def folders(phantom: Phantom) -> list[str]:
    """Every visit folder of the phantom ("P0001/V01", ...)."""
    return [f"{p.folder}/V{v.index:02d}" for p in phantom.plans for v in p.visits]


def remove(root: str, rel: str) -> None:
    shutil.rmtree(os.path.join(root, rel))
