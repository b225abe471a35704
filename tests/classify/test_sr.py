"""medhier.classify.sr: the DICOM SR a PACS receives for one classified image.

What matters to the PACS and the radiologist: the SR sits in the source's study and patient,
references exactly the scored image (and frame), says who made it (device observer, algorithm,
model), carries the classification with its probabilities, is flagged unverified, and re-scoring
the same image with the same model replaces it instead of adding a duplicate. Every SR is read
back twice: with plain pydicom (what any PACS sees) and with highdicom's TID 1500 classes.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pydicom.data
import pytest
from highdicom.sr.utils import find_content_items
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, EnhancedCTImageStorage

from medhier.synthetic import spine as synthetic
from medhier.classify.sr import MEDHIER_SCHEME, make_sr, read_sr, sr_filename
from medhier.classify.taxonomy import Taxonomy

TAXONOMY = Taxonomy.from_dict(synthetic.DEFAULT_CLASSES)
MODEL = dict(model_id="3f9a1c0de2b4", model_version="epoch-7")
DEVICE = dict(algorithm_name="medhier-spine", manufacturer="Example Hospital AI Lab", device_serial="SN-0042")

# (leaf, P(main), P(sub | main), the main class code, the subclass code) — codes as documented
# in medhier.classify.sr's table.
CASES = [
    ("normal/normal", 0.97, 1.0, ("SCT", "17621005"), ("SCT", "17621005")),  # one subclass: P = 1
    ("fracture/compression", 0.81, 0.64, ("SCT", "125605004"), (MEDHIER_SCHEME, "fracture/compression")),
    ("fracture/burst", 0.55, 0.92, ("SCT", "125605004"), (MEDHIER_SCHEME, "fracture/burst")),
    ("lesion/benign", 0.70, 0.5100000143051147, ("SCT", "52988006"), ("SCT", "30807003")),  # a float32
    ("lesion/malignant", 0.999, 0.123456789, ("SCT", "52988006"), ("SCT", "21594007")),
]


def phantom_ct(leaf: str = "normal/normal", patient: str = "P0001", instance: int = 1) -> bytes:
    """A realistic single-frame CT file of ``patient``'s one series (same study per patient)."""
    phantom = synthetic.render(leaf, np.random.default_rng(instance), size=48)
    return synthetic.dicom_bytes(
        phantom.hu,
        uids=synthetic.Uids.derive("test-sr", patient, instance),
        patient_id=patient,
        issuer="TEST",
        patient_name=f"DOE^{patient}",
        birth_date="19600101",
        sex="F",
        accession=f"ACC{patient}",
        instance_number=instance,
    )


def result_for(leaf: str, main_prob: float, sub_prob: float, frame: int = 0) -> dict:
    main, sub = leaf.split("/")
    return dict(main_label=main, main_prob=main_prob, sub_label=sub, sub_prob=sub_prob,
                leaf_label=leaf, leaf_prob=main_prob * sub_prob, frame=frame)


def header(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def file_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=False)
    return buf.getvalue()


def source_refs(group) -> list[tuple[str, str, list[int] | None]]:
    return [(str(i.referenced_sop_class_uid), str(i.referenced_sop_instance_uid), i.referenced_frame_numbers)
            for i in group.source_images]


# -- one SR per scored image ------------------------------------------------------------------


