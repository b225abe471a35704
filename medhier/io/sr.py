"""One scored image -> a DICOM Comprehensive 3D SR (TID 1500 Measurement Report) for the PACS.

PACSs ingest AI results as DICOM, not Parquet (IHE AI Results): :func:`make_sr` turns one report
row into an SR in the scored image's study, :func:`read_sr` parses one back, :func:`sr_filename`
names it. Built with highdicom's TID 1500 classes, so that highdicom (and any TID 1500 reader)
can parse it.

Unlike medhier's reports, the SR carries the patient and study identity of its source image (the
Patient and General Study modules, copied from the source file's own header): it is a clinical
object that the PACS files under that patient and study.

Content tree
------------
::

    CONTAINER Imaging Measurement Report (DCM 126000), TID 1500
      HAS CONCEPT MOD  Language of Content = English
      HAS OBS CONTEXT  Observer Type = Device; Device Observer UID / Name (algorithm_name) /
                       Manufacturer / Model Name (algorithm_name) / Serial Number (if given)
      HAS CONCEPT MOD  Procedure Reported = Imaging procedure (SCT 363679005)
      CONTAINS         Image Library > Image Library Group > IMAGE Source (SCT 260753009):
                       the source image, with its modality, size and (where highdicom can
                       read them) its geometry descriptors
      CONTAINS         Imaging Measurements
        CONTAINS       Measurement Group (TID 1501), one per level: "main class", "subclass"
          HAS OBS CONTEXT  Tracking Identifier "<algorithm_name> main class|subclass" + UID
          HAS CONCEPT MOD  Algorithm Name = algorithm_name, Algorithm Version = model_id,
                           Algorithm Parameters = "model_version=<model_version>",
                           Algorithm Manufacturer = manufacturer           (TID 4019)
          CONTAINS NUM     Probability (DCM 122157), unit "1"
                           main class: P(main); subclass: P(main and sub) = the report's
                           leaf_prob, the unconditional probability a reader expects
          CONTAINS NUM     (subclass group only) Probability of subclass given main class
                           (99MEDHIER PSUBGIVENMAIN), unit "1": the report's sub_prob
          CONTAINS CODE    Main class (99MEDHIER MAINCLASS) | Subclass (99MEDHIER SUBCLASS)
                           = the class code (table below)
          CONTAINS IMAGE   Source of Measurement (DCM 121112): the source SOP instance and,
                           for a multi-frame source, the frame scored (1-based)

Both levels are written even for a main class with a single subclass (normal/normal, where the
conditional probability is 1): readers find the same two groups in every medhier SR.

Class codes
-----------
SNOMED CT where a code means exactly the class; otherwise the private scheme ``99MEDHIER``
(declared in the SR's Coding Scheme Identification Sequence). A private class code's value is
the medhier name itself (main: ``fracture``; subclass: ``fracture/burst``, since a subclass name is
unique only within its main class), so any taxonomy round-trips without a lookup table.

==============================  =========  ====================  ========================================
medhier class / concept         scheme     code value            code meaning
==============================  =========  ====================  ========================================
main ``normal``                 SCT        17621005              Normal
main ``fracture``               SCT        125605004             Fracture of bone
main ``lesion``                 SCT        52988006              Lesion
sub ``normal/normal``           SCT        17621005              Normal
sub ``fracture/compression``    99MEDHIER  fracture/compression  Compression fracture
sub ``fracture/burst``          99MEDHIER  fracture/burst        Burst fracture
sub ``lesion/benign``           SCT        30807003              Benign
sub ``lesion/malignant``        SCT        21594007              Malignant
any other main ``m``            99MEDHIER  m                     m
any other subclass ``m/s``      99MEDHIER  m/s                   m: s
concept of the main evaluation  99MEDHIER  MAINCLASS             Main class
concept of the sub evaluation   99MEDHIER  SUBCLASS              Subclass
concept of P(sub | main)        99MEDHIER  PSUBGIVENMAIN         Probability of subclass given main class
concept of P(main), P(leaf)     DCM        122157                Probability (unit UCUM "1", no units)
==============================  =========  ====================  ========================================

Code values longer than 16 characters are written as LongCodeValue (highdicom does this).

SNOMED CT has vertebral compression and burst fracture disorders, but their concept IDs are
quoted inconsistently across public sources; a private code is better than a wrong SNOMED one.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from copy import deepcopy
from typing import Any

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
from highdicom._standard_utils import get_sop_class_iod_map
from highdicom.sr.utils import find_content_items
from highdicom.valuerep import _check_specific_character_set
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, TM

from medhier import __version__
from medhier.classify.taxonomy import Taxonomy, TaxonomyError

__all__ = ["MEDHIER_SCHEME", "make_sr", "read_sr", "sr_filename"]

MEDHIER_SCHEME = "99MEDHIER"  # private coding scheme designator ("99" prefix: PS3.16 8.2)

MAIN_CLASS = Code("MAINCLASS", MEDHIER_SCHEME, "Main class")
SUBCLASS = Code("SUBCLASS", MEDHIER_SCHEME, "Subclass")
PROB_SUB_GIVEN_MAIN = Code("PSUBGIVENMAIN", MEDHIER_SCHEME, "Probability of subclass given main class")
PROBABILITY = codes.DCM.Probability  # DCM 122157
UNIT_ONE = codes.UCUM.NoUnits  # UCUM "1"

MAIN_CODES: dict[str, Code] = {
    "normal": Code("17621005", "SCT", "Normal"),
    "fracture": Code("125605004", "SCT", "Fracture of bone"),
    "lesion": Code("52988006", "SCT", "Lesion"),
}
SUB_CODES: dict[str, Code] = {  # keyed by leaf name: subclass names repeat across mains
    "normal/normal": Code("17621005", "SCT", "Normal"),
    "fracture/compression": Code("fracture/compression", MEDHIER_SCHEME, "Compression fracture"),
    "fracture/burst": Code("fracture/burst", MEDHIER_SCHEME, "Burst fracture"),
    "lesion/benign": Code("30807003", "SCT", "Benign"),
    "lesion/malignant": Code("21594007", "SCT", "Malignant"),
}
# Reverse look-ups for read_sr; each level's codes are distinct, so each inverse is a function.
_MAIN_BY_CODE = {(c.scheme_designator, c.value): name for name, c in MAIN_CODES.items()}
_SUB_BY_CODE = {(c.scheme_designator, c.value): leaf.split("/", 1)[1] for leaf, c in SUB_CODES.items()}

_LEVELS = ("main class", "subclass")
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# Type 2 attributes highdicom reads from the source as attributes: an absent one is written empty.
_TYPE2 = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)
_MAX_LO = 64  # characters in a LO value (SeriesDescription, code meanings)
_TEXT_VRS = ("PN", "LO", "SH", "ST", "LT", "UT", "UC")


def make_sr(
    source: bytes,
    result: dict[str, Any],
    *,
    taxonomy: Taxonomy,
    model_id: str,
    model_version: str,
    algorithm_name: str = "medhier",
    series_number: int = 9001,
    instance_number: int = 1,
    manufacturer: str = "medhier",
    device_serial: str = "",
) -> bytes:
    """One scored image -> the bytes of a Comprehensive 3D SR file (Part 10, Explicit VR LE).

    ``source``: the scored DICOM file's bytes (only its header is read). ``result``: a report
    row's ``main_label``, ``main_prob``, ``sub_label``, ``sub_prob`` (P(sub | main)), optionally
    ``leaf_prob`` (P(main and sub); main_prob * sub_prob when absent) and ``frame`` (0-based, as
    in the report; referenced only for a multi-frame source). Probabilities are in [0, 1].

    The SR is in the source's study, in a series shared by every SR of that study from the same
    model; its SOP Instance UID is a function of the source SOP Instance UID, ``model_id`` and
    ``model_version``, so re-scoring replaces rather than duplicates it in the PACS.
    Raises ValueError naming the problem: a source without the UIDs an SR must reference, or a
    result that does not fit ``taxonomy``.
    """
    header = _read_header(source)
    evidence = _evidence(header)
    main, sub, main_prob, sub_prob, leaf_prob = _check_result(result, taxonomy)
    frame_numbers = _frame_numbers(header, result.get("frame"))

    src_uid = str(evidence.SOPInstanceUID)
    # One SR per scored image: with the `all` frames policy every frame of a multi-frame source
    # is its own scored image, so the frame is part of the identity.
    frame_part = [] if frame_numbers is None else [f"frame={frame_numbers[0]}"]
    sop_uid = generate_uid(entropy_srcs=["medhier-sr", src_uid, model_id, model_version, *frame_part])
    series_uid = generate_uid(
        entropy_srcs=["medhier-sr-series", str(evidence.StudyInstanceUID), algorithm_name, model_id, model_version]
    )

    algorithm = AlgorithmIdentification(
        name=algorithm_name,
        version=model_id,
        parameters=[f"model_version={model_version}"],
        manufacturer=manufacturer,
    )

    def group(level: str, evaluation: QualitativeEvaluation, measurements: list[Measurement]):
        return MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=generate_uid(entropy_srcs=[str(sop_uid), level]),
                identifier=f"{algorithm_name} {level}",
            ),
            algorithm_id=algorithm,
            measurements=measurements,
            qualitative_evaluations=[evaluation],
            source_images=[
                SourceImageForMeasurementGroup(evidence.SOPClassUID, src_uid, referenced_frame_numbers=frame_numbers)
            ],
        )

    def probability(name: Code, value: float) -> Measurement:
        return Measurement(
            name=name,
            value=value,
            unit=UNIT_ONE,
            referenced_images=[
                SourceImageForMeasurement(evidence.SOPClassUID, src_uid, referenced_frame_numbers=frame_numbers)
            ],
        )

    groups = [
        group(
            _LEVELS[0],
            QualitativeEvaluation(MAIN_CLASS, main_code(main)),
            [probability(PROBABILITY, main_prob)],
        ),
        group(
            _LEVELS[1],
            QualitativeEvaluation(SUBCLASS, sub_code(main, sub)),
            [probability(PROBABILITY, leaf_prob), probability(PROB_SUB_GIVEN_MAIN, sub_prob)],
        ),
    ]
    serial = device_serial or None  # an empty TEXT item is invalid: leave it out instead
    observer = ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            # The device is the software, not one model: its UID stays across model versions.
            uid=generate_uid(entropy_srcs=["medhier-device", manufacturer, algorithm_name, device_serial]),
            name=algorithm_name,
            manufacturer_name=manufacturer,
            model_name=algorithm_name,
            serial_number=serial,
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,  # CID 100; the source's modality is in the library
        imaging_measurements=groups,
    )
    # TID 1500 puts the Image Library before Imaging Measurements (the last item).
    root = report[0].ContentSequence
    root.insert(len(root) - 1, _image_library(evidence))

    with warnings.catch_warnings():
        # highdicom warns about values that are odd but legal in archives (names, dates)
        warnings.simplefilter("ignore")
        sr = _Comprehensive3DSR(
            evidence=[evidence],
            content=report[0],
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=instance_number,
            manufacturer=manufacturer,
            is_complete=True,
            is_final=False,  # PRELIMINARY: no one accountable has verified an AI result
            is_verified=False,
            series_description=f"AI classification: {algorithm_name} {model_version}"[:_MAX_LO],
            manufacturer_model_name=algorithm_name[:_MAX_LO],
            software_versions=f"medhier {__version__}",
            device_serial_number=serial,
            specific_character_set=_character_set(evidence),
            coding_schemes=[
                CodingSchemeIdentificationItem(
                    designator=MEDHIER_SCHEME,
                    name="medhier class labels",
                    responsible_organization=manufacturer,
                )
            ],
        )
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, sr, enforce_file_format=True)
    return buf.getvalue()


def read_sr(data: bytes) -> dict[str, Any]:
    """SR bytes written by :func:`make_sr` -> the result they carry.

    Returns ``referenced_sop_instance_uid``, ``referenced_sop_class_uid``, ``frame`` (0-based,
    None for a whole-instance reference), ``main_label``, ``main_prob``, ``sub_label``,
    ``sub_prob`` (P(sub | main)), ``leaf_label``, ``leaf_prob``, ``model_id``, ``model_version``,
    ``algorithm_name``, ``verification_flag``, ``study_instance_uid``, ``sop_instance_uid``.
    Raises ValueError when ``data`` is not such an SR.
    """
    try:
        sr = hd.sr.srread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, OSError, AttributeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"not a readable DICOM SR: {type(exc).__name__}: {exc}") from None
    if not isinstance(sr.content, MeasurementReport):
        raise ValueError("not a TID 1500 Measurement Report (root template is not 1500)")
    found: dict[str, Any] = {}
    for grp in sr.content.get_image_measurement_groups():
        main_evals = grp.get_qualitative_evaluations(name=MAIN_CLASS)
        sub_evals = grp.get_qualitative_evaluations(name=SUBCLASS)
        if main_evals:
            found["main_label"] = _main_name(main_evals[0].value)
            found["main_prob"] = _measurement(grp, PROBABILITY, "main class")
        elif sub_evals:
            found["_sub_code"] = sub_evals[0].value
            found["leaf_prob"] = _measurement(grp, PROBABILITY, "subclass")
            found["sub_prob"] = _measurement(grp, PROB_SUB_GIVEN_MAIN, "subclass")
        else:
            continue
        found.update(_algorithm(grp))
        sources = grp.source_images
        if sources:
            frames = sources[0].referenced_frame_numbers
            found["referenced_sop_class_uid"] = str(sources[0].referenced_sop_class_uid)
            found["referenced_sop_instance_uid"] = str(sources[0].referenced_sop_instance_uid)
            found["frame"] = frames[0] - 1 if frames else None
    missing = [k for k in ("main_label", "_sub_code", "referenced_sop_instance_uid", "model_id") if k not in found]
    if missing:
        raise ValueError(f"not a medhier classification SR: no {', '.join(m.lstrip('_') for m in missing)} found")
    main = found["main_label"]
    found["sub_label"] = _sub_name(found.pop("_sub_code"), main)
    found["leaf_label"] = f"{main}/{found['sub_label']}"
    found.update(
        verification_flag=str(sr.VerificationFlag),
        study_instance_uid=str(sr.StudyInstanceUID),
        sop_instance_uid=str(sr.SOPInstanceUID),
    )
    return found


def sr_filename(source_sop_uid: str, model_id: str, frame: int | None = None) -> str:
    """Stable object name of a source image's SR for one model: ``<sop uid>__<model id>.dcm``,
    with ``__f<frame>`` before the extension for one frame of a multi-frame source.

    Raises ValueError for a UID that is not a DICOM UID (it must not smuggle in a path)."""
    uid = str(source_sop_uid).strip()
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid) or len(uid) > 64:
        raise ValueError(f"source SOP Instance UID {source_sop_uid!r} is not a DICOM UID (digits and dots, <= 64)")
    safe_model = re.sub(r"[^A-Za-z0-9._-]", "_", str(model_id)).strip("._") or "model"
    return f"{uid}__{safe_model}" + (f"__f{int(frame)}" if frame is not None else "") + ".dcm"


def main_code(main: str) -> Code:
    """The code of main class ``main`` (see the module's table)."""
    return MAIN_CODES.get(main) or Code(main, MEDHIER_SCHEME, main[:_MAX_LO])


def sub_code(main: str, sub: str) -> Code:
    """The code of subclass ``sub`` of ``main`` (see the module's table)."""
    leaf = f"{main}/{sub}"
    return SUB_CODES.get(leaf) or Code(leaf, MEDHIER_SCHEME, f"{main}: {sub}"[:_MAX_LO])


# -- building ------------------------------------------------------------------------------


def _read_header(source: bytes) -> Dataset:
    if not source:
        raise ValueError("source is empty (0 bytes): need the scored DICOM file's bytes")
    has_preamble = len(source) >= 132 and source[128:132] == b"DICM"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(source), stop_before_pixels=True, force=not has_preamble)
            list(ds.keys())  # parse every top-level element now, so a broken header fails here
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, OverflowError) as exc:
        raise ValueError(f"source is not a readable DICOM file: {type(exc).__name__}: {exc}") from None
    return ds


