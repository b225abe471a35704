"""Studies as visits: which series of a study is which MR sequence, which segmentation object
belongs to it, and a patient's visits in time order. No Ray, no pixels: headers in, choices out.

Series -> sequence
------------------
A series' SeriesDescription is matched against ``PlaqueConfig.sequences`` (case-insensitive
``fnmatch`` globs): the first sequence in config order with a matching pattern claims the
series (list the specific before the general: CE-T1w before T1w). A series no pattern matches
is ``unmatched`` (localizers, scouts, reformats): counted, never read.

Two series for one sequence (a repeated acquisition, a reconstruction): the candidates are
tried in the order of **the later SeriesNumber first** (ties: the later SeriesDate and
SeriesTime, then the larger SeriesInstanceUID), and the first that forms a volume is ``used``;
the others that form volumes are ``superseded``, those that do not are ``rejected`` with the
reason :mod:`medhier.io.volume` gives. So a re-run after a failed acquisition wins, and a broken
repeat does not hide a good first take. Every candidate is assembled: each series' fate is
known and counted.

Segmentation objects (DICOM SEG, by SOP class) are collected apart; which one a visit uses is
the segmentation source's rule (:mod:`medhier.plaque.segmentations`). Objects of the study
without a SeriesInstanceUID are listed in ``StudyPlan.no_series`` (counted as rejected:
``no_series_uid``).

Visits in time
--------------
A study is a visit. A patient's visits are ordered by StudyDate, then StudyTime, then
StudyInstanceUID. ``visit_number`` (1, 2, ...) counts **usable** visits only: measured
(status ok) and dated; other studies keep a null ``visit_number``. A patient with fewer than
``PlaqueConfig.min_visits`` usable visits cannot give change rates and is counted in the summary.

The visit manifest
------------------
:func:`visit_manifest` builds it from the measure job's report (the latest row of each study for
one segmentation source and measurement version), one row per study:

=====================  ======================================================================
column                 meaning
=====================  ======================================================================
patient_key            :func:`medhier.io.dicom.patient_key` of the study's PatientID
visit_number           1-based rank among the patient's usable visits (null: not usable)
visits                 the patient's usable visits
study_instance_uid     the study
visit_date             StudyDate (date; null when absent)
visit_time             StudyTime (DICOM TM string, "" when absent)
days_since_first       days from the patient's first usable visit (null: not usable)
usable                 measured (status ok) and dated
status, error_reason   the measure job's outcome for the visit
reference_series_uid   the series of the reference sequence the label map lies on
segmentation           the segmentation object used (archive path, or URI under --segmentations)
series                 JSON: every series of the study (see :func:`series_entry`), with the rigid
                       transform onto the reference (:meth:`RigidTransform.to_dict`) where one
                       was computed
run_id                 the run that measured it
=====================  ======================================================================
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from medhier import columns as C
from medhier.io.volume import SEG_SOP_CLASSES, SeriesRejected, SeriesVolume

__all__ = [
    "USED",
    "SUPERSEDED",
    "REJECTED",
    "UNMATCHED",
    "UNUSED",
    "SegmentationObject",
    "SeriesChoice",
    "SeriesRef",
    "StudyPlan",
    "choose_series",
    "match_sequence",
    "order_visits",
    "parse_series",
    "plan_study",
    "series_entry",
    "too_few_visits",
    "visit_manifest",
]

# Outcomes of a series (and of a segmentation object) in a visit.
USED, SUPERSEDED, REJECTED, UNMATCHED, UNUSED = "used", "superseded", "rejected", "unmatched", "unused"


def match_sequence(description: str, sequences: Mapping[str, Sequence[str]]) -> str | None:
    """The sequence claiming a SeriesDescription: the first (in ``sequences`` order) with a
    matching case-insensitive glob pattern; None when none matches."""
    text = (description or "").lower()
    for sequence, patterns in sequences.items():
        if any(fnmatch.fnmatchcase(text, p.lower()) for p in patterns):
            return sequence
    return None


@dataclass(frozen=True)
class SeriesRef:
    """One image series of a study, from its headers. ``paths``: its objects, sorted."""

    series_instance_uid: str
    series_number: int | None
    series_description: str
    series_date: str
    series_time: str
    modality: str
    paths: tuple[str, ...]
    sequence: str | None  # None: unmatched

    @property
    def preference(self) -> tuple:
        """Sort key, best first when sorted in reverse: the later SeriesNumber, date and time, UID."""
        number = self.series_number if self.series_number is not None else -(2**62)
        return (number, self.series_date, self.series_time, self.series_instance_uid)


@dataclass(frozen=True)
class SegmentationObject:
    """One DICOM SEG object of a study, from its header."""

    path: str
    series_instance_uid: str
    sop_instance_uid: str
    series_number: int | None
    series_date: str
    series_time: str
    referenced_series: tuple[str, ...]

    @property
    def preference(self) -> tuple:
        """Sort key, best first when sorted in reverse: the later series date and time, SeriesNumber, path."""
        number = self.series_number if self.series_number is not None else -(2**62)
        return (self.series_date, self.series_time, number, self.path)


@dataclass(frozen=True)
class StudyPlan:
    """A study's objects sorted by role. ``candidates``: sequence -> its series, the preferred
    first (module docstring); ``unmatched``: image series no sequence claims;
    ``segmentations``: the SEG objects; ``no_series``: paths of objects without a series."""

    candidates: dict[str, tuple[SeriesRef, ...]]
    unmatched: tuple[SeriesRef, ...]
    segmentations: tuple[SegmentationObject, ...]
    no_series: tuple[str, ...]

    @property
    def image_paths(self) -> list[str]:
        """Every object of every candidate series: what volume assembly reads."""
        return [p for refs in self.candidates.values() for ref in refs for p in ref.paths]


def plan_study(members: Iterable[Mapping[str, Any]], sequences: Mapping[str, Sequence[str]]) -> StudyPlan:
    """A study's member objects (header fields as :data:`medhier.data.series.MEMBER_FIELDS`:
    path, series_instance_uid, series_number, series_description, series_date, series_time,
    modality, sop_class_uid, sop_instance_uid, referenced_series) -> its :class:`StudyPlan`."""
    series: dict[str, list[Mapping[str, Any]]] = {}
    segmentations, no_series = [], []
    for m in members:
        if m.get("sop_class_uid") in SEG_SOP_CLASSES:
            segmentations.append(
                SegmentationObject(
                    path=m[C.PATH], series_instance_uid=m.get(C.SERIES_INSTANCE_UID) or "", sop_instance_uid=m.get(C.SOP_INSTANCE_UID) or "",
                    series_number=m.get("series_number"), series_date=m.get("series_date") or "",
                    series_time=m.get("series_time") or "", referenced_series=tuple(m.get("referenced_series") or ()),
                )
            )
        elif not m.get(C.SERIES_INSTANCE_UID):
            no_series.append(m[C.PATH])
        else:
            series.setdefault(m[C.SERIES_INSTANCE_UID], []).append(m)
    candidates: dict[str, list[SeriesRef]] = {}
    unmatched = []
    for uid, objects in series.items():
        first = min(objects, key=lambda m: m[C.PATH])
        description = first.get("series_description") or ""
        ref = SeriesRef(
            series_instance_uid=uid, series_number=first.get("series_number"), series_description=description,
            series_date=first.get("series_date") or "", series_time=first.get("series_time") or "",
            modality=first.get(C.MODALITY) or "", paths=tuple(sorted(m[C.PATH] for m in objects)),
            sequence=match_sequence(description, sequences),
        )
        (candidates.setdefault(ref.sequence, []) if ref.sequence else unmatched).append(ref)
    return StudyPlan(
        candidates={seq: tuple(sorted(candidates[seq], key=lambda r: r.preference, reverse=True)) for seq in sequences if seq in candidates},
        unmatched=tuple(sorted(unmatched, key=lambda r: r.series_instance_uid)),
        segmentations=tuple(sorted(segmentations, key=lambda s: s.preference, reverse=True)),
        no_series=tuple(sorted(no_series)),
    )


@dataclass(frozen=True)
class SeriesChoice:
    """A study's series after volume assembly. ``volumes``: sequence -> the used volume;
    ``outcomes``: series UID -> (outcome, reason, message); ``instance_rejections``: series UID
    -> {path: reason} for instances rejected on their own (unreadable pixels, duplicates)."""

    volumes: dict[str, SeriesVolume]
    outcomes: dict[str, tuple[str, str, str]]
    instance_rejections: dict[str, dict[str, str]] = field(default_factory=dict)

    def first_rejection(self, plan: StudyPlan, sequence: str) -> tuple[str, str]:
        """(reason, message) of the preferred candidate of ``sequence``, for a sequence that has
        no volume; every candidate's reason is in the message."""
        refs = plan.candidates.get(sequence, ())
        reasons = [(self.outcomes[r.series_instance_uid][1], f"{_name(r)}: {self.outcomes[r.series_instance_uid][2]}") for r in refs]
        return reasons[0][0], "; ".join(m for _, m in reasons)


