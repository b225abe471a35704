"""medhier.io.sr: any task's measurements about one image -> a TID 1500 SR -> the same measurements.

What matters to a PACS and to the task reading its SR back: the SR sits in the source's patient
and study, references exactly the source image (and frame), carries every group as given
(codes, exact values, units), says who made it, is flagged unverified, keeps its UID when the
same result is written again, and is readable whatever the source's SOP class or character set.
Every SR is read back with plain pydicom (what any PACS sees) and with highdicom's srread.
"""

from __future__ import annotations

import ast
import io
from copy import deepcopy
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pydicom.data
import pytest
from highdicom.sr.utils import find_content_items
from pydicom.data import get_charset_files
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage, EddyCurrentImageStorage

import medhier
from medhier.io.sr import Algorithm, Device, Evaluation, Group, Numeric, SourceImage, build_report, read_report
from medhier.synthetic import spine as synthetic

PRIVATE = "99TEST"
LIPID_CORE = Code("LIPIDCORE", PRIVATE, "Lipid core volume")
CAP = Code("CAPTHICK", PRIVATE, "Fibrous cap thickness")
GROUPS = (
    Group(  # a finding with measurements, in a mix of standard and private concepts
        name="plaque-model left ICA",
        evaluations=(Evaluation(codes.SCT.Finding, codes.SCT.CalcifiedAtheromatousPlaque),),
        measurements=(
            Numeric(LIPID_CORE, 12.345678901234567, codes.UCUM.CubicMillimeter),  # more digits than DS holds
            Numeric(CAP, 0.7, codes.UCUM.Millimeter),
            Numeric(codes.SCT.Stenosis, 41.0, codes.UCUM.Percent),
        ),
    ),
    Group(name="plaque-model right ICA", evaluations=(Evaluation(codes.SCT.Plaque, codes.SCT.Absent),)),
    Group(name="plaque-model volume", measurements=(Numeric(codes.SCT.Volume, 0.0, codes.UCUM.CubicMillimeter),)),
)
ALGORITHM = Algorithm("plaque-model", "a1b2c3", ("model_version=epoch-3", "threshold=0.5"), "Example Lab")
DEVICE = Device("plaque-model", "Example Hospital AI Lab", "plaque-model MR", "SN-7")
IDENTITY = dict(identity=["a1b2c3", "epoch-3"], series_identity=["plaque-model", "a1b2c3"])
SCHEMES = {PRIVATE: "test concepts"}


def ct(patient: str = "P0001", instance: int = 1, **header) -> bytes:
    """A realistic single-frame CT file (ISO_IR 100); ``header`` overrides top-level attributes
    (None deletes one)."""
    phantom = synthetic.render("normal/normal", np.random.default_rng(instance), size=32)
    data = synthetic.dicom_bytes(
        phantom.hu, uids=synthetic.Uids.derive("test-io-sr", patient, instance), patient_id=patient,
        issuer="TEST", patient_name=f"DOE^{patient}", birth_date="19600101", sex="F",
        accession=f"ACC{patient}", instance_number=instance,
    )
    if not header:
        return data
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in header.items():
        if value is None:
            del ds[keyword]
        else:
            setattr(ds, keyword, value)
    return file_bytes(ds)


def file_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=False)
    return buf.getvalue()