@pytest.mark.parametrize("leaf, main_prob, sub_prob, main_code, sub_code", CASES, ids=[c[0] for c in CASES])
def test_sr_references_the_source_and_carries_the_classification(leaf, main_prob, sub_prob, main_code, sub_code):
    source = phantom_ct(leaf)
    src = header(source)
    data = make_sr(source, result_for(leaf, main_prob, sub_prob), taxonomy=TAXONOMY, **MODEL, **DEVICE)

    # What any PACS sees: an SR of the same patient and study, in its own series.
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SOPClassUID == Comprehensive3DSRStorage and ds.Modality == "SR"
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID and ds.SOPInstanceUID != src.SOPInstanceUID
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
                    "StudyID", "StudyDate", "IssuerOfPatientID"):
        assert ds[keyword].value == src[keyword].value, keyword
    assert (ds.VerificationFlag, ds.CompletionFlag, ds.PreliminaryFlag) == ("UNVERIFIED", "COMPLETE", "PRELIMINARY")
    assert ds.SeriesNumber == 9001 and "medhier-spine" in ds.SeriesDescription
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    [evidence] = ds.CurrentRequestedProcedureEvidenceSequence
    [series] = evidence.ReferencedSeriesSequence
    [instance] = series.ReferencedSOPSequence
    assert (evidence.StudyInstanceUID, series.SeriesInstanceUID) == (src.StudyInstanceUID, src.SeriesInstanceUID)
    assert (instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID) == (src.SOPClassUID, src.SOPInstanceUID)

    # What a TID 1500 reader sees.
    sr = hd.sr.srread(io.BytesIO(data))
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    [observer] = report.get_observer_contexts(observer_type=codes.DCM.Device)
    device = observer.observer_identifying_attributes
    assert (device.name, device.manufacturer_name, device.model_name, device.serial_number) == (
        "medhier-spine", "Example Hospital AI Lab", "medhier-spine", "SN-0042")
    library = find_content_items(report[0], name=codes.DCM.ImageLibrary)[0]
    [library_image] = find_content_items(library, value_type=hd.sr.ValueTypeValues.IMAGE, recursive=True)
    assert library_image.referenced_sop_instance_uid == src.SOPInstanceUID

    groups = report.get_image_measurement_groups(referenced_sop_instance_uid=src.SOPInstanceUID)
    assert len(groups) == 2 == len(report.get_image_measurement_groups())
    evaluations = {}
    for group in groups:
        assert source_refs(group) == [(src.SOPClassUID, src.SOPInstanceUID, None)]
        algorithm = {item.name.meaning: item.value for item in find_content_items(group[0])
                     if item.name in (codes.DCM.AlgorithmName, codes.DCM.AlgorithmVersion, codes.DCM.AlgorithmParameters)}
        assert algorithm == {"Algorithm Name": "medhier-spine", "Algorithm Version": MODEL["model_id"],
                             "Algorithm Parameters": "model_version=epoch-7"}
        [evaluation] = group.get_qualitative_evaluations()
        probability = group.get_measurements(name=codes.DCM.Probability)[0]
        assert probability.unit == codes.UCUM.NoUnits
        evaluations[evaluation.name.meaning] = ((evaluation.value.scheme_designator, evaluation.value.value),
                                                probability.value)
    # The standard "Probability" is unconditional at both levels: P(main), then P(main and sub).
    assert evaluations == {"Main class": (main_code, pytest.approx(main_prob, abs=1e-12)),
                           "Subclass": (sub_code, pytest.approx(main_prob * sub_prob, abs=1e-12))}

    back = read_sr(data)
    assert back == {
        "referenced_sop_instance_uid": src.SOPInstanceUID,
        "referenced_sop_class_uid": src.SOPClassUID,
        "frame": None,
        "main_label": leaf.split("/")[0],
        "main_prob": pytest.approx(main_prob, abs=1e-12),
        "sub_label": leaf.split("/")[1],
        "sub_prob": pytest.approx(sub_prob, abs=1e-12),
        "leaf_label": leaf,
        "leaf_prob": pytest.approx(main_prob * sub_prob, abs=1e-12),
        "model_id": MODEL["model_id"],
        "model_version": MODEL["model_version"],
        "algorithm_name": "medhier-spine",
        "verification_flag": "UNVERIFIED",
        "study_instance_uid": src.StudyInstanceUID,
        "sop_instance_uid": ds.SOPInstanceUID,
    }


def test_probabilities_are_written_exactly_as_given():
    """sub_prob is P(sub | main) as the model computed it: the SR carries it bit for bit, never a
    quotient of the other two (here deliberately inconsistent with them), and leaf_prob likewise."""
    result = {**result_for("fracture/burst", 0.8100000023841858, 0.6399999856948853), "leaf_prob": 0.5}
    back = read_sr(make_sr(phantom_ct(), result, taxonomy=TAXONOMY, **MODEL))
    assert (back["main_prob"], back["sub_prob"], back["leaf_prob"]) == (0.8100000023841858, 0.6399999856948853, 0.5)