def choose_series(plan: StudyPlan, results: Iterable[SeriesVolume | SeriesRejected]) -> SeriesChoice:
    """Volume assembly's results (:func:`medhier.io.volume.read_series` over ``plan.image_paths``)
    -> the used series per sequence by the module's rule, and every candidate's outcome."""
    series_of = {p: ref.series_instance_uid for refs in plan.candidates.values() for ref in refs for p in ref.paths}
    built: dict[str, SeriesVolume | SeriesRejected] = {}
    singles: dict[str, dict[str, str]] = {}
    for result in results:
        if isinstance(result, SeriesRejected) and (not result.series_uid or result.reason == "duplicate_instance"):
            for source in result.sources:  # an instance rejected on its own: noted with its series
                uid = result.series_uid or series_of.get(source, "")
                singles.setdefault(uid, {})[source] = result.reason
            continue
        uid = result.series_uid
        built[uid] = result
    volumes, outcomes = {}, {}
    for sequence, refs in plan.candidates.items():
        for ref in refs:
            result = built.get(ref.series_instance_uid)
            if result is None:  # every instance was rejected on its own
                reasons = sorted(set(singles.get(ref.series_instance_uid, {}).values())) or ["unreadable_instance"]
                outcomes[ref.series_instance_uid] = (REJECTED, reasons[0], f"none of its {len(ref.paths)} instances could be read")
            elif isinstance(result, SeriesRejected):
                outcomes[ref.series_instance_uid] = (REJECTED, result.reason, result.message)
            elif sequence in volumes:
                outcomes[ref.series_instance_uid] = (SUPERSEDED, "", f"a later series of {sequence} is used")
            else:
                volumes[sequence] = result
                outcomes[ref.series_instance_uid] = (USED, "", "")
    return SeriesChoice(volumes=volumes, outcomes=outcomes, instance_rejections=singles)


