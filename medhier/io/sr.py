"""Measurements about one source image <-> a DICOM Comprehensive 3D SR (TID 1500 Measurement Report).

PACSs ingest AI results as DICOM, not Parquet (IHE AI Results). This module knows no task: a task
describes what it measured as plain data (:class:`Group`: qualitative evaluations and numeric
measurements), :func:`build_report` writes it as an SR in the source image's study, and
:func:`read_report` gives the groups back. Built and read with highdicom's public TID 1500
classes, so that highdicom (and any TID 1500 reader) can parse the result.

The source's header comes from :func:`medhier.io.dicom.read_dataset` (the one header parser) or
is handed over already parsed. Unlike medhier's reports, the SR carries the source's patient
and study identity (the Patient and General Study modules, copied from the source header): it
is a clinical object the PACS files under that patient and study.

Content tree
------------
::

    CONTAINER Imaging Measurement Report (DCM 126000), TID 1500
      HAS CONCEPT MOD  Language of Content = English
      HAS OBS CONTEXT  Observer Type = Device; Device Observer UID / Name / Manufacturer /
                       Model Name / Serial Number (if given)               (Device)
      HAS CONCEPT MOD  Procedure Reported = Imaging procedure (SCT 363679005) unless given
      CONTAINS         Image Library > Image Library Group > IMAGE Source (SCT 260753009):
                       the source image with its modality and size, and its geometry where
                       highdicom's ImageLibrary can read it from the top level of the header
      CONTAINS         Imaging Measurements
        CONTAINS       Measurement Group (TID 1501), one per :class:`Group`
          HAS OBS CONTEXT  Tracking Identifier = Group.name, Tracking UID
          HAS CONCEPT MOD  Algorithm Name / Version / Parameters / Manufacturer  (TID 4019)
          CONTAINS NUM     one per Numeric: concept, value, unit; each references the source
          CONTAINS CODE    one per Evaluation: concept = value
          CONTAINS IMAGE   Source of Measurement (DCM 121112): the source SOP instance and,
                           for a multi-frame source, the frame (1-based in DICOM)

The document is COMPLETE, PRELIMINARY and UNVERIFIED: no one accountable has verified an AI
result. Numeric values are written both as DS and as FD (highdicom), so a reader gets back the
exact float64 it was given. Private coding schemes (designators starting with ``99``, PS3.16
8.2) must be named in ``private_schemes``; they are declared in the Coding Scheme
Identification Sequence.

UIDs are deterministic: the SOP Instance UID is a function of the source SOP Instance UID, the
frame and the caller's ``identity``; the Series Instance UID of the source's study and the
caller's ``series_identity``; so re-running replaces rather than duplicates an SR in a PACS.

Sources highdicom alone would refuse, and what is done instead (all with public API):

* a SOP class highdicom's IOD tables do not know (private, or newer than the release): highdicom
  looks up which Patient and Study modules to copy by the evidence's SOP class and fails with a
  KeyError. Every image IOD has the same five (Patient, Clinical Trial Subject, General Study,
  Patient Study, Clinical Trial Study: so in all 169 image IODs of highdicom 0.28's tables), so
  highdicom is handed the header as Secondary Capture, the generic image IOD, and the evidence
  reference it writes is then given back the source's own SOP class;
* absent or malformed Type 2 patient/study attributes (name, sex, dates, accession number...):
  written empty, as the standard allows; a stray backslash keeps the first value; a sex other
  than M/F/O becomes empty;
* a Specific Character Set: the source's is kept when it is one single-byte or stand-alone term
  known to both highdicom and pydicom and every text written encodes in it; otherwise (code
  extensions, unknown terms, text it cannot hold) the SR is written in UTF-8 (ISO_IR 192), which
  encodes whatever pydicom decoded; an all-ASCII SR of a source without one has none;
* geometry highdicom's ImageLibrary cannot read (enhanced multi-frame objects keep it in
  functional groups; an unknown SOP class has no modality in its tables): the library entry
  then carries what every image has: the modality (the source's Modality as a CID 29 code,
  where CID 29 has it), rows and columns.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass

import highdicom as hd
import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    Comprehensive3DSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    ImageContentItem,
    ImageLibrary,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    NumContentItem,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurement,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr.utils import find_content_items
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid
from pydicom.valuerep import DA, TM

from medhier import __version__
from medhier.io.dicom import DicomRejected, read_dataset

__all__ = ["Algorithm", "Device", "Evaluation", "Group", "Numeric", "Report", "SourceImage",
           "build_report", "read_report"]

UTF8 = "ISO_IR 192"
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# Type 2 attributes highdicom reads from the evidence as attributes: an absent one is written empty.
_TYPE2 = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)
_MAX_LO = 64  # characters in a LO value (SeriesDescription, ManufacturerModelName)
_TEXT_VRS = ("PN", "LO", "SH", "ST", "LT", "UT", "UC")
# Single Specific Character Set terms the SR may keep: known to highdicom (which checks the value)
# and to pydicom (which encodes the text), without ISO 2022 code extensions. ISO_IR 13 is left
# out: pydicom writes it as JIS X 0201, narrower than the shift_jis codec it is mapped to.
_KEEPABLE_CHARSETS = (
    {v.value for v in hd.SpecificCharacterSetValues if not v.value.startswith("ISO 2022")} & set(python_encoding)
) - {"ISO_IR 13"}
_CID29_BY_MODALITY = {getattr(codes.cid29, name).value: getattr(codes.cid29, name) for name in codes.cid29.dir()}
_PIXELS = CodedConcept(value="{pixels}", meaning="Pixels", scheme_designator="UCUM")


# -- the content, as plain data -------------------------------------------------------------


@dataclass(frozen=True)
class Numeric:
    """One numeric measurement (TID 300): ``concept`` (what), ``value`` (finite), ``unit`` (UCUM)."""

    concept: Code
    value: float
    unit: Code


@dataclass(frozen=True)
class Evaluation:
    """One qualitative evaluation: ``concept`` (what was judged) = ``value`` (the coded answer)."""

    concept: Code
    value: Code


@dataclass(frozen=True)
class Group:
    """One Measurement Group (TID 1501) about the source image.

    ``name``: the group's Tracking Identifier, unique within the SR (e.g. "medhier-spine main
    class"); its Tracking UID is derived from the SR's UID and the name. ``tracking_uid`` is
    filled in by :func:`read_report` and ignored by :func:`build_report`.
    """

    name: str
    evaluations: tuple[Evaluation, ...] = ()
    measurements: tuple[Numeric, ...] = ()
    tracking_uid: str = ""


@dataclass(frozen=True)
class Algorithm:
    """TID 4019 Algorithm Identification, written into every group."""

    name: str
    version: str
    parameters: tuple[str, ...] = ()
    manufacturer: str | None = None


@dataclass(frozen=True)
class Device:
    """The observer device (TID 1004) and the SR's equipment (Manufacturer, Manufacturer's Model
    Name = ``model_name`` or ``name``, Device Serial Number). Its UID is derived from manufacturer,
    name and serial number: the device is the software, not one model, so it stays across
    model versions."""

    name: str
    manufacturer: str
    model_name: str = ""
    serial_number: str = ""


@dataclass(frozen=True)
class SourceImage:
    """The image the measurements are about; ``frame`` 0-based, None for the whole instance."""

    sop_class_uid: str
    sop_instance_uid: str
    frame: int | None


@dataclass(frozen=True)
class Report:
    """What :func:`read_report` finds in a TID 1500 SR.

    ``algorithm``: the first group's TID 4019 identification (every group of an SR written by
    :func:`build_report` has the same). ``source``: the first group's source image. The flags
    are the document's Verification / Preliminary / Completion Flag.
    """

    groups: tuple[Group, ...]
    algorithm: Algorithm | None
    device: Device | None
    source: SourceImage | None
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    verification_flag: str
    preliminary_flag: str
    completion_flag: str


# -- building -------------------------------------------------------------------------------


def build_report(
    source: bytes | Dataset,
    groups: Sequence[Group],
    *,
    algorithm: Algorithm,
    device: Device,
    identity: Sequence[str],
    series_identity: Sequence[str],
    frame: int | None = None,
    series_number: int = 9001,
    instance_number: int = 1,
    series_description: str = "",
    private_schemes: Mapping[str, str] | None = None,
    procedure_reported: Code = codes.SCT.ImagingProcedure,
    source_name: str = "",
) -> bytes:
    """Measurement groups about one source image -> the bytes of a Comprehensive 3D SR file
    (Part 10, Explicit VR Little Endian) in the source's study.

    ``source``: the source DICOM file's bytes (only its header is parsed) or its parsed header
    (not modified). ``frame``: the 0-based frame measured in a multi-frame source; None (or 0
    for a single-frame source) references the whole instance. ``identity`` / ``series_identity``:
    strings that, with the source instance and frame / the source study, make the SR's SOP
    Instance / Series Instance UID. ``private_schemes``: designator -> name of every private
    coding scheme the groups use. ``source_name``: a name for messages.

    Raises ValueError naming the problem: a source that is not a readable DICOM header or lacks
    the UIDs an SR must reference, a frame it does not have, no groups, two groups with one
    name, a non-finite value, an undeclared private coding scheme.

    Long: the body stays one sequence (check the source, derive the UIDs, build the TID 1500 tree, wrap
    it in the SR document) because each step feeds the next; most of its length is highdicom's
    keyword arguments, named where they are set.
    """
    name = source_name or "source"
    evidence = _evidence(_header(source, name), name, copy=isinstance(source, Dataset))
    frames = _frame_numbers(evidence, frame, name)
    _check_groups(groups, private_schemes or {})
    src_class, src_uid = str(evidence.SOPClassUID), str(evidence.SOPInstanceUID)
    frame_part = [] if frames is None else [f"frame={frames[0]}"]
    sop_uid = generate_uid(entropy_srcs=["medhier-sr", src_uid, *identity, *frame_part])
    series_uid = generate_uid(entropy_srcs=["medhier-sr-series", str(evidence.StudyInstanceUID), *series_identity])

    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=_observer(device)),
        procedure_reported=procedure_reported,
        imaging_measurements=_measurement_groups(groups, algorithm, sop_uid, evidence, frames),
    )
    # TID 1500 puts the Image Library right before Imaging Measurements (the last item).
    root = report[0].ContentSequence
    root.insert(len(root) - 1, _image_library(evidence))

    software = f"medhier {__version__}"
    texts = [software, series_description, _model_name(device), *_content_texts(groups, algorithm, device)]
    with warnings.catch_warnings():
        # highdicom warns about values that are odd but legal in archives (names, dates)
        warnings.simplefilter("ignore")
        sr = Comprehensive3DSR(
            evidence=[_as_secondary_capture(evidence)],
            content=report[0],
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=instance_number,
            manufacturer=device.manufacturer,
            is_complete=True,
            is_final=False,  # PRELIMINARY
            is_verified=False,  # UNVERIFIED
            series_description=series_description[:_MAX_LO] or None,
            manufacturer_model_name=_model_name(device),
            software_versions=software,
            device_serial_number=_serial_number(device),
            specific_character_set=_character_set(evidence, texts),
            coding_schemes=_coding_schemes(private_schemes or {}, groups, device.manufacturer),
        )
    _restore_sop_class(sr, src_uid, src_class)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, sr, enforce_file_format=True)
    return buf.getvalue()


def _measurement_groups(
    groups: Sequence[Group], algorithm: Algorithm, sop_uid: str, evidence: Dataset, frames: list[int] | None
) -> list[MeasurementsAndQualitativeEvaluations]:
    """One TID 1501 group per :class:`Group`, each tracked by a UID derived from the SR's
    ``sop_uid`` and its name, identifying ``algorithm`` and referencing the source (``frames``)."""
    src_class, src_uid = str(evidence.SOPClassUID), str(evidence.SOPInstanceUID)
    algorithm_id = AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=list(algorithm.parameters) or None,
        manufacturer=algorithm.manufacturer,
    )
    return [
        MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=generate_uid(entropy_srcs=[sop_uid, group.name]), identifier=group.name
            ),
            algorithm_id=algorithm_id,
            measurements=[
                Measurement(
                    name=m.concept, value=m.value, unit=m.unit,
                    referenced_images=[SourceImageForMeasurement(src_class, src_uid, referenced_frame_numbers=frames)],
                )
                for m in group.measurements
            ] or None,
            qualitative_evaluations=[QualitativeEvaluation(e.concept, e.value) for e in group.evaluations] or None,
            source_images=[SourceImageForMeasurementGroup(src_class, src_uid, referenced_frame_numbers=frames)],
        )
        for group in groups
    ]


def _model_name(device: Device) -> str:
    """The SR's Manufacturer's Model Name: the device's model name, else its name (LO length)."""
    return (device.model_name or device.name)[:_MAX_LO]


