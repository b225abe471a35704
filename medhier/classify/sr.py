"""One classified image -> a DICOM SR for the PACS, and back: the classifier's SR content.

:func:`make_sr` turns one report row into the two measurement groups below and hands them to
:func:`medhier.io.sr.build_report` (the task-agnostic TID 1500 writer, which documents the
document around them: patient/study identity, observer device, image library, flags, UIDs);
:func:`read_sr` parses one back into the row's values; :func:`sr_filename` names it.

Measurement groups
------------------
::

    Measurement Group "<algorithm_name> main class"
      Algorithm Name = algorithm_name, Version = model_id,
      Parameters = "model_version=<model_version>", Manufacturer = manufacturer   (TID 4019)
      NUM   Probability (DCM 122157), unit "1" = P(main)
      CODE  Main class (99MEDHIER MAINCLASS) = the main class code (table below)
    Measurement Group "<algorithm_name> subclass"
      (the same algorithm identification)
      NUM   Probability (DCM 122157), unit "1" = P(main and sub), the report's leaf_prob: the
            unconditional probability a reader of the standard concept expects
      NUM   Probability of subclass given main class (99MEDHIER PSUBGIVENMAIN), unit "1"
            = P(sub | main), exactly the result's sub_prob (never recomputed here)
      CODE  Subclass (99MEDHIER SUBCLASS) = the subclass code (table below)
      CODE  Refer to a human reader (99MEDHIER REFER) = Yes (SCT 373066001) / No (SCT 373067005):
            the report's ``refer`` (medhier.classify.referral); absent when the result has none

Both groups reference the scored image (and, for a multi-frame source, the frame scored). Both
levels are written even for a main class with a single subclass (normal/normal, where P(sub |
main) is 1): readers find the same two groups in every medhier classification SR.

Class codes
-----------
SNOMED CT where a code means exactly the class; otherwise the private scheme ``99MEDHIER``
(declared in the SR's Coding Scheme Identification Sequence). A private class code's value is
the medhier name itself (main: ``fracture``; subclass: ``fracture/burst``, since a subclass name
is unique only within its main class), so any taxonomy round-trips without a lookup table.

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
concept of the referral         99MEDHIER  REFER                 Refer to a human reader
concept of P(main), P(leaf)     DCM        122157                Probability (unit UCUM "1", no units)
==============================  =========  ====================  ========================================

Code values longer than 16 characters are written as LongCodeValue (highdicom does this); code
meanings are cut to 64 characters (LO).

SNOMED CT has vertebral compression and burst fracture disorders, but their concept IDs are
quoted inconsistently across public sources; a private code is better than a wrong SNOMED one.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from medhier.classify.taxonomy import Taxonomy, TaxonomyError
from medhier.io.sr import Algorithm, Device, Evaluation, Group, Numeric, Report, build_report, read_report

__all__ = ["MEDHIER_SCHEME", "main_code", "make_sr", "read_sr", "sr_filename", "sub_code"]

MEDHIER_SCHEME = "99MEDHIER"  # private coding scheme designator ("99" prefix: PS3.16 8.2)

MAIN_CLASS = Code("MAINCLASS", MEDHIER_SCHEME, "Main class")
SUBCLASS = Code("SUBCLASS", MEDHIER_SCHEME, "Subclass")
PROB_SUB_GIVEN_MAIN = Code("PSUBGIVENMAIN", MEDHIER_SCHEME, "Probability of subclass given main class")
REFER = Code("REFER", MEDHIER_SCHEME, "Refer to a human reader")
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
_SCHEMES = {MEDHIER_SCHEME: "medhier class labels"}
_MAX_LO = 64  # characters in a code meaning (LO)


def main_code(main: str) -> Code:
    """The code of main class ``main`` (see the module's table)."""
    return MAIN_CODES.get(main) or Code(main, MEDHIER_SCHEME, main[:_MAX_LO])


def sub_code(main: str, sub: str) -> Code:
    """The code of subclass ``sub`` of ``main`` (see the module's table)."""
    leaf = f"{main}/{sub}"
    return SUB_CODES.get(leaf) or Code(leaf, MEDHIER_SCHEME, f"{main}: {sub}"[:_MAX_LO])


def make_sr(
    source: bytes | Dataset,
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
    source_name: str = "",
) -> bytes:
    """One classified image -> the bytes of a Comprehensive 3D SR file (Part 10, Explicit VR LE).

    ``source``: the scored DICOM file's bytes (only its header is parsed) or its parsed header.
    ``result``: a report row's ``main_label``, ``main_prob``, ``sub_label``, ``sub_prob``
    (P(sub | main), written exactly as given), optionally ``leaf_prob`` (P(main and sub);
    main_prob * sub_prob when absent), ``refer`` (bool), ``leaf_label`` (checked against main/sub) and ``frame``
    (0-based, as in the report; referenced only for a multi-frame source). Probabilities are in
    [0, 1]. ``source_name``: a name for messages (e.g. the source's path).

    The SR is in the source's study, in a series shared by every SR of that study from the same
    model; its SOP Instance UID is a function of the source SOP Instance UID, frame, ``model_id``
    and ``model_version``, so re-scoring replaces rather than duplicates it in the PACS.
    Raises ValueError naming the problem: a source that is not DICOM or lacks the UIDs an SR
    must reference, a frame the source does not have, or a result that does not fit ``taxonomy``.
    """
    main, sub, main_prob, sub_prob, leaf_prob = _check_result(result, taxonomy)
    referral = () if result.get("refer") is None else (Evaluation(REFER, codes.SCT.Yes if result["refer"] else codes.SCT.No),)
    groups = [
        Group(
            name=f"{algorithm_name} main class",
            evaluations=(Evaluation(MAIN_CLASS, main_code(main)),),
            measurements=(Numeric(PROBABILITY, main_prob, UNIT_ONE),),
        ),
        Group(
            name=f"{algorithm_name} subclass",
            evaluations=(Evaluation(SUBCLASS, sub_code(main, sub)), *referral),
            measurements=(Numeric(PROBABILITY, leaf_prob, UNIT_ONE), Numeric(PROB_SUB_GIVEN_MAIN, sub_prob, UNIT_ONE)),
        ),
    ]
    return build_report(
        source,
        groups,
        algorithm=Algorithm(algorithm_name, model_id, (f"model_version={model_version}",), manufacturer),
        device=Device(algorithm_name, manufacturer, algorithm_name, device_serial),
        identity=[model_id, model_version],
        series_identity=[algorithm_name, model_id, model_version],
        frame=result.get("frame"),
        series_number=series_number,
        instance_number=instance_number,
        series_description=f"AI classification: {algorithm_name} {model_version}",
        private_schemes=_SCHEMES,
        source_name=source_name,
    )


def read_sr(data: bytes) -> dict[str, Any]:
    """SR bytes written by :func:`make_sr` -> the result they carry.

    Returns ``referenced_sop_instance_uid``, ``referenced_sop_class_uid``, ``frame`` (0-based,
    None for a whole-instance reference), ``main_label``, ``main_prob``, ``sub_label``,
    ``sub_prob`` (P(sub | main)), ``leaf_label``, ``leaf_prob``, ``refer`` (only when the SR
    states a referral), ``model_id``, ``model_version``,
    ``algorithm_name``, ``verification_flag``, ``study_instance_uid``, ``sop_instance_uid``.
    Raises ValueError when ``data`` is not such an SR.
    """
    report = read_report(data)
    main_group = _group_with(report, MAIN_CLASS)
    sub_group = _group_with(report, SUBCLASS)
    missing = [what for what, found in (("main class group", main_group), ("subclass group", sub_group),
                                        ("source image", report.source), ("algorithm", report.algorithm))
               if found is None]
    if missing:
        raise ValueError(f"not a medhier classification SR: no {', '.join(missing)} found")
    main = _main_name(_evaluation(main_group, MAIN_CLASS))
    sub = _sub_name(_evaluation(sub_group, SUBCLASS), main)
    algorithm = report.algorithm
    model_version = next((p.partition("=")[2] for p in algorithm.parameters if p.partition("=")[0] == "model_version"), None)
    found = {
        "referenced_sop_instance_uid": report.source.sop_instance_uid,
        "referenced_sop_class_uid": report.source.sop_class_uid,
        "frame": report.source.frame,
        "main_label": main,
        "main_prob": _measurement(main_group, PROBABILITY),
        "sub_label": sub,
        "sub_prob": _measurement(sub_group, PROB_SUB_GIVEN_MAIN),
        "leaf_label": f"{main}/{sub}",
        "leaf_prob": _measurement(sub_group, PROBABILITY),
        "model_id": algorithm.version,
        "algorithm_name": algorithm.name,
        "verification_flag": report.verification_flag,
        "study_instance_uid": report.study_instance_uid,
        "sop_instance_uid": report.sop_instance_uid,
    }
    if model_version is not None:
        found["model_version"] = model_version
    referral = _referral(sub_group)
    if referral is not None:
        found["refer"] = referral
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


# -- writing --------------------------------------------------------------------------------


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


# -- reading --------------------------------------------------------------------------------


def _group_with(report: Report, concept: Code) -> Group | None:
    return next((g for g in report.groups if any(e.concept == concept for e in g.evaluations)), None)


def _evaluation(group: Group, concept: Code) -> Code:
    return next(e.value for e in group.evaluations if e.concept == concept)


def _referral(group: Group) -> bool | None:
    answer = next((e.value for e in group.evaluations if e.concept == REFER), None)
    if answer is None:
        return None
    if answer not in (codes.SCT.Yes, codes.SCT.No):
        raise ValueError(f"the referral is coded ({answer.scheme_designator}, {answer.value}, {answer.meaning!r}), not SCT Yes/No")
    return answer == codes.SCT.Yes


def _measurement(group: Group, concept: Code) -> float:
    for m in group.measurements:
        if m.concept == concept:
            return float(m.value)
    raise ValueError(f"the {group.name!r} measurement group has no {concept.meaning!r} measurement")


def _main_name(code: Code) -> str:
    key = (code.scheme_designator, code.value)
    if key in _MAIN_BY_CODE:
        return _MAIN_BY_CODE[key]
    if code.scheme_designator == MEDHIER_SCHEME:
        return code.value
    raise ValueError(f"main class code ({code.scheme_designator}, {code.value}, {code.meaning!r}) is not a medhier class")


def _sub_name(code: Code, main: str) -> str:
    if code.scheme_designator == MEDHIER_SCHEME and "/" in code.value:
        owner, sub = code.value.split("/", 1)
        if owner != main:
            raise ValueError(f"subclass code {code.value!r} does not belong to main class {main!r}")
        return sub
    key = (code.scheme_designator, code.value)
    if key in _SUB_BY_CODE:
        return _SUB_BY_CODE[key]
    raise ValueError(f"subclass code ({code.scheme_designator}, {code.value}, {code.meaning!r}) of {main!r} is not a medhier class")