def header(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def build(source, groups=GROUPS, **kwargs) -> bytes:
    return build_report(source, groups, **{"algorithm": ALGORITHM, "device": DEVICE, **IDENTITY,
                                           "private_schemes": SCHEMES, **kwargs})


def evidence_refs(ds: pydicom.Dataset) -> list[tuple[str, str, str, str]]:
    return [(study.StudyInstanceUID, series.SeriesInstanceUID, sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID)
            for study in ds.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence for sop in series.ReferencedSOPSequence]


def library_image(data: bytes):
    report = hd.sr.srread(io.BytesIO(data)).content
    library = find_content_items(report[0], name=codes.DCM.ImageLibrary)[0]
    [image] = find_content_items(library, value_type=hd.sr.ValueTypeValues.IMAGE, recursive=True)
    return image


# -- round trip ---------------------------------------------------------------------------------


def test_groups_round_trip_with_the_source_identity_and_document_flags():
    source = ct()
    src = header(source)
    data = build(source, series_number=9100, instance_number=4, series_description="AI plaque: plaque-model epoch-3")

    # What any PACS sees.
    ds = pydicom.dcmread(io.BytesIO(data))
    assert (ds.SOPClassUID, ds.Modality) == (Comprehensive3DSRStorage, "SR")
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    for keyword in ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "AccessionNumber", "StudyID", "StudyDate"):
        assert ds[keyword].value == src[keyword].value, keyword
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert (ds.VerificationFlag, ds.CompletionFlag, ds.PreliminaryFlag) == ("UNVERIFIED", "COMPLETE", "PRELIMINARY")
    assert (ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription) == (9100, 4, "AI plaque: plaque-model epoch-3")
    assert (ds.Manufacturer, ds.ManufacturerModelName, ds.DeviceSerialNumber) == (
        "Example Hospital AI Lab", "plaque-model MR", "SN-7")
    assert ds.SoftwareVersions == f"medhier {medhier.__version__}"
    assert [(s.CodingSchemeDesignator, s.CodingSchemeName) for s in ds.CodingSchemeIdentificationSequence] == [
        (PRIVATE, "test concepts")]
    assert evidence_refs(ds) == [(src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPClassUID, src.SOPInstanceUID)]
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    # The TID 1500 order: language, observer, procedure, image library, imaging measurements.
    assert [item.ConceptNameCodeSequence[0].CodeMeaning for item in ds.ContentSequence] == [
        "Language of Content Item and Descendants", "Observer Type", "Device Observer UID",
        "Device Observer Name", "Device Observer Manufacturer", "Device Observer Model Name",
        "Device Observer Serial Number", "Procedure reported", "Image Library", "Imaging Measurements"]

    # What a TID 1500 reader sees: highdicom's own reader, then ours.
    assert library_image(data).referenced_sop_instance_uid == src.SOPInstanceUID
    back = read_report(data)
    assert back.groups == tuple(Group(g.name, g.evaluations, g.measurements, back.groups[i].tracking_uid)
                                for i, g in enumerate(GROUPS))
    # Code meanings and exact float64 values, which Code's == and the DS string do not check.
    assert [[m.value for m in g.measurements] for g in back.groups] == [[12.345678901234567, 0.7, 41.0], [], [0.0]]
    assert [[(e.concept.meaning, e.value.meaning) for e in g.evaluations] for g in back.groups] == [
        [("Finding", "calcified atheromatous plaque")], [("plaque", "Absent")], []]
    assert len({g.tracking_uid for g in back.groups}) == 3 and all(g.tracking_uid for g in back.groups)
    assert back.algorithm == ALGORITHM and back.device == DEVICE
    assert back.source == SourceImage(src.SOPClassUID, src.SOPInstanceUID, None)
    assert (back.sop_instance_uid, back.series_instance_uid, back.study_instance_uid) == (
        ds.SOPInstanceUID, ds.SeriesInstanceUID, src.StudyInstanceUID)
    assert (back.verification_flag, back.preliminary_flag, back.completion_flag) == ("UNVERIFIED", "PRELIMINARY", "COMPLETE")


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")  # odd on purpose
def test_a_parsed_header_gives_the_same_sr_and_is_left_as_it_was():
    source = ct(PatientSex="X", PatientBirthDate="19xx0101")  # both normalised in the SR
    parsed = header(source)
    before = deepcopy(parsed)
    from_header, from_bytes = read_report(build(parsed)), read_report(build(source))
    assert from_header == from_bytes
    assert parsed == before  # the caller's header is not normalised in place


@pytest.mark.parametrize("change, expected", [
    (dict(), "same"),
    (dict(identity=["a1b2c3", "epoch-4"]), "new sop"),  # another model version: another SR
    (dict(series_identity=["plaque-model", "d4e5f6"]), "new series"),
    (dict(algorithm=Algorithm("plaque-model", "a1b2c3")), "same"),  # the identity, not the content, names it
])
def test_uids_are_functions_of_the_given_identity(change, expected):
    first = header(build(ct()))
    again = header(build(ct(), **change))
    same_sop, same_series = again.SOPInstanceUID == first.SOPInstanceUID, again.SeriesInstanceUID == first.SeriesInstanceUID
    assert (same_sop, same_series) == {"same": (True, True), "new sop": (False, True), "new series": (True, False)}[expected]
    other_image = header(build(ct(instance=2), **change))  # same study, another image: same series, own SR
    assert other_image.SOPInstanceUID != again.SOPInstanceUID and other_image.SeriesInstanceUID == again.SeriesInstanceUID


# -- sources highdicom alone refuses -----------------------------------------------------------


