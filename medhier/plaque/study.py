"""One study -> one visit row of the measure job's report: the per-study work the plaque task hands
the platform (:func:`medhier.data.series.map_studies`).

    headers ──plan (visits)──▶ fetch the candidate series and the source's objects
            ──volume assembly (io.volume)──▶ one series per sequence (visits.choose_series)
            ──rigid registration onto the reference (register)──▶ transforms
            ──segmentation source──▶ label map on the reference grid ──measure──▶ the row

Registration runs for every used non-reference sequence (``plaque.register: false``: the
identity, about the reference's centre). A transform that moves the reference volume's centre by
more than :data:`MAX_SHIFT_MM` or rotates by more than :data:`MAX_ROTATION_DEG` is not one
session's patient motion but an optimiser gone astray: that sequence is ``rejected``
(``registration_implausible``), its transform kept in its entry for inspection. A sequence that
cannot be registered does not fail the visit: the measurements need only the label map on the
reference grid.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from medhier import columns as C
from medhier.config import PlaqueConfig
from medhier.data.series import Study
from medhier.io.volume import SeriesVolume, read_series
from medhier.plaque.measure import measure
from medhier.plaque.register import RegistrationError, RigidTransform, register_rigid
from medhier.plaque.report import (
    VISIT_KEY,
    VisitRejected,
    measurement_values,
    to_json,
    visit_date,
)
from medhier.plaque.segmentations import SegmentationInput, SegmentationSource, label_mapping
from medhier.plaque.visits import REJECTED, UNMATCHED, UNUSED, SeriesChoice, StudyPlan, choose_series, plan_study, series_entry

__all__ = [
    "MAX_ROTATION_DEG",
    "MAX_SHIFT_MM",
    "AssembledVisit",
    "VisitSettings",
    "assemble_visit",
    "end_row",
    "measure_study",
    "measure_version",
    "reject_row",
    "start_row",
]

MAX_ROTATION_DEG = 10.0  # within one session a patient turns a few degrees at most
MAX_SHIFT_MM = 10.0  # ... and moves a few millimetres
MEASURE_FORMAT = 1  # bump when a code change alters what a visit row holds: every visit is measured again


def measure_version(cfg: PlaqueConfig) -> str:
    """The report's ``model_version``: the code's format and the plaque settings that change a
    visit's row (sequences, reference, register, seg_labels); another version measures again."""
    text = to_json({"format": MEASURE_FORMAT, "sequences": cfg.sequences, "reference": cfg.reference,
                    "register": cfg.register, "seg_labels": cfg.seg_labels})
    return f"measure-{MEASURE_FORMAT}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class VisitSettings:
    """What the per-study task needs, picklable: the plaque config, the segmentation source, the
    run's identity (report columns) and the patient salt (headers are re-read for volumes)."""

    plaque: PlaqueConfig
    source: SegmentationSource
    model_id: str
    model_version: str
    run_id: str
    patient_salt: str = ""


@dataclass(frozen=True)
class AssembledVisit:
    """A visit ready for its label map: the series chosen per sequence (``choice``), the
    transforms onto the reference (sequence -> (transform or None, rejection reason or "",
    message)) and what the segmentation source gets (``input``)."""

    choice: SeriesChoice
    transforms: dict[str, tuple[RigidTransform | None, str, str]]
    input: SegmentationInput

    @property
    def reference(self) -> SeriesVolume:
        return self.input.reference


def measure_study(study: Study, settings: VisitSettings) -> dict[str, Any]:
    """One study -> its visit row (:data:`medhier.plaque.report.REPORT_SCHEMA`), ok or error.
    Never raises: an unexpected error is an ``internal_error`` row naming the study."""
    row = start_row(study, settings)
    plan = plan_study(study.members, settings.plaque.sequences)
    visit = None
    try:
        visit = assemble_visit(study, plan, settings, row)
        segmentation = settings.source.labels(visit.input)
        row.update(segmentation=segmentation.source, segmentation_format=segmentation.format,
                   segmentation_objects=to_json(segmentation.entries))
        values = measure(segmentation.labels.array, visit.reference.spacing).to_dict()
        row.update(measurement_values(values), status=C.STATUS_OK, error_reason=None, error_message=None)
    except Exception as exc:  # VisitRejected, or a bug: either costs one visit, not the run
        reject_row(row, exc)
        return end_row(row, plan, visit, settings, getattr(exc, "choice", None))
    return end_row(row, plan, visit, settings)


