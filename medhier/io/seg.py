"""Segmentations onto a reference volume's grid: DICOM SEG and NIfTI label maps in, DICOM SEG out.

This module imports neither Ray nor torch, nor any task: the label names, their voxel values and
the patterns that recognise them come in as plain data (:class:`LabelMapping`); the plaque task
builds its mapping from ``medhier.plaque.labels`` and ``PlaqueConfig.seg_labels``.

Output grid
-----------
Every reader returns a :class:`Labels` whose ``array`` is uint8 ``(Z, Y, X)`` on the grid of the
reference :class:`~medhier.io.volume.SeriesVolume` (same shape, same affine; see
:mod:`medhier.io.volume` for the index order and the LPS affine), 0 = background.

* A DICOM SEG whose frames reference the reference's instances one to one (same rows and
  columns) is read by source instance (highdicom ``get_pixels_by_source_instance``): no geometry
  involved.
* Otherwise its frames become a highdicom ``Volume`` (``Segmentation.get_volume``). If that
  grid is the reference's lattice up to axis order, flips, padding and cropping (a SEG that
  omits empty frames, or stores rows and columns swapped), highdicom's ``match_geometry`` places
  it voxel for voxel; any other grid (finer, shifted by a fraction of a voxel, rotated) is
  resampled by nearest neighbour (scipy ``affine_transform``, order 0, through highdicom's
  ``VolumeToVolumeTransformer``) and ``Labels.resampled`` is true. Foreground voxels that fall
  outside the reference grid are counted in ``Labels.outside``.
* FRACTIONAL segments are thresholded at 0.5.
* A NIfTI image is RAS (x to the patient's right, y anterior), DICOM LPS: highdicom's
  ``Volume.from_nibabel`` converts the affine, then the NIfTI is mapped as above. A NIfTI
  carries no frame of reference: it is taken to be in the reference series' patient space.

SEG mapping rule
----------------
``LabelMapping.patterns`` maps a label name to case-insensitive glob patterns (``fnmatch``). A
segment is claimed by the first label (in the mapping's order) with a pattern matching its
SegmentLabel; only if no label matches that, its segmented property type is tried (code
meaning, then ``SCHEME:VALUE``, e.g. ``SCT:67170007``). Unclaimed segments are reported in
``Labels.unmapped`` (segment number -> its label), never painted and never silently dropped.

Segments are painted in the mapping's order, each over the ones before, so overlapping regions
flatten as the mapping lists them: list the enclosing regions first. The plaque default
(``PlaqueConfig.seg_labels``): ``outer_wall`` (painted with the ``wall`` value) < ``lumen`` <
``lipid_core``, ``haemorrhage``, ``calcification``, ``fibrous_cap``: an outer-wall region that
contains the lumen and the components ends up as wall only where nothing else is.

Rejection reasons
-----------------
=========================  =========================================================================
reason                     what it means
=========================  =========================================================================
unreadable                 :func:`~medhier.io.dicom.read_dataset` rejects the object, or highdicom
                           (nibabel) cannot parse it as a segmentation (NIfTI image)
not_a_seg                  a DICOM object of another SOP class than (Label Map) Segmentation Storage
other_series               the SEG references another series than the reference volume's (or none)
other_frame_of_reference   the SEG lies in another frame of reference than the reference volume
not_a_volume               the SEG's frames neither reference the reference's instances one to one
                           nor form a regularly spaced volume highdicom can place
not_labels                 a NIfTI image that is not 3-D or holds non-integer values
=========================  =========================================================================

Writing
-------
:func:`write_seg` writes a label map as a BINARY DICOM SEG with one segment per label value
present, on the reference series (frame references by position, through highdicom's
``Segmentation`` from a ``Volume``), with UIDs derived from the caller's entropy and every date
and time set to the caller's ``created``: the same input gives the same bytes. (highdicom stamps
the clock into InstanceCreation-, Content- and ContributionDateTime and draws a random
DimensionOrganizationUID; ``write_seg`` sets them afterwards on the dataset, through pydicom's
public API.) A segment without a coded property gets SNOMED CT "Tissue" as category and type, 3D
Slicer's default for an unspecified segment.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import gzip
import io
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import highdicom as hd
import nibabel
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from scipy import ndimage

from medhier.io.dicom import DicomRejected, read_dataset
from medhier.io.rejection import Rejection
from medhier.io.volume import SEG_SOP_CLASSES, SeriesVolume, stack_slices

__all__ = [
    "REASONS",
    "TISSUE",
    "LabelMapping",
    "Labels",
    "SegRejected",
    "SegmentSpec",
    "header_bytes",
    "read_nifti_labels",
    "read_seg",
    "write_seg",
]

REASONS: dict[str, str] = {
    "unreadable": "the object cannot be read as a segmentation",
    "not_a_seg": "a DICOM object that is not a Segmentation",
    "other_series": "the SEG references another series than the reference volume's",
    "other_frame_of_reference": "the SEG lies in another frame of reference than the reference volume",
    "not_a_volume": "the SEG's frames cannot be placed on the reference grid",
    "not_labels": "a NIfTI image that is not a 3-D integer label map",
}

TISSUE = codes.SCT.Tissue  # 85756007, category and type of a segment without a coded property
FRACTIONAL_THRESHOLD = 0.5


class SegRejected(Rejection):
    """A segmentation that cannot be mapped onto the reference. ``reason``: a code from
    :data:`REASONS`; ``source``: the object's name."""

    reasons = REASONS

    def __init__(self, reason: str, message: str, *, source: str = ""):
        super().__init__(reason, message)
        self.source = source