def _evidence(header: Dataset) -> Dataset:
    """A copy of the source header that highdicom can take as evidence: the UIDs checked, and
    absent or malformed Type 2 patient/study attributes written empty, as the standard allows."""
    missing = [k for k in _REQUIRED if not str(header.get(k, "") or "").strip()]
    if len(missing) == len(_REQUIRED):
        raise ValueError(f"source has none of {', '.join(_REQUIRED)}: is it a DICOM image file?")
    if missing:
        raise ValueError(
            f"source {header.get('SOPInstanceUID', '(no SOPInstanceUID)')} lacks {', '.join(missing)}: "
            "an SR must reference the image's SOP class and instance in its study and series"
        )
    ev = deepcopy(header)
    for keyword in _TYPE2:
        try:
            value = ev.get(keyword)
        except Exception:  # a value pydicom cannot even convert
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


def _character_set(evidence: Dataset) -> str | list[str] | None:
    """The source's Specific Character Set where highdicom accepts it, else UTF-8: pydicom has
    already decoded the source's text, and UTF-8 encodes whatever it decoded."""
    value = evidence.get("SpecificCharacterSet")
    if not value:
        return None if _is_ascii(evidence) else "ISO_IR 192"
    try:
        return _check_specific_character_set(value)
    except (ValueError, TypeError):
        return "ISO_IR 192"