@pytest.mark.parametrize("refer, answer", [(True, codes.SCT.Yes), (False, codes.SCT.No)])
def test_the_referral_is_a_coded_evaluation_beside_the_subclass(refer, answer):
    data = make_sr(phantom_ct(), {**result_for("normal/normal", 0.6, 1.0), "refer": refer}, taxonomy=TAXONOMY, **MODEL, **DEVICE)
    report = hd.sr.srread(io.BytesIO(data)).content
    subclass = next(g for g in report.get_image_measurement_groups() if len(g.get_qualitative_evaluations()) == 2)
    referral = next(e for e in subclass.get_qualitative_evaluations() if e.name.value == "REFER")
    assert (referral.name.scheme_designator, referral.name.meaning) == (MEDHIER_SCHEME, "Refer to a human reader")
    assert referral.value == answer
    assert read_sr(data)["refer"] is refer


def test_a_parsed_header_reads_back_as_the_file_does():
    source, result = phantom_ct("lesion/malignant"), result_for("lesion/malignant", 0.9, 0.8)
    from_header = read_sr(make_sr(header(source), result, taxonomy=TAXONOMY, **MODEL))
    assert from_header == read_sr(make_sr(source, result, taxonomy=TAXONOMY, **MODEL))
    assert from_header["referenced_sop_instance_uid"] == header(source).SOPInstanceUID


def test_rescoring_gives_the_same_sr_uid_and_another_model_another():
    first, second = phantom_ct(patient="P0007", instance=1), phantom_ct(patient="P0007", instance=2)
    result = result_for("fracture/burst", 0.9, 0.8)

    def uids(source, **model):
        ds = header(make_sr(source, result, taxonomy=TAXONOMY, **{**MODEL, **model}))
        return ds.SOPInstanceUID, ds.SeriesInstanceUID

    sop, series = uids(first)
    assert uids(first) == (sop, series)  # re-scored: the PACS replaces, never duplicates
    assert uids(first, model_id="another-model")[0] != sop
    assert uids(first, model_version="epoch-8")[0] != sop
    other_sop, other_series = uids(second)
    assert other_sop != sop and other_series == series  # one SR series per study and model


def test_the_archive_generator_files_round_trip(tmp_path):
    taxonomy = Taxonomy.from_dict(synthetic.DEFAULT_CLASSES)
    synthetic.generate_archive(str(tmp_path), n=6, seed=3, size=32, compressed_fraction=0.5, monochrome1_fraction=0.3)
    rows = list(csv.DictReader((tmp_path / "labels.csv").open()))
    sop_uids = set()
    for i, row in enumerate(rows):
        source = (tmp_path / row["path"]).read_bytes()
        main_prob, sub_prob = 0.5 + i / 20, 1.0 if row["main"] == "normal" else 0.6
        data = make_sr(source, result_for(f"{row['main']}/{row['sub']}", main_prob, sub_prob),
                       taxonomy=taxonomy, **MODEL, instance_number=i + 1)
        back = read_sr(data)
        src = header(source)
        assert (back["referenced_sop_instance_uid"], back["study_instance_uid"]) == (src.SOPInstanceUID, src.StudyInstanceUID)
        assert (back["main_label"], back["sub_label"]) == (row["main"], row["sub"])
        assert back["main_prob"] == pytest.approx(main_prob) and back["sub_prob"] == pytest.approx(sub_prob)
        sop_uids.add(back["sop_instance_uid"])
    assert len(sop_uids) == len(rows)


def test_private_codes_round_trip_any_taxonomy():
    """Classes without a SNOMED code get 99MEDHIER codes whose value is the medhier name, long
    names included (LongCodeValue), so read_sr needs no taxonomy."""
    taxonomy = Taxonomy.from_dict({"pleura": ["clear", "effusion-with-loculation"], "normal": ["normal"]})
    result = result_for("pleura/effusion-with-loculation", 0.66, 0.75)
    data = make_sr(phantom_ct(), result, taxonomy=taxonomy, **MODEL)
    back = read_sr(data)
    assert (back["main_label"], back["sub_label"], back["leaf_label"]) == ("pleura", "effusion-with-loculation",
                                                                           "pleura/effusion-with-loculation")
    report = hd.sr.srread(io.BytesIO(data)).content
    codes_used = {g.get_qualitative_evaluations()[0].value.value: g.get_qualitative_evaluations()[0].value.scheme_designator
                  for g in report.get_image_measurement_groups()}
    assert codes_used == {"pleura": MEDHIER_SCHEME, "pleura/effusion-with-loculation": MEDHIER_SCHEME}
    ds = pydicom.dcmread(io.BytesIO(data))
    assert [s.CodingSchemeDesignator for s in ds.CodingSchemeIdentificationSequence] == [MEDHIER_SCHEME]


