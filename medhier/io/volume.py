"""DICOM instances -> one 3-D volume per series (MR, CT; single-frame stacks and enhanced
multi-frame objects alike), or a typed rejection per series.

This module imports neither Ray nor torch. Headers come from :func:`medhier.io.dicom.read_dataset`
(the one header parser), pixels from pydicom's own pipeline (decoder, then the modality LUT or
rescale slope/intercept; no VOI window: MR intensities stay raw, CT is in HU), geometry from
highdicom (:func:`highdicom.spatial.get_volume_positions` orders the slices,
:meth:`highdicom.Volume.from_attributes` builds the affine). medhier adds what highdicom leaves
out: *why* a series does not form a volume.

Index order and affine
----------------------
``SeriesVolume.array`` is float32 ``(Z, Y, X)``: slice, row, column. Every slice is one frame (a
single-frame instance, or one frame of a multi-frame instance). ``SeriesVolume.affine`` is
highdicom's 4x4 matrix from voxel indices ``(k, i, j, 1)`` (slice, row, column; 0 = the centre of
the first voxel) to patient coordinates in millimetres, DICOM's LPS (+x to the patient's left,
+y posterior, +z head)::

    affine @ [k, 0, 0, 1] == ImagePositionPatient of slice k
    affine @ [0, i, j, 1] == IPP + i * dy * column cosines + j * dx * row cosines

Slices are ordered by their position along the slice normal ``n = column cosines x row
cosines`` (highdicom's right-handed volume convention), never by InstanceNumber: slice k+1 lies
``dz`` mm further along ``n`` than slice k. For an axial series (IOP 1,0,0,0,1,0) ``n`` points to
the feet, so k runs head -> feet. ``spacing`` is ``(dz, dy, dx)`` mm.

Rejection reasons
-----------------
Each input instance ends up in exactly one volume or one rejection (``SeriesRejected.sources``
lists the instances a rejection accounts for). Checks run in the order of this table; the first
that fails names the series.

========================  ==========================================================================
reason                    what it means
========================  ==========================================================================
unreadable_instance       :func:`~medhier.io.dicom.read_dataset` rejects the instance (not DICOM,
                          corrupt header, truncated pixels); its own reason is in the message
no_series_uid             the instance has no SeriesInstanceUID, so it belongs to no series
duplicate_instance        a second instance with a SOPInstanceUID already seen in its series (an
                          archive copy): the first is used, each copy is rejected on its own
no_pixels                 an instance of the series has no pixel data (SR, KO, presentation state,
                          a header stripped of its image; an image header whose pixel data is
                          missing is io.dicom's ``corrupt_pixels``, so ``unreadable_instance``)
segmentation              the series is a segmentation (DICOM SEG): read it with :mod:`medhier.io.seg`
unsupported_pixels        colour or multi-sample pixels (SamplesPerPixel != 1): not a grey volume
mixed_sop_class           instances of different SOP classes in one series
mixed_patients            instances of different patients in one series
no_geometry               a slice lacks ImagePositionPatient, ImageOrientationPatient or
                          PixelSpacing (top level, or per frame in the functional groups), or they
                          are unusable (cosines not orthonormal, spacing not > 0)
mixed_frame_of_reference  slices in different FrameOfReferenceUIDs
mixed_orientation         slices with different ImageOrientationPatient (localizers, tri-plane
                          pilots, radial MIPs)
unequal_slice_size        slices with different Rows x Columns
mixed_pixel_spacing       slices with different PixelSpacing
single_slice              fewer slices than ``min_slices`` (2): no slice spacing to derive
duplicate_positions       two or more slices at one position along the normal (multi-echo,
                          multi-phase or repeated acquisitions in one series)
sheared_stack             slice positions drift in-plane, off the normal (gantry tilt) by more
                          than a tenth of a pixel
missing_positions         a gap: spacings are whole multiples of the smallest one (slices missing
                          from an otherwise regular stack)
inconsistent_spacing      the spacing along the normal varies by more than 1 % and is no multiple
                          of a common step
undecodable_slice         a slice's pixel data does not decode, or decodes to the wrong shape
non_finite                decoded values contain NaN or infinity
========================  ==========================================================================
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.spatial import get_normal_vector, get_volume_positions
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, pixel_array

from medhier.io.dicom import DicomRejected, patient_key, read_dataset
from medhier.io.rejection import Rejection

__all__ = [
    "REASONS",
    "SeriesRejected",
    "SeriesVolume",
    "SliceStack",
    "read_series",
    "stack_slices",
    "volume_from_datasets",
]

REASONS: dict[str, str] = {
    "unreadable_instance": "io.dicom.read_dataset rejects the instance (its reason is in the message)",
    "no_series_uid": "the instance has no SeriesInstanceUID",
    "duplicate_instance": "a second instance with a SOPInstanceUID already seen in the series",
    "no_pixels": "an instance of the series has no pixel data",
    "segmentation": "the series is a DICOM SEG: read it with medhier.io.seg",
    "unsupported_pixels": "colour or multi-sample pixels (SamplesPerPixel != 1)",
    "mixed_sop_class": "instances of different SOP classes in one series",
    "mixed_patients": "instances of different patients in one series",
    "no_geometry": "a slice lacks usable ImagePositionPatient, ImageOrientationPatient or PixelSpacing",
    "mixed_frame_of_reference": "slices in different FrameOfReferenceUIDs",
    "mixed_orientation": "slices with different ImageOrientationPatient",
    "unequal_slice_size": "slices with different Rows x Columns",
    "mixed_pixel_spacing": "slices with different PixelSpacing",
    "single_slice": "fewer slices than a volume needs",
    "duplicate_positions": "two or more slices at one position along the slice normal",
    "sheared_stack": "slice positions drift in-plane, off the slice normal (gantry tilt)",
    "missing_positions": "slices missing from an otherwise regular stack",
    "inconsistent_spacing": "irregular spacing along the slice normal",
    "undecodable_slice": "a slice's pixel data does not decode",
    "non_finite": "decoded values contain NaN or infinity",
}

SEG_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation Storage
}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# Tolerances, all of them geometric and documented in the table above.
ORIENTATION_ATOL = 1e-4  # direction cosines; also highdicom's orthogonality tolerance
PIXEL_SPACING_RTOL = 1e-3
SPACING_RTOL = 0.01  # highdicom's default for regular slice spacing
SHEAR_PIXELS = 0.1  # in-plane drift allowed, as a fraction of the smaller pixel spacing
DUPLICATE_FRACTION = 0.01  # slices closer than this fraction of the typical spacing coincide


class SeriesRejected(Rejection):
    """A series (or a lone instance) that does not form a volume. ``reason`` is a code from
    :data:`REASONS`; ``sources`` the instances this rejection accounts for."""

    reasons = REASONS

    def __init__(self, reason: str, message: str, *, series_uid: str = "", sources: Sequence[str] = ()):
        super().__init__(reason, message)
        self.series_uid = series_uid
        self.sources = tuple(sources)


@dataclass(frozen=True)
class SeriesVolume:
    """One series as a volume, with what a visit manifest needs.

    ``volume``: a :class:`highdicom.Volume`, float32 array ``(Z, Y, X)`` and an LPS affine (see
    the module docstring). ``sop_uids``, ``frame_numbers`` and ``sources`` have one entry per
    slice k, in slice order: the instance's SOPInstanceUID, the 1-based frame within it (1 for
    single-frame instances) and the path it came from ("" when none was given). Dates and times
    are DICOM strings (DA ``YYYYMMDD``, TM ``HHMMSS.FFFFFF``), "" when absent. ``patient_key`` is
    :func:`medhier.io.dicom.patient_key` of the PatientID: no raw identifier is kept.
    """

    volume: hd.Volume
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    sop_class_uid: str
    modality: str
    series_number: int | None
    series_description: str
    study_date: str
    study_time: str
    series_date: str
    series_time: str
    patient_key: str
    sop_uids: tuple[str, ...]
    frame_numbers: tuple[int, ...]
    sources: tuple[str, ...]

    @property
    def array(self) -> np.ndarray:
        """float32 (Z, Y, X)."""
        return self.volume.array

    @property
    def affine(self) -> np.ndarray:
        """4x4, voxel index (k, i, j, 1) -> LPS mm."""
        return self.volume.affine

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(dz, dy, dx) in mm."""
        return tuple(float(s) for s in self.volume.spacing)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.volume.spatial_shape