def series_entry(ref: SeriesRef, outcome: tuple[str, str, str], *, transform: dict[str, Any] | None = None,
                 rejected_instances: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One series in a visit row's ``series`` JSON: uid, number, description, sequence (null:
    unmatched), instances, outcome (used | superseded | rejected | unmatched), reason and message
    (rejections), transform onto the reference (registered sequences), rejected_instances
    ({path: reason})."""
    return {
        "series_instance_uid": ref.series_instance_uid,
        "series_number": ref.series_number,
        "series_description": ref.series_description,
        "sequence": ref.sequence,
        "instances": len(ref.paths),
        "outcome": outcome[0],
        "reason": outcome[1] or None,
        "message": outcome[2] or None,
        "transform": transform,
        "rejected_instances": dict(rejected_instances or {}),
    }


def _name(ref: SeriesRef) -> str:
    return f"series {ref.series_number if ref.series_number is not None else '?'} {ref.series_description!r} ({ref.series_instance_uid})"


# -- visits in time ------------------------------------------------------------------------------


def order_visits(visits: pa.Table) -> pa.Table:
    """Studies (patient_key, study_instance_uid, visit_date (date32, may be null), visit_time,
    usable (bool)) -> the same rows sorted by patient and time, with ``visit_number``,
    ``days_since_first`` and ``visits`` (module docstring)."""
    rows = sorted(
        visits.to_pylist(),
        key=lambda r: (r[C.PATIENT_KEY], r["visit_date"] is None, r["visit_date"] or 0, r["visit_time"] or "", r[C.STUDY_INSTANCE_UID]),
    )
    first: dict[str, Any] = {}
    numbers: dict[str, int] = {}
    for r in rows:
        if r["usable"]:
            key = r[C.PATIENT_KEY]
            numbers[key] = numbers.get(key, 0) + 1
            first.setdefault(key, r["visit_date"])
            r["visit_number"] = numbers[key]
            r["days_since_first"] = (r["visit_date"] - first[key]).days
        else:
            r["visit_number"] = None
            r["days_since_first"] = None
    for r in rows:
        r["visits"] = numbers.get(r[C.PATIENT_KEY], 0)
    schema = visits.schema.append(pa.field("visit_number", pa.int32())).append(pa.field("days_since_first", pa.int32()))
    schema = schema.append(pa.field("visits", pa.int32()))
    return pa.Table.from_pylist(rows, schema=schema)


def too_few_visits(ordered: pa.Table, min_visits: int) -> tuple[int, int]:
    """(patients, patients with fewer than ``min_visits`` usable visits) of :func:`order_visits`' output."""
    per_patient = dict(zip(ordered[C.PATIENT_KEY].to_pylist(), ordered["visits"].to_pylist()))
    return len(per_patient), sum(1 for n in per_patient.values() if n < min_visits)