# -- multi-frame sources --------------------------------------------------------------------


def enhanced_ct(frames: int = 3) -> bytes:
    """An enhanced-CT-style multi-frame object: geometry lives in functional groups, not at the
    top level, which is where highdicom's image library looks for it."""
    ds = pydicom.dcmread(io.BytesIO(phantom_ct(patient="P0100")))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    for keyword in ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness"):
        del ds[keyword]
    ds.NumberOfFrames = frames
    ds.PixelData = ds.PixelData * frames
    return file_bytes(ds)


MULTIFRAME = {
    "secondary-capture-2-frames": lambda: Path(pydicom.data.get_testdata_file("SC_rgb_rle_2frame.dcm")).read_bytes(),
    "enhanced-ct-3-frames": enhanced_ct,
}


@pytest.mark.parametrize("name, frame", [("secondary-capture-2-frames", 1), ("enhanced-ct-3-frames", 0),
                                         ("enhanced-ct-3-frames", 2)])
def test_multiframe_source_references_the_scored_frame(name, frame):
    source = MULTIFRAME[name]()
    src = header(source)
    data = make_sr(source, result_for("lesion/benign", 0.8, 0.7, frame=frame), taxonomy=TAXONOMY, **MODEL)

    report = hd.sr.srread(io.BytesIO(data)).content
    library = find_content_items(report[0], name=codes.DCM.ImageLibrary)[0]
    [library_image] = find_content_items(library, value_type=hd.sr.ValueTypeValues.IMAGE, recursive=True)
    assert library_image.referenced_sop_instance_uid == src.SOPInstanceUID
    rows = find_content_items(library_image, name=codes.DCM.PixelDataRows)
    assert [item.value for item in rows] == [src.Rows]
    for group in report.get_image_measurement_groups():
        assert source_refs(group) == [(src.SOPClassUID, src.SOPInstanceUID, [frame + 1])]  # DICOM counts from 1
        for measurement in group.get_measurements():
            assert [i.referenced_frame_numbers for i in measurement.referenced_images] == [[frame + 1]]
    back = read_sr(data)
    assert (back["referenced_sop_instance_uid"], back["frame"]) == (src.SOPInstanceUID, frame)


@pytest.mark.parametrize("name, frame", [("secondary-capture-2-frames", 2), ("enhanced-ct-3-frames", -1),
                                         ("single-frame-ct", 1)])
def test_a_frame_the_source_does_not_have_is_refused(name, frame):
    source = phantom_ct() if name == "single-frame-ct" else MULTIFRAME[name]()
    with pytest.raises(ValueError, match="frame"):
        make_sr(source, result_for("lesion/benign", 0.8, 0.7, frame=frame), taxonomy=TAXONOMY, **MODEL)


def test_multiframe_source_without_a_frame_references_the_whole_instance():
    result = result_for("lesion/benign", 0.8, 0.7)
    del result["frame"]
    assert read_sr(make_sr(enhanced_ct(), result, taxonomy=TAXONOMY, **MODEL))["frame"] is None


# -- odd sources ------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["StudyInstanceUID", "SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID"])
def test_source_without_what_an_sr_must_reference_is_refused_by_name(missing):
    ds = header(phantom_ct())
    del ds[missing]
    with pytest.raises(ValueError, match=missing):
        make_sr(file_bytes(ds), result_for("normal/normal", 0.9, 1.0), taxonomy=TAXONOMY, **MODEL)


def test_source_without_optional_identifiers_gives_empty_type2_values():
    optional = ("AccessionNumber", "StudyID", "ReferringPhysicianName", "PatientBirthDate", "PatientSex",
                "StudyDate", "StudyTime", "PatientName")
    ds = header(phantom_ct())
    for keyword in optional:
        del ds[keyword]
    data = make_sr(file_bytes(ds), result_for("normal/normal", 0.9, 1.0), taxonomy=TAXONOMY, **MODEL)
    sr = pydicom.dcmread(io.BytesIO(data))
    assert {k: sr[k].value for k in optional} == {k: "" for k in optional}  # present, empty: Type 2
    assert sr.PatientID == ds.PatientID and read_sr(data)["main_label"] == "normal"