@dataclass(frozen=True)
class SliceStack:
    """The geometry of a series without its pixels: ``slices[k] = (dataset index, 1-based
    frame number)`` of slice k, and the highdicom geometry (spatial shape and affine)."""

    geometry: hd.VolumeGeometry
    slices: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class _Slice:
    index: int  # the dataset it comes from
    frame: int  # 1-based frame number in that dataset
    position: np.ndarray  # ImagePositionPatient, mm
    orientation: np.ndarray  # ImageOrientationPatient (6 cosines)
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    size: tuple[int, int]  # (Rows, Columns)
    frame_of_reference: str


# -- many instances ----------------------------------------------------------------------------


def read_series(
    instances: Iterable[tuple[str, bytes]], *, patient_salt: str = "", min_slices: int = 2
) -> Iterator[SeriesVolume | SeriesRejected]:
    """``(source, bytes)`` pairs -> one :class:`SeriesVolume` or one :class:`SeriesRejected`
    per series (in order of first appearance), plus one rejection per instance that belongs to
    no series. Every instance is accounted for exactly once.

    All instances are held in memory until their series is built: pass one study (or one
    patient) at a time, not a whole archive.
    """
    groups: dict[str, list[tuple[str, Dataset]]] = {}
    seen: dict[str, dict[str, str]] = {}
    for source, data in instances:
        try:
            ds = read_dataset(data, source=source, pixels=True)
        except DicomRejected as exc:
            yield SeriesRejected("unreadable_instance", str(exc), sources=(source,))
            continue
        series_uid = _text(ds, "SeriesInstanceUID")
        if not series_uid:
            yield SeriesRejected(
                "no_series_uid", f"{source or 'instance'} ({_sop_name(ds)}) has no SeriesInstanceUID", sources=(source,)
            )
            continue
        sop_uid = _text(ds, "SOPInstanceUID")
        first = seen.setdefault(series_uid, {}).get(sop_uid) if sop_uid else None
        if first is not None:
            yield SeriesRejected(
                "duplicate_instance",
                f"{source or 'instance'}: SOPInstanceUID {sop_uid} already read from {first or 'an earlier instance'} "
                f"in series {series_uid}; the first copy is used",
                series_uid=series_uid,
                sources=(source,),
            )
            continue
        if sop_uid:
            seen[series_uid][sop_uid] = source
        groups.setdefault(series_uid, []).append((source, ds))
    for series_uid, members in groups.items():
        sources = [s for s, _ in members]
        try:
            yield volume_from_datasets([d for _, d in members], sources, patient_salt=patient_salt, min_slices=min_slices)
        except SeriesRejected as exc:
            yield exc