_MANIFEST_COLUMNS = (
    C.PATIENT_KEY, "visit_number", "visits", C.STUDY_INSTANCE_UID, "visit_date", "visit_time", "days_since_first", "usable",
    C.STATUS, C.ERROR_REASON, "reference_series_uid", "segmentation", "series", C.RUN_ID,
)


def visit_manifest(report: pa.Table) -> pa.Table:
    """The visit manifest (module docstring) from measure-report rows of one segmentation source
    and version: the latest row (``scored_at``) of each study, ordered in time per patient."""
    if not report.num_rows:
        latest = report
    else:
        order = pc.sort_indices(report, [(C.STUDY_INSTANCE_UID, "ascending"), (C.SCORED_AT, "descending")])
        ranked = report.take(order)
        uids = ranked[C.STUDY_INSTANCE_UID].to_pylist()
        keep = [i for i, uid in enumerate(uids) if i == 0 or uid != uids[i - 1]]
        latest = ranked.take(pa.array(keep, pa.int64()))
    usable = pc.and_(pc.equal(latest[C.STATUS], C.STATUS_OK), pc.is_valid(latest["visit_date"]))
    table = latest.select([C.PATIENT_KEY, C.STUDY_INSTANCE_UID, "visit_date", "visit_time"]).append_column("usable", usable)
    ordered = order_visits(table)
    extra = {uid: i for i, uid in enumerate(latest[C.STUDY_INSTANCE_UID].to_pylist())}
    idx = pa.array([extra[u] for u in ordered[C.STUDY_INSTANCE_UID].to_pylist()], pa.int64())
    for name in (C.STATUS, C.ERROR_REASON, "reference_series_uid", "segmentation", "series", C.RUN_ID):
        ordered = ordered.append_column(name, latest[name].take(idx))
    return ordered.select(list(_MANIFEST_COLUMNS))


def parse_series(text: str | None) -> list[dict[str, Any]]:
    """A report row's ``series`` (or ``segmentation_objects``) JSON -> its entries."""
    return json.loads(text) if text else []