@pytest.mark.parametrize("sop_class", [
    "1.2.826.0.1.3680043.9.9999.1",  # a private SOP class
    EddyCurrentImageStorage,  # a standard class (DICONDE) that highdicom 0.28's IOD tables lack
])
def test_a_source_whose_sop_class_highdicom_does_not_know(sop_class):
    source = ct(SOPClassUID=sop_class)
    src = header(source)
    data = build(source)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert evidence_refs(ds) == [(src.StudyInstanceUID, src.SeriesInstanceUID, sop_class, src.SOPInstanceUID)]
    for keyword in ("PatientID", "IssuerOfPatientID", "PatientName", "AccessionNumber", "StudyID"):
        assert ds[keyword].value == src[keyword].value, keyword
    image = library_image(data)
    assert (image.referenced_sop_class_uid, image.referenced_sop_instance_uid) == (sop_class, src.SOPInstanceUID)
    descriptors = {item.name.meaning: item.value for item in image.ContentSequence}
    assert descriptors["Modality"] == codes.cid29.ComputedTomography  # from the source's Modality "CT"
    assert (descriptors["Pixel Data Rows"], descriptors["Pixel Data Columns"]) == (src.Rows, src.Columns)
    assert read_report(data).source == SourceImage(sop_class, src.SOPInstanceUID, None)


# pydicom's own character-set test files (real Secondary Capture headers) -> the SR's Specific
# Character Set: a single term kept, ISO 2022 code extensions written as UTF-8.
CHARSETS = [
    ("chrFren.dcm", "ISO_IR 100"),
    ("chrGerm.dcm", "ISO_IR 100"),
    ("chrGreek.dcm", "ISO_IR 126"),
    ("chrArab.dcm", "ISO_IR 127"),
    ("chrHbrw.dcm", "ISO_IR 138"),
    ("chrRuss.dcm", "ISO_IR 144"),
    ("chrX1.dcm", "ISO_IR 192"),
    ("chrX2.dcm", "GB18030"),
    ("chrH31.dcm", "ISO_IR 192"),  # ['', 'ISO 2022 IR 87']
    ("chrH32.dcm", "ISO_IR 192"),  # ['ISO 2022 IR 13', 'ISO 2022 IR 87']
    ("chrI2.dcm", "ISO_IR 192"),  # ['', 'ISO 2022 IR 149']
    ("chrKoreanMulti.dcm", "ISO_IR 192"),
]


@pytest.mark.parametrize("name, expected", CHARSETS, ids=[c[0] for c in CHARSETS])
def test_the_patient_name_survives_in_the_sr_character_set(name, expected):
    source = Path(get_charset_files(name)[0]).read_bytes()
    data = build(source)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SpecificCharacterSet == expected
    assert ds.PatientName == header(source).PatientName
    assert read_report(data).groups[0].name == GROUPS[0].name


@pytest.mark.parametrize("charset, patient_name, manufacturer, expected", [
    (None, "DOE^JANE", "Example Lab", None),  # all ASCII: the default repertoire, no attribute
    (None, "DOE^JANE", "Hôpital Nord", "ISO_IR 192"),  # our own text needs more than ASCII
    ("ISO_IR 100", "MÜLLER^JÖRG", "Hôpital Nord", "ISO_IR 100"),
    ("ISO_IR 100", "MÜLLER^JÖRG", "北京医院", "ISO_IR 192"),  # Latin-1 cannot hold the manufacturer
    ("ISO_IR 999", "DOE^JANE", "Example Lab", "ISO_IR 192"),  # a term nobody knows
])
@pytest.mark.filterwarnings("ignore:Unknown encoding")  # ISO_IR 999, on purpose
def test_the_character_set_holds_the_source_and_our_own_text(charset, patient_name, manufacturer, expected):
    data = build(ct(PatientName=patient_name, SpecificCharacterSet=charset), device=Device("plaque-model", manufacturer))
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.get("SpecificCharacterSet") == expected
    assert (str(ds.PatientName), ds.Manufacturer) == (patient_name, manufacturer)
    assert read_report(data).device.manufacturer == manufacturer


# -- multi-frame sources --------------------------------------------------------------------------


def two_frame_sc() -> bytes:
    return Path(pydicom.data.get_testdata_file("SC_rgb_rle_2frame.dcm")).read_bytes()


@pytest.mark.parametrize("frame, referenced", [(0, [1]), (1, [2]), (None, None)])
def test_a_multiframe_source_references_the_frame_measured(frame, referenced):
    source = two_frame_sc()
    src = header(source)
    data = build(source, frame=frame)
    report = hd.sr.srread(io.BytesIO(data)).content
    for group in report.get_image_measurement_groups():
        assert [(i.referenced_sop_instance_uid, i.referenced_frame_numbers) for i in group.source_images] == [
            (src.SOPInstanceUID, referenced)]
        for measurement in group.get_measurements():
            assert [i.referenced_frame_numbers for i in measurement.referenced_images] == [referenced]
    assert read_report(data).source == SourceImage(src.SOPClassUID, src.SOPInstanceUID, frame)
    assert header(data).SOPInstanceUID != header(build(source, frame=1 if frame == 0 else 0)).SOPInstanceUID