def start_row(study: Study, settings: VisitSettings) -> dict[str, Any]:
    """A visit row's identity columns (the rest null until the visit is measured)."""
    return {
        C.PATIENT_KEY: study.patient_key, C.STUDY_INSTANCE_UID: study.study_instance_uid,
        "visit_date": visit_date(study.study_date), "visit_time": study.study_time,
        VISIT_KEY: study.extra.get(VISIT_KEY, study.digest), "objects": len(study.members),
        "reference_series_uid": None, "segmentation": None, "segmentation_format": None,
        "series": "[]", "segmentation_objects": "[]",
        C.MODEL_ID: settings.model_id, C.MODEL_VERSION: settings.model_version, C.RUN_ID: settings.run_id,
    }


def assemble_visit(study: Study, plan: StudyPlan, settings: VisitSettings, row: dict[str, Any] | None = None) -> AssembledVisit:
    """Fetch the study's candidate series and the source's objects, form volumes, choose the
    series per sequence and register them onto the reference -> the visit ready for its label
    map (``row``'s reference_series_uid is set as soon as it is known). Raises
    :class:`VisitRejected`."""
    choice, objects = _assemble(study, plan, settings)
    reference = choice.volumes.get(settings.plaque.reference)
    if reference is None:
        rejected = _no_reference(plan, choice, settings.plaque.reference)
        rejected.choice = choice  # each series keeps its own outcome in the error row
        raise rejected
    if row is not None:
        row["reference_series_uid"] = reference.series_uid
    transforms = _register(choice, settings.plaque)
    visit = SegmentationInput(
        study=study, plan=plan, reference=reference, objects=objects, mapping=label_mapping(settings.plaque),
        # a rejected registration (failed, implausible) hands the source no transform
        sequences={seq: (vol, None if transforms[seq][1] else transforms[seq][0]) for seq, vol in choice.volumes.items() if seq in transforms},
    )
    return AssembledVisit(choice, transforms, visit)


def reject_row(row: dict[str, Any], exc: Exception) -> None:
    """Make ``row`` the error row of ``exc``: its reason (``internal_error`` for anything but a
    :class:`VisitRejected`), a message naming the row's study, null measurements."""
    study = row[C.STUDY_INSTANCE_UID]
    if isinstance(exc, VisitRejected):
        row.update(measurement_values(None), status=C.STATUS_ERROR, error_reason=exc.reason,
                   error_message=f"study {study}: {exc.message}", segmentation_objects=to_json(exc.segmentation_objects))
    else:
        row.update(measurement_values(None), status=C.STATUS_ERROR, error_reason="internal_error",
                   error_message=f"study {study}: {type(exc).__name__}: {exc}")


def end_row(row: dict[str, Any], plan: StudyPlan, visit: AssembledVisit | None, settings: VisitSettings,
            choice: SeriesChoice | None = None) -> dict[str, Any]:
    """Every series and SEG object of the study into the row, whatever happened, and the time.
    ``choice``: the series chosen before the visit failed (a rejection's ``choice``), when it
    failed before it was assembled."""
    choice, transforms = (visit.choice, visit.transforms) if visit else (choice, {})
    row["series"] = to_json(_series_entries(plan, choice, transforms, row.get(C.ERROR_REASON)))
    row["segmentation_objects"] = to_json(_with_unused_segs(json.loads(row["segmentation_objects"]), plan, settings.source.model_id))
    row[C.SCORED_AT] = int(time.time() * 1000)
    return row


def _assemble(study: Study, plan: StudyPlan, settings: VisitSettings) -> tuple[SeriesChoice, dict[str, bytes]]:
    """Fetch the candidate series and the source's objects; assemble every candidate series."""
    image_paths = plan.image_paths
    wanted = settings.source.archive_paths(plan)
    extra_paths = [p for p in wanted if p not in set(image_paths)]
    paths = image_paths + extra_paths
    blobs = dict(zip(paths, study.fetch(paths)))
    failed = {p: b for p, b in blobs.items() if isinstance(b, Exception)}
    if failed:
        path, exc = next(iter(failed.items()))
        raise VisitRejected("read_error", f"{len(failed)} object(s) could not be read, e.g. {path}: {type(exc).__name__}: {exc}")
    results = read_series(((p, blobs[p]) for p in image_paths), patient_salt=settings.patient_salt)
    return choose_series(plan, results), {p: blobs[p] for p in wanted}