# -- one series --------------------------------------------------------------------------------


def volume_from_datasets(
    datasets: Sequence[Dataset], sources: Sequence[str] = (), *, patient_salt: str = "", min_slices: int = 2
) -> SeriesVolume:
    """The datasets of one series (with their pixel data, any order) -> its volume.

    ``sources``: a name per dataset for messages and the manifest (e.g. its path).
    Raises :class:`SeriesRejected`.
    """
    sources = _sources(datasets, sources)
    stack = stack_slices(datasets, sources, min_slices=min_slices)
    series_uid = _text(datasets[0], "SeriesInstanceUID")
    array = _decode(datasets, sources, stack.slices, series_uid)
    if not np.isfinite(array).all():
        bad = sorted({k for k in np.argwhere(~np.isfinite(array))[:, 0].tolist()})
        raise SeriesRejected(
            "non_finite",
            f"{_name(series_uid, sources)}: slice(s) {bad[:5]} contain NaN or infinity",
            series_uid=series_uid,
            sources=sources,
        )
    first = datasets[0]
    volume = stack.geometry.with_array(array)
    return SeriesVolume(
        volume=volume,
        series_uid=series_uid,
        study_uid=_text(first, "StudyInstanceUID"),
        frame_of_reference_uid=_text(first, "FrameOfReferenceUID"),
        sop_class_uid=_text(first, "SOPClassUID"),
        modality=_text(first, "Modality").upper(),
        series_number=_int(first, "SeriesNumber", None),
        series_description=_text(first, "SeriesDescription"),
        study_date=_text(first, "StudyDate"),
        study_time=_text(first, "StudyTime"),
        series_date=_text(first, "SeriesDate"),
        series_time=_text(first, "SeriesTime"),
        patient_key=patient_key(_text(first, "PatientID"), _text(first, "IssuerOfPatientID"), patient_salt),
        sop_uids=tuple(_text(datasets[i], "SOPInstanceUID") for i, _ in stack.slices),
        frame_numbers=tuple(f for _, f in stack.slices),
        sources=tuple(sources[i] for i, _ in stack.slices),
    )