def _is_ascii(evidence: Dataset) -> bool:
    return all(str(element.value).isascii() for element in evidence if element.VR in _TEXT_VRS)


class _Comprehensive3DSR(Comprehensive3DSR):
    """highdicom's Comprehensive 3D SR, able to copy the patient and study modules from a source
    whose SOP class its IOD tables do not know (private, or newer than highdicom): it looks the
    modules up by the source's SOP class and fails with a KeyError otherwise."""

    def copy_patient_and_study_information(self, dataset: Dataset) -> None:
        if dataset.SOPClassUID in get_sop_class_iod_map():
            super().copy_patient_and_study_information(dataset)
            return
        # Every composite image IOD has the same Patient and Study modules: read them as CT's.
        proxy = Dataset()
        for element in dataset:
            proxy.add(element)
        proxy.SOPClassUID = pydicom.uid.CTImageStorage
        super().copy_patient_and_study_information(proxy)


def _check_result(result: dict[str, Any], taxonomy: Taxonomy) -> tuple[str, str, float, float, float]:
    """-> (main, sub, P(main), P(sub | main), P(main and sub)), checked against ``taxonomy``."""
    missing = [k for k in ("main_label", "main_prob", "sub_label", "sub_prob") if result.get(k) is None]
    if missing:
        raise ValueError(f"result lacks {', '.join(missing)} (an error row has no classification to report)")
    main, sub = str(result["main_label"]), str(result["sub_label"])
    try:
        taxonomy.leaf_index(main, sub)
    except TaxonomyError as exc:
        raise ValueError(f"result's class does not fit the taxonomy: {exc}") from None
    leaf = result.get("leaf_label")
    if leaf is not None and str(leaf) != f"{main}/{sub}":
        raise ValueError(f"result's leaf_label {leaf!r} is not {main}/{sub}, its main_label/sub_label")

    def prob(key: str, value: Any) -> float:
        try:
            p = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"result[{key!r}] = {value!r} is not a number") from None
        if not (math.isfinite(p) and 0.0 <= p <= 1.0):
            raise ValueError(f"result[{key!r}] = {value!r} is not a probability in [0, 1]")
        return p

    main_prob, sub_prob = prob("main_prob", result["main_prob"]), prob("sub_prob", result["sub_prob"])
    leaf_raw = result.get("leaf_prob")
    leaf_prob = main_prob * sub_prob if leaf_raw is None else prob("leaf_prob", leaf_raw)
    return main, sub, main_prob, sub_prob, leaf_prob