@dataclass(frozen=True)
class LabelMapping:
    """Label names -> voxel values, and the glob patterns that recognise each label in a SEG.

    ``values``: name -> value in the output label map (1..255). ``patterns``: name -> patterns,
    in paint order (see the module docstring); every name in it must be in ``values``.
    """

    values: Mapping[str, int]
    patterns: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def __post_init__(self):
        for name, value in self.values.items():
            if not isinstance(value, int) or not 1 <= value <= 255:
                raise ValueError(f"LabelMapping.values[{name!r}] = {value!r}: need an integer in 1..255 (0 is background)")
        for name, patterns in self.patterns.items():
            if name not in self.values:
                raise ValueError(
                    f"LabelMapping.patterns names {name!r}, which has no value in LabelMapping.values {sorted(self.values)}"
                )
            if isinstance(patterns, str) or not patterns or not all(isinstance(p, str) and p for p in patterns):
                raise ValueError(f"LabelMapping.patterns[{name!r}]: need a list of non-empty glob patterns, got {patterns!r}")

    def name_for(self, *candidates: str) -> str | None:
        """The label claiming a segment described by ``candidates`` (most telling first)."""
        for text in candidates:
            if not text:
                continue
            for name, patterns in self.patterns.items():
                if any(fnmatch.fnmatchcase(text.lower(), p.lower()) for p in patterns):
                    return name
        return None


@dataclass(frozen=True)
class Labels:
    """A label map on the reference grid. ``array``: uint8 (Z, Y, X). ``mapped``: segment
    number (NIfTI: value) -> label name painted; ``unmapped``: segment number (value) -> its
    description, not painted; ``resampled``: the source grid is not the reference's lattice, so
    it was resampled by nearest neighbour (false for the same lattice in another axis order,
    flipped, padded or cropped); ``outside``: source foreground voxels outside the reference grid."""

    array: np.ndarray
    mapped: dict[int, str]
    unmapped: dict[int, str]
    resampled: bool
    outside: int


@dataclass(frozen=True)
class SegmentSpec:
    """How :func:`write_seg` describes one label value: SegmentLabel and coded property
    (SNOMED CT / DCM codes; None -> :data:`TISSUE`)."""

    label: str
    property_type: Code | None = None
    property_category: Code | None = None


# -- reading DICOM SEG -------------------------------------------------------------------------