def stack_slices(
    datasets: Sequence[Dataset], sources: Sequence[str] = (), *, min_slices: int = 2, pixels: bool = True
) -> SliceStack:
    """The slice order and geometry of one series from its headers. Runs every check of the
    reasons table except decoding; ``pixels=False`` also skips ``no_pixels`` (headers read
    without their pixel data). Raises :class:`SeriesRejected`.
    """
    if not datasets:
        raise ValueError("stack_slices: no datasets")
    with warnings.catch_warnings():
        # pydicom warns about every odd value in old files; what matters is raised as a reason
        warnings.simplefilter("ignore")
        return _stack(datasets, _sources(datasets, sources), min_slices, pixels)


def _stack(datasets: Sequence[Dataset], sources: tuple[str, ...], min_slices: int, pixels: bool) -> SliceStack:
    series_uid = _text(datasets[0], "SeriesInstanceUID")
    name = _name(series_uid, sources)

    def reject(reason: str, problem: str) -> SeriesRejected:
        return SeriesRejected(reason, f"{name}: {problem}", series_uid=series_uid, sources=sources)

    _check_instances(datasets, sources, reject, pixels)
    slices = [s for i, ds in enumerate(datasets) for s in _slices_of(ds, i, sources[i], reject)]
    first = slices[0]
    for attribute, values, reason in (
        ("FrameOfReferenceUID", [s.frame_of_reference for s in slices], "mixed_frame_of_reference"),
        ("Rows x Columns", [s.size for s in slices], "unequal_slice_size"),
    ):
        if len(set(values)) > 1:
            raise reject(reason, f"{attribute} differs between slices: {_some(values)}")
    odd = [s for s in slices if not np.allclose(s.orientation, first.orientation, atol=ORIENTATION_ATOL)]
    if odd:
        raise reject(
            "mixed_orientation",
            f"ImageOrientationPatient differs between slices: {_cosines(first.orientation)} ({_where(first, sources)}) "
            f"and {_cosines(odd[0].orientation)} ({_where(odd[0], sources)}); "
            f"{len(odd)} of {len(slices)} slices differ from the first",
        )
    odd = [s for s in slices if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=PIXEL_SPACING_RTOL, atol=0)]
    if odd:
        raise reject(
            "mixed_pixel_spacing",
            f"PixelSpacing differs between slices: {list(first.pixel_spacing)} and "
            f"{list(odd[0].pixel_spacing)} mm ({_where(odd[0], sources)})",
        )
    if len(slices) < min_slices:
        raise reject("single_slice", f"{len(slices)} slice(s); a volume needs at least {min_slices}")

    positions = np.array([s.position for s in slices])
    normal = get_normal_vector(first.orientation, index_convention=hd.spatial.VOLUME_INDEX_CONVENTION)
    _check_positions(positions, normal, first.pixel_spacing, slices, sources, reject)
    spacing, order = get_volume_positions(
        positions, first.orientation, rtol=SPACING_RTOL, index_convention=hd.spatial.VOLUME_INDEX_CONVENTION
    )
    if spacing is None:
        raise _diagnose_spacing(positions @ normal, slices, sources, reject)
    ordered = [slices[i] for i in np.argsort(order)]
    try:
        geometry = hd.VolumeGeometry.from_attributes(
            image_position=ordered[0].position,
            image_orientation=first.orientation,
            rows=first.size[0],
            columns=first.size[1],
            pixel_spacing=first.pixel_spacing,
            spacing_between_slices=spacing,
            number_of_frames=len(ordered),
            coordinate_system="PATIENT",
            frame_of_reference_uid=first.frame_of_reference or None,
        )
    except ValueError as exc:  # highdicom's own orthogonality check, stricter in corner cases
        raise reject("no_geometry", f"highdicom cannot build an affine: {exc}") from None
    return SliceStack(geometry=geometry, slices=tuple((s.index, s.frame) for s in ordered))


