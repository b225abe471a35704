"""Where a visit's label map comes from: a segmentation source, pluggable.

The measure job (:mod:`medhier.plaque.api`) asks its source three things: before the run, which
objects outside the archive it will use and their versions (:meth:`SegmentationSource.locate`;
a new version measures the visit again); for each study, which of the study's own objects it
needs (:meth:`~SegmentationSource.archive_paths`); and, on the worker, the label map on the
reference series' grid (:meth:`~SegmentationSource.labels`). Its ``model_id`` names it in the
report. Two sources exist; issue "part 2" adds a third, the segmentation model's own output
(its ``labels`` runs the model on the registered sequences, its ``model_id`` is the model's).

Every label map ends up in the plaque label set (:mod:`medhier.plaque.labels`) through
:func:`label_mapping` (DICOM SEG: segments claimed by ``plaque.seg_labels``' patterns, see
:mod:`medhier.io.seg`) or :data:`NIFTI_VALUES` (NIfTI).

``ArchiveSegmentations`` (``seg:archive``, the default)
--------------------------------------------------------
The DICOM SEG objects inside the study. Only those that reference the reference series are
candidates (a SEG drawn on another sequence is ``unused``); the candidates are tried latest
first (SeriesDate, SeriesTime, SeriesNumber, path, all descending) and the first that
:func:`medhier.io.seg.read_seg` places on the reference grid is ``used``, later ones are
``superseded`` (not read), failing ones ``rejected`` with ``seg_<reason>``.

``GivenSegmentations`` (``seg:<URI>``, ``--segmentations URI``)
----------------------------------------------------------------
Files under URI, keyed by StudyInstanceUID: ``URI/<StudyInstanceUID>.dcm`` (a DICOM SEG),
``URI/<StudyInstanceUID>.nii`` or ``.nii.gz`` (a NIfTI label map with the values of
:data:`NIFTI_VALUES`: 1 lumen, 2 wall, 3 lipid core, 4 haemorrhage, 5 calcification, 6 fibrous
cap), at any depth (the file's own name is the key, so ``URI/P01/<uid>.nii.gz`` works). Two
files for one study are an error (``several_segmentations``): which one is right is for a person
to say. A file whose name is not ``<StudyInstanceUID>.<dcm|nii|nii.gz>`` is counted as
``ignored``, one whose study is not in the archive as ``no_study``, in the summary. A NIfTI
image is taken to lie in the reference series' patient space (it carries no frame of reference).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa

from medhier import columns as C
from medhier.config import PlaqueConfig, StorageConfig
from medhier.data.series import Study
from medhier.io import storage
from medhier.io.seg import LabelMapping, Labels, SegRejected, read_nifti_labels, read_seg
from medhier.io.volume import SeriesVolume
from medhier.plaque import labels as L
from medhier.plaque.report import VisitRejected
from medhier.plaque.visits import REJECTED, SUPERSEDED, UNUSED, USED, StudyPlan

__all__ = [
    "NIFTI_VALUES",
    "ArchiveSegmentations",
    "GivenSegmentations",
    "Located",
    "Segmentation",
    "SegmentationInput",
    "SegmentationSource",
    "label_mapping",
    "study_of_file",
]

# A NIfTI label map's voxel value -> plaque label name: the label set's own values.
NIFTI_VALUES: dict[int, str] = {value: name for value, name in enumerate(L.NAMES) if value != L.BACKGROUND}
SEGMENTATION_PATHS = "segmentation_paths"  # the todo column GivenSegmentations hands its workers ("\n"-joined)
SEGMENTATION_VERSION = "segmentation_version"  # folded into the visit key


def label_mapping(cfg: PlaqueConfig) -> LabelMapping:
    """``plaque.seg_labels`` as a :class:`~medhier.io.seg.LabelMapping` onto the plaque label
    values (an ``outer_wall`` segment paints the wall value)."""
    values = {name: value for value, name in enumerate(L.NAMES) if value != L.BACKGROUND}
    values["outer_wall"] = L.WALL
    unknown = sorted(set(cfg.seg_labels) - set(values))
    if unknown:
        raise ValueError(f"plaque.seg_labels names {unknown}: the plaque labels are {sorted(values)}")
    return LabelMapping(values, cfg.seg_labels)


@dataclass(frozen=True)
class SegmentationInput:
    """What a source gets for one visit: the study, its plan, the reference volume, the other
    sequences' volumes and transforms (sequence -> (volume, RigidTransform, or None when its
    registration failed or was implausible); a model source resamples them with
    :func:`medhier.plaque.register.resample`),
    the archive objects it asked for (path -> bytes) and the label mapping."""

    study: Study
    plan: StudyPlan
    reference: SeriesVolume
    sequences: Mapping[str, tuple[SeriesVolume, Any]]
    objects: Mapping[str, bytes]
    mapping: LabelMapping


@dataclass(frozen=True)
class Segmentation:
    """A visit's label map on the reference grid (``labels.array`` uint8 (Z, Y, X)), where it came
    from (``source``: a path; ``format``: dicom-seg | nifti | a model's name) and one entry per
    segmentation object considered (the report's ``segmentation_objects``)."""

    labels: Labels
    source: str
    format: str
    entries: list[dict[str, Any]]


@dataclass(frozen=True)
class Located:
    """What :meth:`SegmentationSource.locate` found outside the archive: ``table`` (one row per
    study: study_instance_uid, segmentation_version, and the columns the workers get in
    ``Study.extra``), and ``ignored`` (paths it cannot use, with why)."""

    table: pa.Table | None = None
    ignored: dict[str, str] = field(default_factory=dict)


class SegmentationSource(Protocol):
    """Where label maps come from (module docstring). Picklable: it travels to the workers."""

    model_id: str

    def locate(self) -> Located:
        """Driver side, once per run: the source's objects outside the archive, by study."""

    def archive_paths(self, plan: StudyPlan) -> list[str]:
        """The study's own objects the source needs (fetched with the images)."""

    def labels(self, visit: SegmentationInput) -> Segmentation:
        """The visit's label map on the reference grid; raises :class:`VisitRejected`."""


class ArchiveSegmentations:
    """The study's own DICOM SEG objects (module docstring)."""

    model_id = "seg:archive"

    def locate(self) -> Located:
        return Located()

    def archive_paths(self, plan: StudyPlan) -> list[str]:
        return [s.path for s in plan.segmentations]

    def labels(self, visit: SegmentationInput) -> Segmentation:
        reference = visit.reference.series_uid
        entries: list[dict[str, Any]] = []
        candidates = []
        for seg in visit.plan.segmentations:
            if reference in seg.referenced_series:
                candidates.append(seg)
            else:
                others = ", ".join(seg.referenced_series) or "no series"
                entries.append(_entry(seg.path, UNUSED, message=f"references {others}, not the reference series {reference}"))
        chosen, first_error = None, None
        for seg in candidates:
            if chosen is not None:
                entries.append(_entry(seg.path, SUPERSEDED, message=f"a later SEG ({chosen.source}) is used"))
                continue
            try:
                labels = read_seg(visit.objects[seg.path], visit.reference, visit.mapping, source=seg.path)
            except SegRejected as exc:
                entries.append(_entry(seg.path, REJECTED, f"seg_{exc.reason}", exc.message))
                first_error = first_error or exc
                continue
            chosen = Segmentation(labels, seg.path, "dicom-seg", entries)
            entries.append(_used(seg.path, labels))
        if chosen is not None:
            return chosen
        if first_error is not None:
            raise VisitRejected(f"seg_{first_error.reason}", first_error.message, segmentation_objects=entries)
        found = f"{len(entries)} SEG object(s) in the study reference other series" if entries else "the study holds no DICOM SEG"
        raise VisitRejected("no_segmentation", f"{found}; none lies on the reference series {reference}", segmentation_objects=entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ArchiveSegmentations)

    def __hash__(self) -> int:
        return hash(self.model_id)


_EXTENSIONS = {".nii.gz": "nifti", ".nii": "nifti", ".dcm": "dicom-seg"}


def study_of_file(path: str) -> tuple[str, str] | None:
    """``.../<StudyInstanceUID>.<dcm|nii|nii.gz>`` -> (StudyInstanceUID, format); None for any
    other name."""
    name = path.rsplit("/", 1)[-1]
    for ext, kind in _EXTENSIONS.items():
        if name.lower().endswith(ext):
            uid = name[: -len(ext)]
            if uid and all(part.isdigit() for part in uid.split(".")):
                return uid, kind
            return None
    return None


@dataclass(frozen=True)
class GivenSegmentations:
    """Files under ``uri`` keyed by StudyInstanceUID (module docstring)."""

    uri: str
    storage: StorageConfig = field(default_factory=StorageConfig)

    @property
    def model_id(self) -> str:
        return f"seg:{storage.normalize(self.uri)}"

    def locate(self) -> Located:
        rows: dict[str, list] = {C.STUDY_INSTANCE_UID: [], SEGMENTATION_PATHS: [], SEGMENTATION_VERSION: []}
        by_study: dict[str, list] = {}
        ignored: dict[str, str] = {}
        for page in storage.list_objects(storage.normalize(self.uri), self.storage):
            for obj in page:
                keyed = study_of_file(obj.path)
                if keyed is None:
                    ignored[obj.path] = "not named <StudyInstanceUID>.dcm, .nii or .nii.gz"
                    continue
                by_study.setdefault(keyed[0], []).append(obj)
        for uid, objects in sorted(by_study.items()):
            objects.sort(key=lambda o: o.path)
            rows[C.STUDY_INSTANCE_UID].append(uid)
            rows[SEGMENTATION_PATHS].append("\n".join(o.path for o in objects))
            rows[SEGMENTATION_VERSION].append("\n".join(f"{o.path}\0{o.size}\0{o.etag}\0{int(o.mtime * 1000)}" for o in objects))
        return Located(pa.table(rows, schema=pa.schema([(k, pa.string()) for k in rows])), ignored)

    def archive_paths(self, plan: StudyPlan) -> list[str]:
        return []

    def labels(self, visit: SegmentationInput) -> Segmentation:
        paths = [p for p in (visit.study.extra.get(SEGMENTATION_PATHS) or "").split("\n") if p]
        root = storage.normalize(self.uri)
        if not paths:
            raise VisitRejected("no_segmentation", f"no {visit.study.study_instance_uid}.dcm, .nii or .nii.gz under {root}")
        if len(paths) > 1:
            entries = [_entry(p, REJECTED, "several_segmentations", "another file names the same study") for p in paths]
            raise VisitRejected("several_segmentations", f"{len(paths)} files under {root} name the study: {', '.join(paths)}",
                                segmentation_objects=entries)
        path = paths[0]
        uri = storage.join(root, path)
        try:
            data = storage.read_bytes(uri, self.storage)
        except Exception as exc:  # storage errors of every kind: the visit's row says which
            raise VisitRejected("read_error", f"{uri}: {type(exc).__name__}: {exc}") from None
        kind = study_of_file(path)[1]
        try:
            if kind == "nifti":
                labels = read_nifti_labels(data, visit.reference, NIFTI_VALUES, visit.mapping.values, source=uri)
            else:
                labels = read_seg(data, visit.reference, visit.mapping, source=uri)
        except SegRejected as exc:
            raise VisitRejected(f"seg_{exc.reason}", exc.message, segmentation_objects=[_entry(uri, REJECTED, f"seg_{exc.reason}", exc.message)]) from None
        return Segmentation(labels, uri, kind, [_used(uri, labels)])


def _entry(path: str, outcome: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {"path": path, "outcome": outcome, "reason": reason or None, "message": message or None,
            "unmapped": {}, "resampled": None, "outside_voxels": None}


def _used(path: str, labels: Labels) -> dict[str, Any]:
    entry = _entry(path, USED)
    entry.update(unmapped={str(k): v for k, v in labels.unmapped.items()}, resampled=labels.resampled, outside_voxels=labels.outside)
    return entry