def read_seg(data: bytes, reference: SeriesVolume, mapping: LabelMapping, *, source: str = "") -> Labels:
    """A DICOM SEG (bytes) -> :class:`Labels` on ``reference``'s grid, segments mapped and
    flattened as the module docstring says. Raises :class:`SegRejected`."""
    name = source or "SEG"
    try:
        ds = read_dataset(data, source=name)
    except DicomRejected as exc:
        raise SegRejected("unreadable", str(exc), source=source) from None
    if str(ds.get("SOPClassUID", "")) not in SEG_SOP_CLASSES:
        sop = getattr(ds.get("SOPClassUID"), "name", None) or str(ds.get("SOPClassUID", "no SOP class"))
        raise SegRejected("not_a_seg", f"{name} is a {sop}, not a Segmentation", source=source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    except Exception as exc:  # highdicom's parser raises many types on malformed objects
        raise SegRejected("unreadable", f"{name}: highdicom cannot read it: {type(exc).__name__}: {exc}", source=source) from None
    _check_reference(seg, reference, name, source)

    numbers = list(seg.segment_numbers)
    mapped, unmapped = {}, {}
    for number in numbers:
        description = seg.get_segment_description(number)
        label = str(description.segment_label or "")
        prop = description.segmented_property_type
        claimed = mapping.name_for(label, str(prop.meaning), f"{prop.scheme_designator}:{prop.value}")
        if claimed is None:
            unmapped[number] = label or str(prop.meaning)
        else:
            mapped[number] = claimed

    masks, resampled, outside = _seg_masks(seg, numbers, reference, name, source)
    array = np.zeros(reference.shape, dtype=np.uint8)
    for label_name in mapping.patterns:  # paint order
        for s, number in enumerate(numbers):
            if mapped.get(number) == label_name:
                array[masks[..., s]] = mapping.values[label_name]
    return Labels(array=array, mapped=mapped, unmapped=unmapped, resampled=resampled, outside=outside)


def _check_reference(seg, reference: SeriesVolume, name: str, source: str) -> None:
    referenced = [str(item.get("SeriesInstanceUID", "")) for item in seg.get("ReferencedSeriesSequence") or []]
    if reference.series_uid not in referenced:
        which = ", ".join(referenced) if referenced else "no series at all (no ReferencedSeriesSequence)"
        raise SegRejected(
            "other_series",
            f"{name} references {which}, not the reference series {reference.series_uid} ({reference.series_description!r})",
            source=source,
        )
    seg_frame = str(seg.get("FrameOfReferenceUID", ""))
    if seg_frame and reference.frame_of_reference_uid and seg_frame != reference.frame_of_reference_uid:
        raise SegRejected(
            "other_frame_of_reference",
            f"{name} is in frame of reference {seg_frame}, the reference series in {reference.frame_of_reference_uid}",
            source=source,
        )


def _seg_masks(seg, numbers: list[int], reference: SeriesVolume, name: str, source: str) -> tuple[np.ndarray, bool, int]:
    """-> (bool (Z, Y, X, n segments) on the reference grid, resampled, voxels outside)."""
    by_source = _by_source_instance(seg, numbers, reference)
    if by_source is not None:
        return by_source, False, 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            volume = seg.get_volume(segment_numbers=numbers, combine_segments=False, allow_missing_positions=True)
    except Exception as exc:  # highdicom says why the frames form no volume in many ways
        raise SegRejected(
            "not_a_volume",
            f"{name}: its frames do not reference the reference series' instances one to one and "
            f"form no regular volume: {type(exc).__name__}: {exc}",
            source=source,
        ) from None
    return _onto(_foreground(volume.array, seg), volume.get_geometry(), reference)


def _by_source_instance(seg, numbers: list[int], reference: SeriesVolume) -> np.ndarray | None:
    """The segments per source instance, when every SEG frame references one instance of the
    reference and has its rows and columns; else None (the caller places the frames by
    geometry). Guarded: if any foreground is not returned this way, None."""
    if len(set(reference.sop_uids)) != len(reference.sop_uids):
        return None  # a multi-frame reference: placed by geometry
    if (int(seg.Rows), int(seg.Columns)) != reference.shape[1:]:
        return None
    wanted = set(reference.sop_uids)
    for group in seg.get("PerFrameFunctionalGroupsSequence") or []:
        refs = [
            str(src.get("ReferencedSOPInstanceUID", ""))
            for derivation in group.get("DerivationImageSequence") or []
            for src in derivation.get("SourceImageSequence") or []
        ]
        if len(refs) != 1 or refs[0] not in wanted:
            return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=list(reference.sop_uids),
                segment_numbers=numbers,
                assert_missing_frames_are_empty=True,
            )
    except (ValueError, KeyError, RuntimeError):
        return None
    masks = _foreground(pixels, seg)
    stored = seg.pixel_array  # every frame of every segment: the guard against a silent drop
    if np.count_nonzero(masks) != np.count_nonzero(_foreground(stored, seg, raw=True)):
        return None
    return masks