# -- checks ------------------------------------------------------------------------------------


def _check_instances(datasets: Sequence[Dataset], sources: Sequence[str], reject, pixels: bool) -> None:
    for ds, source in zip(datasets, sources):
        if _text(ds, "SOPClassUID") in SEG_SOP_CLASSES:
            raise reject("segmentation", f"{source or 'an instance'} is a segmentation (SEG); read it with medhier.io.seg")
    for ds, source in zip(datasets, sources):
        if pixels and not any(k in ds for k in _PIXEL_KEYWORDS):
            kind = _text(ds, "Modality") or "unknown modality"
            raise reject("no_pixels", f"{source or 'an instance'} has no pixel data ({kind}, {_sop_name(ds)})")
    for ds, source in zip(datasets, sources):
        samples = _int(ds, "SamplesPerPixel", 1)
        if samples != 1:
            raise reject(
                "unsupported_pixels",
                f"{source or 'an instance'}: SamplesPerPixel={samples} "
                f"({_text(ds, 'PhotometricInterpretation')}); a volume needs grey pixels",
            )
    for keyword, reason in (("SOPClassUID", "mixed_sop_class"), ("PatientID", "mixed_patients")):
        values = [_text(ds, keyword) for ds in datasets]
        if len(set(values)) > 1:
            other = next(i for i, v in enumerate(values) if v != values[0])
            shown = (
                f"{_sop_name(datasets[0])} and {_sop_name(datasets[other])}"
                if keyword == "SOPClassUID"
                else "two PatientIDs"  # raw identifiers never leave io.dicom
            )
            between = f"{sources[0] or 'first'} vs {sources[other] or 'another'}"
            raise reject(reason, f"{keyword} differs between instances: {shown} ({between})")


def _slices_of(ds: Dataset, index: int, source: str, reject) -> list[_Slice]:
    """One _Slice per frame, with its geometry from the top level (single-frame images) or
    from the functional groups (enhanced multi-frame images)."""
    where = source or f"instance {index}"
    n_frames = _int(ds, "NumberOfFrames", 1)
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    multi = n_frames > 1 or bool(per_frame)
    size = (_int(ds, "Rows", 0), _int(ds, "Columns", 0))
    if min(size) <= 0:
        raise reject("no_geometry", f"{where}: Rows x Columns = {size[0]} x {size[1]}")
    frame_of_reference = _text(ds, "FrameOfReferenceUID")
    out = []
    for frame in range(1, n_frames + 1):
        groups = []
        if multi:
            if per_frame and len(per_frame) >= frame:
                groups.append(per_frame[frame - 1])
            if shared:
                groups.append(shared[0])
        label = f"{where} frame {frame}" if multi else where
        position = _attribute(ds, groups, "PlanePositionSequence", "ImagePositionPatient", 3, label, reject)
        orientation = _attribute(ds, groups, "PlaneOrientationSequence", "ImageOrientationPatient", 6, label, reject)
        spacing = _attribute(ds, groups, "PixelMeasuresSequence", "PixelSpacing", 2, label, reject)
        row, col = orientation[:3], orientation[3:]
        if (
            abs(np.linalg.norm(row) - 1) > ORIENTATION_ATOL * 10
            or abs(np.linalg.norm(col) - 1) > ORIENTATION_ATOL * 10
            or abs(row @ col) > ORIENTATION_ATOL
        ):
            raise reject(
                "no_geometry", f"{label}: ImageOrientationPatient {_cosines(orientation)} is not two orthonormal vectors"
            )
        if not (spacing > 0).all():
            raise reject("no_geometry", f"{label}: PixelSpacing {list(spacing)} is not > 0")
        out.append(
            _Slice(index, frame, position, orientation, (float(spacing[0]), float(spacing[1])), size, frame_of_reference)
        )
    return out