def _serial_number(device: Device) -> str | None:
    # an empty TEXT item is invalid: leave it out instead
    return device.serial_number or None


def _observer(device: Device) -> ObserverContext:
    """TID 1004 Device observer; its UID is derived from manufacturer, name and serial number."""
    return ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["medhier-device", device.manufacturer, device.name, device.serial_number]),
            name=device.name,
            manufacturer_name=device.manufacturer,
            model_name=_model_name(device),
            serial_number=_serial_number(device),
        ),
    )


def _coding_schemes(
    private_schemes: Mapping[str, str], groups: Sequence[Group], manufacturer: str
) -> list[CodingSchemeIdentificationItem] | None:
    """The Coding Scheme Identification items of the private schemes the groups use, if any."""
    used = _designators(groups)
    return [
        CodingSchemeIdentificationItem(designator=designator, name=scheme, responsible_organization=manufacturer)
        for designator, scheme in sorted(private_schemes.items())
        if designator in used
    ] or None


def _header(source: bytes | Dataset, name: str) -> Dataset:
    if isinstance(source, Dataset):
        return source
    try:
        return read_dataset(source, source=name, pixels=False)
    except DicomRejected as exc:
        raise ValueError(f"{name} is not a readable DICOM header: {exc}") from None


def _evidence(header: Dataset, name: str, *, copy: bool) -> Dataset:
    """The source header as highdicom can take it as evidence: the UIDs checked, and absent or
    malformed Type 2 patient/study attributes written empty, as the standard allows."""
    missing = [k for k in _REQUIRED if not str(header.get(k, "") or "").strip()]
    if len(missing) == len(_REQUIRED):
        raise ValueError(f"{name} has none of {', '.join(_REQUIRED)}: is it a DICOM image file?")
    if missing:
        raise ValueError(
            f"{name} ({header.get('SOPInstanceUID', 'no SOPInstanceUID')}) lacks {', '.join(missing)}: "
            "an SR must reference the image's SOP class and instance in its study and series"
        )
    ev = deepcopy(header) if copy else header
    for keyword in _TYPE2:
        try:
            value = ev.get(keyword)
        except Exception:  # a raw value pydicom cannot even convert
            value = None
        if value is None:
            setattr(ev, keyword, "")
        elif isinstance(value, MultiValue):  # a stray backslash: every one of these has VM 1
            setattr(ev, keyword, value[0] if len(value) else "")
    sex = str(ev.PatientSex).strip().upper()
    ev.PatientSex = sex if sex in ("M", "F", "O") else ""  # highdicom takes only the enumerated values
    for keyword, vr in (("PatientBirthDate", DA), ("StudyDate", DA), ("StudyTime", TM)):
        try:
            vr(ev.get(keyword) or None)
        except (ValueError, TypeError):
            setattr(ev, keyword, "")
    return ev