# -- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize("source, kwargs, message", [
    (b"", {}, "not_dicom: .* is empty"),
    (b"not a DICOM file at all", {}, "not_dicom: .*no DICM preamble"),
    ("ct", dict(groups=[]), "no measurement groups"),
    ("ct", dict(groups=[GROUPS[1], GROUPS[1]]), "unique"),
    ("ct", dict(groups=[Group("empty")]), "neither measurements nor evaluations"),
    ("ct", dict(groups=[Group("g", measurements=(Numeric(CAP, float("nan"), codes.UCUM.Millimeter),))]), "finite"),
    ("ct", dict(private_schemes={}), "private coding scheme.*99TEST"),
    ("ct", dict(frame=1), "single-frame"),
    ("2 frames", dict(frame=2), "not a 0-based frame"),
    ("2 frames", dict(frame=-1), "not a 0-based frame"),
])
def test_what_cannot_be_written_is_refused_by_name(source, kwargs, message):
    data = {"ct": ct, "2 frames": two_frame_sc}[source]() if isinstance(source, str) else source
    with pytest.raises(ValueError, match=message):
        build(data, **kwargs)


@pytest.mark.parametrize("missing", ["StudyInstanceUID", "SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID"])
def test_a_source_without_what_an_sr_must_reference_is_refused_by_name(missing):
    ds = header(ct())
    del ds[missing]
    with pytest.raises(ValueError, match=missing):
        build(file_bytes(ds))


def free_text_sr() -> bytes:
    """A valid Comprehensive 3D SR whose root is a plain container (no template)."""
    root = hd.sr.ContainerContentItem(name=codes.DCM.Finding)
    root.ContentSequence = [hd.sr.TextContentItem(name=codes.DCM.Finding, value="no plaque",
                                                  relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)]
    source = header(ct())
    sr = hd.sr.Comprehensive3DSR(evidence=[source], content=root, series_instance_uid=pydicom.uid.generate_uid(),
                                 series_number=1, sop_instance_uid=pydicom.uid.generate_uid(), instance_number=1)
    return file_bytes(sr)


@pytest.mark.parametrize("data, message", [
    (free_text_sr, "not a TID 1500 Measurement Report"),
    (lambda: Path(pydicom.data.get_testdata_file("test-SR.dcm")).read_bytes(), "not a readable DICOM SR"),  # pydicom's
    (ct, "not a readable DICOM SR"),
    (lambda: b"", "not a readable DICOM SR"),
])
def test_read_report_refuses_what_is_not_a_tid_1500_sr(data, message):
    with pytest.raises(ValueError, match=message):
        read_report(data())


# -- the public API only ------------------------------------------------------------------------------


def private_dependency_uses(path: Path) -> list[str]:
    """Names a module takes from highdicom or pydicom that are private (a ``_`` part), and
    classes it derives from theirs (an override of their methods)."""
    tree = ast.parse(path.read_text())
    libraries = ("highdicom", "pydicom")
    aliases: set[str] = set()  # local names bound to something of those libraries
    found = []

    def private(name: str) -> bool:
        return any(part.startswith("_") and not part.startswith("__") for part in name.split("."))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in libraries:
                    aliases.add((alias.asname or alias.name).split(".")[0])
                    if private(alias.name):
                        found.append(f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in libraries:
            for alias in node.names:
                aliases.add(alias.asname or alias.name)
                if private(f"{node.module}.{alias.name}"):
                    found.append(f"from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                parts.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id in aliases and private(".".join(parts)):
                found.append(".".join([inner.id, *reversed(parts)]))
        elif isinstance(node, ast.ClassDef):
            for base in node.bases:
                root = base
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in aliases:
                    found.append(f"class {node.name}({ast.unparse(base)})")
    return found


@pytest.mark.parametrize("module", ["medhier/io/sr.py", "medhier/classify/sr.py"])
def test_sr_modules_use_only_public_highdicom_and_pydicom(module):
    assert private_dependency_uses(Path(medhier.__file__).parent.parent / module) == []


def test_the_private_name_check_finds_what_it_looks_for(tmp_path):
    """The check above, on the shapes the old sr.py had: each is found."""
    old = tmp_path / "old.py"
    old.write_text(
        "import highdicom as hd\n"
        "from highdicom._standard_utils import get_sop_class_iod_map\n"
        "from highdicom.valuerep import _check_specific_character_set\n"
        "from highdicom.sr import Comprehensive3DSR\n"
        "m = hd.sr.templates._get_coded_modality\n"
        "class Mine(Comprehensive3DSR):\n    pass\n"
    )
    assert sorted(private_dependency_uses(old)) == [
        "class Mine(Comprehensive3DSR)",
        "from highdicom._standard_utils import get_sop_class_iod_map",
        "from highdicom.valuerep import _check_specific_character_set",
        "hd.sr.templates._get_coded_modality",
    ]