def _foreground(array: np.ndarray, seg, raw: bool = False) -> np.ndarray:
    if seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL:
        scale = float(seg.MaximumFractionalValue) if raw else 1.0
        return array >= FRACTIONAL_THRESHOLD * scale
    return array > 0


# -- reading NIfTI -----------------------------------------------------------------------------


def read_nifti_labels(
    data: bytes, reference: SeriesVolume, table: Mapping[int, str], values: Mapping[str, int], *, source: str = ""
) -> Labels:
    """A NIfTI-1/2 label image (bytes, gzip or not) -> :class:`Labels` on ``reference``'s grid.

    ``table``: NIfTI value -> label name; ``values``: label name -> output value. Values present
    in the image but not in ``table`` are reported in ``Labels.unmapped``. Raises :class:`SegRejected`.
    """
    name = source or "NIfTI"
    missing = sorted({n for n in table.values() if n not in values})
    if missing:
        raise ValueError(f"read_nifti_labels: table names {missing} have no value in {sorted(values)}")
    try:
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    except (OSError, EOFError) as exc:
        raise SegRejected("unreadable", f"{name}: broken gzip stream: {exc}", source=source) from None
    # sizeof_hdr, the first int32 (either byte order), says which NIfTI it is
    kinds = {348: nibabel.Nifti1Image, 540: nibabel.Nifti2Image}
    kind = next((kinds[n] for n in (int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")) if n in kinds), None)
    if kind is None:
        raise SegRejected("unreadable", f"{name}: no NIfTI-1 or NIfTI-2 header (sizeof_hdr {raw[:4].hex()})", source=source)
    try:
        image = kind.from_bytes(raw)
        array = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel raises several types for broken headers and short data
        raise SegRejected("unreadable", f"{name}: nibabel cannot read it: {type(exc).__name__}: {exc}", source=source) from None
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise SegRejected("not_labels", f"{name}: shape {array.shape}, a label map needs 3 dimensions", source=source)
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise SegRejected(
            "not_labels", f"{name}: non-integer values (a probability map?), a label map needs integers", source=source
        )
    array = array.astype(np.int64)
    try:
        geometry = hd.VolumeGeometry(
            affine=image.affine,
            spatial_shape=array.shape,
            coordinate_system="PATIENT",
            frame_of_reference_uid=reference.frame_of_reference_uid or None,
            from_reference_convention="RAS",
        )
    except ValueError as exc:  # a sheared or singular affine
        raise SegRejected("unreadable", f"{name}: its affine is not a rotation with scaling: {exc}", source=source) from None
    present = [int(v) for v in np.unique(array) if v != 0]
    mapped = {v: table[v] for v in present if v in table}
    unmapped = {v: f"value {v}" for v in present if v not in table}
    onehot = np.stack([array == v for v in mapped], axis=-1) if mapped else np.zeros((*array.shape, 0), dtype=bool)
    masks, resampled, outside = _onto(onehot, geometry, reference)
    out = np.zeros(reference.shape, dtype=np.uint8)
    for s, v in enumerate(mapped):
        out[masks[..., s]] = values[mapped[v]]
    return Labels(array=out, mapped=mapped, unmapped=unmapped, resampled=resampled, outside=outside)


# -- onto the reference grid -------------------------------------------------------------------


def _onto(array: np.ndarray, geometry: hd.VolumeGeometry, reference: SeriesVolume) -> tuple[np.ndarray, bool, int]:
    """Bool (Z', Y', X', S) on ``geometry``'s grid -> bool (Z, Y, X, S) on the reference grid;
    -> (masks, resampled, source foreground voxels outside the reference grid).

    A grid that is the reference's up to axis order, flips, padding and cropping is matched
    voxel for voxel (highdicom ``match_geometry``); any other is resampled by nearest neighbour.
    """
    outside = _outside(array, geometry, reference)
    n = array.shape[-1]
    if n == 0:
        return np.zeros((*reference.shape, 0), dtype=bool), not geometry.geometry_equal(reference.volume, tol=1e-4), outside
    if np.allclose(sorted(geometry.spacing), sorted(reference.spacing), rtol=1e-4):
        volume = geometry.with_array(array.astype(np.uint8), channels={"SegmentNumber": list(range(1, n + 1))})
        try:
            matched = volume.match_geometry(reference.volume, tol=1e-3)
        except RuntimeError:
            matched = None  # not the same lattice: resample
        # match_geometry is trusted only where it demonstrably lands on the reference grid
        if matched is not None and matched.geometry_equal(reference.volume, tol=1e-3):
            return matched.array.astype(bool), False, outside
    to_source = hd.VolumeToVolumeTransformer(reference.volume, geometry).affine  # reference index -> source index
    out = np.zeros((*reference.shape, n), dtype=bool)
    for s in range(n):
        # grid-constant: a voxel covers +-0.5 around its centre, so an index a hair outside
        # [0, n-1] (rounding) still finds its voxel instead of the fill value
        out[..., s] = ndimage.affine_transform(
            array[..., s].astype(np.uint8),
            to_source[:3, :3],
            offset=to_source[:3, 3],
            output_shape=reference.shape,
            order=0,
            mode="grid-constant",
            cval=0,
        ).astype(bool)
    return out, True, outside


def _outside(array: np.ndarray, geometry: hd.VolumeGeometry, reference: SeriesVolume) -> int:
    """Foreground voxels of ``array`` whose centres fall outside the reference grid."""
    foreground = np.argwhere(array.any(axis=-1)) if array.shape[-1] else np.zeros((0, 3), int)
    if not foreground.size:
        return 0
    at = hd.VolumeToVolumeTransformer(geometry, reference.volume, round_output=True)(foreground)
    inside = ((at >= 0) & (at < np.array(reference.shape))).all(axis=1)
    return int((~inside).sum())


# -- writing -----------------------------------------------------------------------------------


def header_bytes(data: bytes, *, source: str = "") -> bytes:
    """A DICOM object (bytes) without its pixel data, as DICOM bytes: all :func:`write_seg` needs
    of a reference instance, a few kilobytes instead of the whole image, so that a pipeline can
    carry a series' headers from the stage that read it to the one that writes its SEG.
    Raises :class:`~medhier.io.dicom.DicomRejected`."""
    ds = read_dataset(data, source=source, pixels=False)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds)  # as it was read: preamble and file meta where it had them
    return buf.getvalue()


def write_seg(
    labels: np.ndarray,
    reference_datasets: Sequence[Dataset],
    segments: Mapping[int, SegmentSpec],
    *,
    entropy: str,
    created: dt.datetime | None = None,
    series_number: int = 900,
    series_description: str = "medhier segmentation",
    algorithm_name: str = "medhier",
    algorithm_version: str = "0",
    manufacturer: str = "medhier",
) -> bytes:
    """A label map on a series' grid -> DICOM SEG bytes (BINARY, one segment per label value
    present, in ascending value order), referencing that series.

    ``labels``: integer (Z, Y, X) in the slice order :mod:`medhier.io.volume` gives the series
    (``SeriesVolume.array``'s grid). ``reference_datasets``: the series' datasets (headers
    suffice; any order). ``segments``: value -> :class:`SegmentSpec` for every value that may
    occur. ``entropy``: what makes the UIDs (e.g. the model id and the series UID): the same
    entropy gives the same SeriesInstanceUID and SOPInstanceUID. ``created``: the SEG's
    InstanceCreation, Content and ContributionDateTime (naive: local time, as DICOM records it);
    None: the reference series' SeriesDate and SeriesTime (else its StudyDate and StudyTime,
    else 1970-01-01), so that the same label map on the same series gives the same bytes.
    """
    stack = stack_slices(reference_datasets, pixels=False)  # SeriesRejected if the series forms no volume
    labels, present = _checked_labels(labels, stack.geometry.spatial_shape, segments)
    # Label values may skip numbers (1, 2, 5); segment numbers must run 1..n.
    remap = np.zeros(int(labels.max()) + 1, dtype=np.uint8)
    for number, value in enumerate(present, start=1):
        remap[value] = number
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.DCM.ArtificialIntelligence, version=algorithm_version
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = hd.seg.Segmentation(
            source_images=list(reference_datasets),
            pixel_array=stack.geometry.with_array(remap[labels]),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_segment_descriptions(present, segments, algorithm, entropy),
            series_instance_uid=generate_uid(entropy_srcs=["medhier-seg-series", entropy]),
            series_number=series_number,
            sop_instance_uid=generate_uid(entropy_srcs=["medhier-seg-instance", entropy]),
            instance_number=1,
            manufacturer=manufacturer,
            manufacturer_model_name=algorithm_name,
            software_versions=algorithm_version,
            device_serial_number="0",
            series_description=series_description,
        )
    _stamp(seg, created or _series_datetime(reference_datasets[0]), generate_uid(entropy_srcs=["medhier-seg-dimensions", entropy]))
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, seg, enforce_file_format=True)
    return buf.getvalue()


def _series_datetime(ds: Dataset) -> dt.datetime:
    """When a reference series was made: SeriesDate/Time, else StudyDate/Time, else the epoch."""
    for date_key, time_key in (("SeriesDate", "SeriesTime"), ("StudyDate", "StudyTime")):
        date, time = str(ds.get(date_key) or "").strip(), str(ds.get(time_key) or "").strip()
        try:
            day = dt.datetime.strptime(date, "%Y%m%d")
        except ValueError:
            continue
        clock = time.split(".")[0].ljust(6, "0")[:6]
        try:
            return day.replace(hour=int(clock[:2]), minute=int(clock[2:4]), second=int(clock[4:6]))
        except ValueError:
            return day
    return dt.datetime(1970, 1, 1)


def _stamp(seg: Dataset, created: dt.datetime, dimension_uid: str) -> None:
    """Replace highdicom's clock stamps (instance creation, content, its own contribution) and its
    random DimensionOrganizationUID (every occurrence) by ``created`` and ``dimension_uid``."""
    date, time = created.strftime("%Y%m%d"), created.strftime("%H%M%S")
    random_uid = seg.DimensionOrganizationSequence[0].DimensionOrganizationUID if "DimensionOrganizationSequence" in seg else None
    seg.InstanceCreationDate, seg.InstanceCreationTime = date, time
    seg.ContentDate, seg.ContentTime = date, time

    for item in seg.get("ContributingEquipmentSequence") or []:
        # highdicom's own entry carries its clock; the source's acquisition entry keeps its time
        if item.get("ManufacturerModelName") == "highdicom" and "ContributionDateTime" in item:
            item.ContributionDateTime = date + time

    def restamp(dataset: Dataset, elem) -> None:
        if elem.keyword == "DimensionOrganizationUID" and elem.value == random_uid:
            elem.value = dimension_uid

    seg.walk(restamp)


def _checked_labels(
    labels: np.ndarray, shape: tuple[int, int, int], segments: Mapping[int, SegmentSpec]
) -> tuple[np.ndarray, list[int]]:
    """:func:`write_seg`'s label map checked against the series grid ``shape`` and ``segments``
    -> (the map as intp, the label values present but 0, ascending)."""
    labels = np.asarray(labels)
    if labels.shape != shape:
        raise ValueError(f"write_seg: labels have shape {labels.shape}, the series' grid is {shape}")
    if labels.dtype.kind not in "iub":
        raise ValueError(f"write_seg: labels must be integers, got {labels.dtype}")
    labels = labels.astype(np.intp, copy=False)  # bool masks index as values, not as a mask
    if labels.min() < 0:
        raise ValueError(f"write_seg: negative label value {labels.min()}")
    present = [int(v) for v in np.unique(labels) if v != 0]
    if not present:
        raise ValueError("write_seg: the label map is empty (only background); a SEG needs at least one segment")
    unknown = [v for v in present if v not in segments]
    if unknown:
        raise ValueError(f"write_seg: label value(s) {unknown} have no SegmentSpec (known: {sorted(segments)})")
    return labels, present


def _segment_descriptions(
    values: list[int], segments: Mapping[int, SegmentSpec], algorithm: hd.AlgorithmIdentificationSequence, entropy: str
) -> list[hd.seg.SegmentDescription]:
    """Segments 1..n for the label ``values`` (ascending): automatic segments of ``algorithm``,
    labelled and coded as their :class:`SegmentSpec` says (SNOMED CT Tissue where it names no
    property), tracked by a UID derived from ``entropy`` and the value."""
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=segments[value].label,
            segmented_property_category=segments[value].property_category or TISSUE,
            segmented_property_type=segments[value].property_type or TISSUE,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=generate_uid(entropy_srcs=["medhier-seg-segment", entropy, str(value)]),
            tracking_id=segments[value].label,
        )
        for number, value in enumerate(values, start=1)
    ]