@pytest.mark.parametrize("keyword, value, expected", [
    ("PatientSex", "X", ""),  # not M/F/O: highdicom refuses it, the standard allows empty
    ("PatientSex", "m ", "M"),
    ("PatientBirthDate", "19xx0101", ""),
    ("PatientName", "DOE^JANE\\DOE^J", "DOE^JANE"),  # a stray backslash makes two values
    ("PatientName", "MÜLLER^JÖRG", "MÜLLER^JÖRG"),
    ("SpecificCharacterSet", "ISO_IR 999", "ISO_IR 192"),  # unknown: the SR is written in UTF-8
    ("SOPClassUID", "1.2.826.0.1.3680043.9.9999.1", None),  # a private SOP class highdicom does not know
])
@pytest.mark.filterwarnings("ignore:Invalid value for VR", "ignore:Unknown encoding")  # odd on purpose
def test_odd_but_decodable_sources_still_give_an_sr(keyword, value, expected):
    ds = header(phantom_ct())
    setattr(ds, keyword, value)
    data = make_sr(file_bytes(ds), result_for("fracture/compression", 0.7, 0.6), taxonomy=TAXONOMY, **MODEL)
    sr = pydicom.dcmread(io.BytesIO(data))
    if expected is not None:
        assert str(sr[keyword].value) == expected
    back = read_sr(data)
    assert (back["referenced_sop_class_uid"], back["referenced_sop_instance_uid"]) == (ds.SOPClassUID, ds.SOPInstanceUID)
    assert back["sub_label"] == "compression"


# -- results that cannot be reported ---------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (dict(main_label="tumour"), "unknown main class 'tumour'"),
    (dict(sub_label="burst", leaf_label="lesion/burst"), "unknown subclass 'burst' of 'lesion'"),
    (dict(leaf_label="lesion/malignant"), "leaf_label"),
    (dict(main_prob=1.5), "main_prob"),
    (dict(sub_prob=float("nan")), "sub_prob"),
    (dict(main_label=None, main_prob=None), "main_label, main_prob"),  # an error row
])
def test_results_that_do_not_fit_the_taxonomy_are_refused(change, message):
    result = {**result_for("lesion/benign", 0.8, 0.7), **change}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        make_sr(phantom_ct(), result, taxonomy=TAXONOMY, **MODEL)


def test_read_sr_refuses_an_sr_that_medhier_did_not_write():
    foreign = Path(pydicom.data.get_testdata_file("test-SR.dcm")).read_bytes()
    with pytest.raises(ValueError, match="not"):
        read_sr(foreign)
    with pytest.raises(ValueError, match="not a readable DICOM SR"):
        read_sr(phantom_ct())


@pytest.mark.parametrize("source, message", [(b"", "not_dicom: scans/a.dcm is empty"),
                                             (b"not a DICOM file at all", "not_dicom: scans/a.dcm: no DICM preamble")])
def test_a_source_that_is_not_dicom_is_refused_by_name(source, message):
    with pytest.raises(ValueError, match=message):
        make_sr(source, result_for("normal/normal", 0.9, 1.0), taxonomy=TAXONOMY, **MODEL, source_name="scans/a.dcm")


# -- object names -----------------------------------------------------------------------------


def test_sr_filename_is_stable_and_cannot_escape_its_folder():
    name = sr_filename("1.2.840.113619.2.55.3", "3f9a1c0de2b4")
    assert name == sr_filename("1.2.840.113619.2.55.3", "3f9a1c0de2b4") == "1.2.840.113619.2.55.3__3f9a1c0de2b4.dcm"
    assert sr_filename("1.2.3", "model/../v1") == "1.2.3__model_.._v1.dcm"
    assert sr_filename("1.2.3", "a") != sr_filename("1.2.3", "b")
    for bad in ("../1.2.3", "1.2.3/x", "", "1.2.3.x"):
        with pytest.raises(ValueError, match="not a DICOM UID"):
            sr_filename(bad, "m")