def _frame_numbers(header: Dataset, frame: Any) -> list[int] | None:
    """result["frame"] (0-based) -> DICOM's 1-based frame list; None for a single-frame source
    (the instance is the frame) or when no frame was given."""
    try:
        n_frames = int(header.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        n_frames = 1
    if frame is None:
        return None
    if n_frames <= 1:
        if frame != 0:
            raise ValueError(f"result['frame'] = {frame!r}, but the source is a single-frame image (frame 0)")
        return None
    try:
        index = int(frame)
    except (TypeError, ValueError):
        raise ValueError(f"result['frame'] = {frame!r} is not a frame number") from None
    if index != frame or not 0 <= index < n_frames:
        raise ValueError(f"result['frame'] = {frame!r} is not a 0-based frame of a {n_frames}-frame source")
    return [index + 1]


def _image_library(evidence: Dataset) -> ContainerContentItem:
    """TID 1600 Image Library with the source as its one entry.

    highdicom's ImageLibrary reads modality-specific geometry from the top level of the
    dataset, which enhanced multi-frame objects keep in functional groups and odd files lack;
    those get an entry with what every image has (modality, rows, columns) instead."""
    try:
        return ImageLibrary([evidence])[0]
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        pass
    descriptors = ContentSequence()
    try:
        modality = hd.sr.templates._get_coded_modality(evidence.SOPClassUID)
    except ValueError:
        modality = None
    if modality is not None:
        descriptors.append(CodeContentItem(
            name=codes.DCM.Modality, value=modality, relationship_type=RelationshipTypeValues.HAS_ACQ_CONTEXT
        ))
    pixels = CodedConcept(value="{pixels}", meaning="Pixels", scheme_designator="UCUM")
    for keyword, name in (("Rows", codes.DCM.PixelDataRows), ("Columns", codes.DCM.PixelDataColumns)):
        if isinstance(evidence.get(keyword), int):
            descriptors.append(NumContentItem(
                name=name, value=int(evidence.get(keyword)), unit=pixels,
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


# -- reading -------------------------------------------------------------------------------


def _measurement(group, name: Code, level: str) -> float:
    found = group.get_measurements(name=name)
    if not found:
        raise ValueError(f"the {level} measurement group has no {name.meaning!r} measurement")
    return float(found[0].value)


def _algorithm(group) -> dict[str, str]:
    out = {}
    for key, name in (("algorithm_name", codes.DCM.AlgorithmName), ("model_id", codes.DCM.AlgorithmVersion)):
        items = find_content_items(group[0], name=name)
        if items:
            out[key] = str(items[0].value)
    for item in find_content_items(group[0], name=codes.DCM.AlgorithmParameters):
        key, _, value = str(item.value).partition("=")
        if key == "model_version":
            out["model_version"] = value
    return out


def _main_name(code: CodedConcept) -> str:
    key = (code.scheme_designator, code.value)
    if key in _MAIN_BY_CODE:
        return _MAIN_BY_CODE[key]
    if code.scheme_designator == MEDHIER_SCHEME:
        return code.value
    raise ValueError(f"main class code ({code.scheme_designator}, {code.value}, {code.meaning!r}) is not a medhier class")


def _sub_name(code: CodedConcept, main: str) -> str:
    if code.scheme_designator == MEDHIER_SCHEME and "/" in code.value:
        owner, sub = code.value.split("/", 1)
        if owner != main:
            raise ValueError(f"subclass code {code.value!r} does not belong to main class {main!r}")
        return sub
    key = (code.scheme_designator, code.value)
    if key in _SUB_BY_CODE:
        return _SUB_BY_CODE[key]
    raise ValueError(f"subclass code ({code.scheme_designator}, {code.value}, {code.meaning!r}) of {main!r} is not a medhier class")