def _frame_numbers(header: Dataset, frame: int | None, name: str) -> list[int] | None:
    """0-based ``frame`` -> DICOM's 1-based frame list; None for a single-frame source (the
    instance is the frame) or when no frame was given."""
    try:
        n_frames = int(header.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        n_frames = 1
    if frame is None:
        return None
    if n_frames <= 1:
        if frame != 0:
            raise ValueError(f"frame {frame!r} requested, but {name} is a single-frame image (frame 0)")
        return None
    try:
        index = int(frame)
    except (TypeError, ValueError):
        raise ValueError(f"frame {frame!r} is not a frame number") from None
    if index != frame or not 0 <= index < n_frames:
        raise ValueError(f"frame {frame!r} is not a 0-based frame of {name}, a {n_frames}-frame image")
    return [index + 1]


def _check_groups(groups: Sequence[Group], private_schemes: Mapping[str, str]) -> None:
    if not groups:
        raise ValueError("no measurement groups: a TID 1500 report needs at least one")
    names = [g.name for g in groups]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated or not all(n.strip() for n in names):
        raise ValueError(f"group names must be non-empty and unique (tracking identifiers): {names}")
    for group in groups:
        if not group.measurements and not group.evaluations:
            raise ValueError(f"group {group.name!r} has neither measurements nor evaluations")
        for m in group.measurements:
            if not isinstance(m.value, (int, float)) or not math.isfinite(m.value):
                raise ValueError(f"group {group.name!r}: {m.concept.meaning!r} = {m.value!r} is not a finite number")
    undeclared = sorted(d for d in _designators(groups) if d.startswith("99") and d not in private_schemes)
    if undeclared:
        raise ValueError(f"private coding scheme(s) {', '.join(undeclared)} used but not named in private_schemes")


def _codes(groups: Iterable[Group]) -> Iterable[Code]:
    for group in groups:
        for e in group.evaluations:
            yield from (e.concept, e.value)
        for m in group.measurements:
            yield from (m.concept, m.unit)


def _designators(groups: Iterable[Group]) -> set[str]:
    return {code.scheme_designator for code in _codes(groups)}


def _content_texts(groups: Sequence[Group], algorithm: Algorithm, device: Device) -> list[str]:
    texts = [g.name for g in groups] + [c.meaning for c in _codes(groups)] + [c.value for c in _codes(groups)]
    texts += [algorithm.name, algorithm.version, *algorithm.parameters, algorithm.manufacturer or ""]
    return texts + [device.name, device.manufacturer, device.model_name, device.serial_number]


def _character_set(evidence: Dataset, texts: list[str]) -> str | None:
    """The SR's Specific Character Set (see the module docstring)."""
    value = evidence.get("SpecificCharacterSet")
    texts = texts + [s for element in evidence if element.VR in _TEXT_VRS for s in _strings(element.value)]
    if isinstance(value, str) and value in _KEEPABLE_CHARSETS:
        codec = python_encoding[value]
        try:
            for text in texts:
                text.encode(codec)
            return value
        except UnicodeError:
            return UTF8
    if value in (None, "", "ISO_IR 6") and all(text.isascii() for text in texts):
        return None  # the default repertoire
    return UTF8


def _strings(value) -> list[str]:
    values = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    return [str(v) for v in values if v is not None]


def _as_secondary_capture(evidence: Dataset) -> Dataset:
    """The evidence as highdicom copies Patient and Study modules from (see the module
    docstring): a shallow view with the SOP class of Secondary Capture."""
    proxy = Dataset()
    for element in evidence:
        proxy.add(element)
    proxy.add_new("SOPClassUID", "UI", SecondaryCaptureImageStorage)  # a new element: the source's stays
    return proxy


def _restore_sop_class(sr: Dataset, sop_instance_uid: str, sop_class_uid: str) -> None:
    """Give the evidence reference written from the Secondary Capture view the source's SOP class."""
    for study in sr.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.ReferencedSeriesSequence:
            for instance in series.ReferencedSOPSequence:
                if instance.ReferencedSOPInstanceUID == sop_instance_uid:
                    instance.ReferencedSOPClassUID = sop_class_uid


def _image_library(evidence: Dataset) -> ContainerContentItem:
    """TID 1600 Image Library with the source as its one entry: highdicom's where it can read
    the source's geometry, else modality, rows and columns (see the module docstring)."""
    try:
        return ImageLibrary([evidence])[0]
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        pass
    descriptors = ContentSequence()
    modality = _CID29_BY_MODALITY.get(str(evidence.get("Modality", "")).strip().upper())
    if modality is not None:
        descriptors.append(CodeContentItem(
            name=codes.DCM.Modality, value=modality, relationship_type=RelationshipTypeValues.HAS_ACQ_CONTEXT
        ))
    for keyword, concept in (("Rows", codes.DCM.PixelDataRows), ("Columns", codes.DCM.PixelDataColumns)):
        if isinstance(evidence.get(keyword), int):
            descriptors.append(NumContentItem(
                name=concept, value=int(evidence.get(keyword)), unit=_PIXELS,
                relationship_type=RelationshipTypeValues.HAS_ACQ_CONTEXT,
            ))
    image = ImageContentItem(
        name=Code("260753009", "SCT", "Source"),
        referenced_sop_class_uid=evidence.SOPClassUID,
        referenced_sop_instance_uid=evidence.SOPInstanceUID,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    if descriptors:
        image.ContentSequence = descriptors
    group = ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=RelationshipTypeValues.CONTAINS)
    group.ContentSequence = ContentSequence([image])
    library = ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=RelationshipTypeValues.CONTAINS)
    library.ContentSequence = ContentSequence([group])
    return library