def _attribute(ds: Dataset, groups: list[Dataset], sequence: str, keyword: str, n: int, label: str, reject) -> np.ndarray:
    """A geometry attribute from the first functional group that has it, else the top level."""
    value = None
    try:
        for group in groups:
            item = group.get(sequence)
            if item and keyword in item[0]:
                value = item[0].get(keyword)
                break
        if value is None:
            value = ds.get(keyword)
    except (TypeError, ValueError) as exc:  # pydicom converts DS values on access
        raise reject("no_geometry", f"{label}: {keyword} is not numeric ({exc})") from None
    if value is None or value == "":
        raise reject("no_geometry", f"{label} has no {keyword}")
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    try:
        array = np.array([float(v) for v in values])
    except (TypeError, ValueError):
        raise reject("no_geometry", f"{label}: {keyword} {value!r} is not numeric") from None
    if array.shape != (n,) or not np.isfinite(array).all():
        raise reject("no_geometry", f"{label}: {keyword} {list(array)} needs {n} finite values")
    return array


def _check_positions(positions: np.ndarray, normal: np.ndarray, pixel_spacing, slices, sources, reject) -> None:
    distances = positions @ normal
    order = np.argsort(distances, kind="stable")
    steps = np.diff(distances[order])
    positive = steps[steps > 1e-6]
    typical = float(np.median(positive)) if positive.size else 0.0
    coincide = steps <= max(DUPLICATE_FRACTION * typical, 1e-4)
    if coincide.any():
        k = int(np.argmax(coincide))
        a, b = slices[order[k]], slices[order[k + 1]]
        raise reject(
            "duplicate_positions",
            f"{int(coincide.sum())} slice(s) share a position along the normal with another, e.g. "
            f"{_where(a, sources)} and {_where(b, sources)} at {distances[order[k]]:.3f} mm "
            "(several echoes, phases or repeats in one series?)",
        )
    # In-plane drift of each slice from the line through the first one along the normal.
    offsets = positions - positions[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    drift = np.linalg.norm(in_plane, axis=1)
    limit = SHEAR_PIXELS * min(pixel_spacing)
    if drift.max() > limit:
        k = int(np.argmax(drift))
        span = abs(float(offsets[k] @ normal))
        angle = math.degrees(math.atan2(drift[k], span)) if span else 90.0
        raise reject(
            "sheared_stack",
            f"slice positions drift {drift[k]:.3f} mm in-plane over {span:.2f} mm along the normal "
            f"({angle:.2f} degrees, gantry tilt?) at {_where(slices[k], sources)}; allowed {limit:.3f} mm",
        )


def _diagnose_spacing(distances: np.ndarray, slices, sources, reject) -> SeriesRejected:
    """highdicom found no regular stack: say whether slices are missing or the spacing is
    simply irregular."""
    order = np.argsort(distances, kind="stable")
    steps = np.diff(distances[order])
    step = float(steps.min())
    multiples = steps / step
    whole = np.abs(multiples - np.round(multiples)) <= SPACING_RTOL * np.maximum(np.round(multiples), 1)
    if whole.all() and (np.round(multiples) > 1).any():
        gaps = [(k, int(round(m)) - 1) for k, m in enumerate(multiples) if round(m) > 1]
        missing = sum(n for _, n in gaps)
        shown = "; ".join(
            f"{n} between {_where(slices[order[k]], sources)} and {_where(slices[order[k + 1]], sources)}" for k, n in gaps[:3]
        )
        return reject("missing_positions", f"{missing} slice(s) missing from a regular {step:.3f} mm stack ({shown})")
    if np.allclose(steps, steps.mean(), rtol=SPACING_RTOL, atol=0):
        return reject("sheared_stack", "highdicom finds the slices off the slice normal")
    return reject(
        "inconsistent_spacing",
        f"slice spacing along the normal varies from {steps.min():.3f} to {steps.max():.3f} mm "
        f"(allowed {SPACING_RTOL:.0%}) and is no whole multiple of one step",
    )


# -- pixels ------------------------------------------------------------------------------------


def _decode(datasets: Sequence[Dataset], sources: Sequence[str], slices, series_uid: str) -> np.ndarray:
    """Stored values -> modality LUT / rescale -> float32 (Z, Y, X), one frame at a time
    (pydicom's ``pixel_array`` with an index: nothing cached on the datasets)."""
    rows, cols = _int(datasets[0], "Rows", 0), _int(datasets[0], "Columns", 0)
    out = np.empty((len(slices), rows, cols), dtype=np.float32)

    def reject(where: str, problem: str) -> SeriesRejected:
        return SeriesRejected(
            "undecodable_slice", f"{_name(series_uid, sources)}: {where}: {problem}", series_uid=series_uid, sources=sources
        )

    for k, (index, frame) in enumerate(slices):
        ds = datasets[index]
        multi = _is_multi(ds)
        where = (sources[index] or f"instance {index}") + (f" frame {frame}" if multi else "")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # odd values are normal in archives; failures raise
                stored = pixel_array(ds, index=frame - 1 if multi else None)
        except Exception as exc:  # every decoder failure is a property of this file's pixels
            raise reject(where, f"{type(exc).__name__}: {exc}") from None
        if stored.shape != (rows, cols):
            raise reject(where, f"decodes to {stored.shape}, not {rows} x {cols}")
        try:
            out[k] = apply_modality_lut(stored, _rescale_view(ds, frame))
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
            # pydicom's LUT functions reject malformed rescale or LUT attributes this way
            raise reject(where, f"modality LUT: {type(exc).__name__}: {exc}") from None
    return out


def _rescale_view(ds: Dataset, frame: int) -> Dataset:
    """pydicom's apply_modality_lut reads the top level; enhanced objects keep the rescale per
    frame (PixelValueTransformationSequence): lift the frame's into a small dataset."""
    if not _is_multi(ds):
        return ds
    view = Dataset()
    for keyword in ("RescaleSlope", "RescaleIntercept", "ModalityLUTSequence", "BitsStored", "PixelRepresentation"):
        if keyword in ds:
            view[keyword] = ds[keyword]
    groups = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    if per_frame and len(per_frame) >= frame:
        groups.append(per_frame[frame - 1])  # per-frame values override shared ones
    for group in groups:
        item = group.get("PixelValueTransformationSequence")
        if item:
            for keyword in ("RescaleSlope", "RescaleIntercept"):
                if keyword in item[0]:
                    view[keyword] = item[0][keyword]
    return view


# -- small helpers -----------------------------------------------------------------------------


def _is_multi(ds: Dataset) -> bool:
    return _int(ds, "NumberOfFrames", 1) > 1 or bool(ds.get("PerFrameFunctionalGroupsSequence"))


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed value reads as absent
        return ""
    return "" if value is None else str(value).strip()


def _int(ds: Dataset, keyword: str, default: int | None) -> int | None:
    try:
        value = ds.get(keyword)
        return default if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return default


def _sources(datasets: Sequence[Dataset], sources: Sequence[str]) -> tuple[str, ...]:
    if not sources:
        return tuple("" for _ in datasets)
    if len(sources) != len(datasets):
        raise ValueError(f"{len(sources)} sources for {len(datasets)} datasets")
    return tuple(sources)


def _name(series_uid: str, sources: Sequence[str]) -> str:
    named = [s for s in sources if s]
    example = f", e.g. {named[0]}" if named else ""
    return f"series {series_uid or '(no UID)'} ({len(sources)} instance(s){example})"


def _where(s: _Slice, sources: Sequence[str]) -> str:
    base = sources[s.index] or f"instance {s.index}"
    return f"{base} frame {s.frame}" if s.frame > 1 else base


def _some(values: list) -> str:
    distinct = list(dict.fromkeys(values))
    return ", ".join(str(v) for v in distinct[:3]) + (" ..." if len(distinct) > 3 else "")


def _cosines(orientation: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in orientation) + "]"


def _sop_name(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID")
    return getattr(uid, "name", None) or str(uid or "no SOP class")