def _no_reference(plan: StudyPlan, choice: SeriesChoice, reference: str) -> VisitRejected:
    if reference not in plan.candidates:
        found = sorted({r.series_description for refs in plan.candidates.values() for r in refs} | {r.series_description for r in plan.unmatched})
        return VisitRejected("no_reference_series", f"no SeriesDescription matches plaque.sequences.{reference} (found: {found[:8]})")
    reason, message = choice.first_rejection(plan, reference)
    return VisitRejected(reason, f"no {reference} series forms a volume: {message}")


def _register(choice: SeriesChoice, cfg: PlaqueConfig) -> dict[str, tuple[RigidTransform, str, str]]:
    """Each used non-reference sequence onto the reference -> sequence -> (transform or None,
    rejection reason or "", message)."""
    fixed = choice.volumes[cfg.reference].volume
    out = {}
    for sequence, moving in choice.volumes.items():
        if sequence == cfg.reference:
            continue
        if not cfg.register:
            out[sequence] = (RigidTransform.identity(tuple(fixed.center_position)), "", "")
            continue
        try:
            transform = register_rigid(fixed, moving.volume)
        except RegistrationError as exc:
            out[sequence] = (None, f"registration_{exc.reason}", exc.message)
            continue
        shift, angle = _motion(transform, fixed)
        if shift > MAX_SHIFT_MM or angle > MAX_ROTATION_DEG:
            out[sequence] = (transform, "registration_implausible",
                             f"the transform moves the reference centre {shift:.1f} mm and rotates {angle:.1f} degrees "
                             f"(limits {MAX_SHIFT_MM} mm, {MAX_ROTATION_DEG} degrees)")
        else:
            out[sequence] = (transform, "", "")
    return out


def _motion(transform: RigidTransform, fixed) -> tuple[float, float]:
    """(mm the fixed volume's centre moves, rotation angle in degrees) of a transform."""
    matrix = transform.matrix
    centre = np.append(np.asarray(fixed.center_position, float), 1.0)
    shift = float(np.linalg.norm((matrix @ centre)[:3] - centre[:3]))
    cosine = (np.trace(matrix[:3, :3]) - 1.0) / 2.0
    return shift, math.degrees(math.acos(min(1.0, max(-1.0, cosine))))


def _with_unused_segs(entries: list[dict[str, Any]], plan: StudyPlan, source: str) -> list[dict[str, Any]]:
    """The source's entries, plus the study's own SEG objects it did not consider (another
    source, or a visit that failed first) as ``unused``."""
    seen = {e["path"] for e in entries}
    for seg in plan.segmentations:
        if seg.path not in seen:
            entries.append({"path": seg.path, "outcome": UNUSED, "reason": None,
                            "message": f"not considered by the segmentation source {source} (or the visit failed first)",
                            "unmapped": {}, "resampled": None, "outside_voxels": None})
    return entries


def _series_entries(plan: StudyPlan, choice: SeriesChoice | None, transforms: dict, failure: str | None) -> list[dict[str, Any]]:
    """Every series of the study, in sequence order then unmatched, for the row's ``series``.
    ``choice`` None: the visit failed (``failure``) before its series were assembled."""
    entries = []
    used = {vol.series_uid: seq for seq, vol in choice.volumes.items()} if choice else {}
    for sequence, refs in plan.candidates.items():
        for ref in refs:
            if choice is None:
                outcome = (REJECTED, failure or "internal_error", "not assembled: the visit failed before volume assembly")
            else:
                outcome = choice.outcomes[ref.series_instance_uid]
            transform = None
            if used.get(ref.series_instance_uid) == sequence and sequence in transforms:
                found, reason, message = transforms[sequence]
                transform = found.to_dict() if found is not None else None
                if reason:
                    outcome = (REJECTED, reason, message)
            entries.append(series_entry(ref, outcome, transform=transform,
                                        rejected_instances=choice.instance_rejections.get(ref.series_instance_uid) if choice else None))
    for ref in plan.unmatched:
        entries.append(series_entry(ref, (UNMATCHED, "", "SeriesDescription matches no plaque.sequences pattern")))
    for path in plan.no_series:
        entries.append({"series_instance_uid": None, "series_number": None, "series_description": None, "sequence": None,
                        "instances": 1, "outcome": REJECTED, "reason": "no_series_uid",
                        "message": f"{path} has no SeriesInstanceUID", "transform": None, "rejected_instances": {}})
    return entries