# -- reading --------------------------------------------------------------------------------


def read_report(data: bytes) -> Report:
    """The bytes of a TID 1500 SR -> its image measurement groups, algorithm, observer device,
    source image and document flags (see :class:`Report`).

    Raises ValueError when ``data`` is not a readable DICOM SR or its root is not TID 1500.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sr = hd.sr.srread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, OSError, AttributeError, KeyError, IndexError, TypeError, ValueError,
            NotImplementedError, RuntimeError) as exc:  # how pydicom and highdicom fail on foreign bytes
        raise ValueError(f"not a readable DICOM SR: {type(exc).__name__}: {exc}") from None
    report = sr.content
    if not isinstance(report, MeasurementReport):
        raise ValueError("not a TID 1500 Measurement Report (root template is not 1500)")
    groups, algorithm, source = [], None, None
    for group in report.get_image_measurement_groups():
        groups.append(Group(
            name=str(group.tracking_identifier or ""),
            evaluations=tuple(Evaluation(_code(e.name), _code(e.value)) for e in group.get_qualitative_evaluations()),
            measurements=tuple(Numeric(_code(m.name), m.value, _code(m.unit)) for m in group.get_measurements()),
            tracking_uid=str(group.tracking_uid or ""),
        ))
        algorithm = algorithm or _algorithm(group[0])
        images = group.source_images
        if source is None and images:
            frames = images[0].referenced_frame_numbers
            source = SourceImage(
                sop_class_uid=str(images[0].referenced_sop_class_uid),
                sop_instance_uid=str(images[0].referenced_sop_instance_uid),
                frame=frames[0] - 1 if frames else None,
            )
    return Report(
        groups=tuple(groups),
        algorithm=algorithm,
        device=_device(report),
        source=source,
        sop_instance_uid=str(sr.SOPInstanceUID),
        series_instance_uid=str(sr.SeriesInstanceUID),
        study_instance_uid=str(sr.StudyInstanceUID),
        verification_flag=str(sr.get("VerificationFlag", "")),
        preliminary_flag=str(sr.get("PreliminaryFlag", "")),
        completion_flag=str(sr.get("CompletionFlag", "")),
    )


def _code(concept: CodedConcept) -> Code:
    return Code(concept.value, concept.scheme_designator, concept.meaning, concept.scheme_version)


def _algorithm(group_item: Dataset) -> Algorithm | None:
    def values(concept: Code) -> list[str]:
        return [str(item.value) for item in find_content_items(group_item, name=concept)]

    names = values(codes.DCM.AlgorithmName)
    if not names:
        return None
    version = values(codes.DCM.AlgorithmVersion)
    manufacturer = values(codes.DCM.AlgorithmManufacturer)
    return Algorithm(
        name=names[0],
        version=version[0] if version else "",
        parameters=tuple(values(codes.DCM.AlgorithmParameters)),
        manufacturer=manufacturer[0] if manufacturer else None,
    )


def _device(report: MeasurementReport) -> Device | None:
    observers = report.get_observer_contexts(observer_type=codes.DCM.Device)
    if not observers:
        return None
    device = observers[0].observer_identifying_attributes
    return Device(
        name=str(device.name or ""),
        manufacturer=str(device.manufacturer_name or ""),
        model_name=str(device.model_name or ""),
        serial_number=str(device.serial_number or ""),
    )
