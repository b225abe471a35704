"""medhier.dicom against an oracle: pydicom's own straightforward pipeline on the same file.

For every pydicom test file: if pydicom's ``pixel_array`` gives an image, medhier's output must
equal pydicom's modality LUT + VOI (for the window medhier reports it used), scaled to [0, 1] by
the VOI output range (computed here from the standard's definition, independently of medhier),
inverted for MONOCHROME1. If pydicom gives no image, medhier must reject the file with the reason
listed in REJECTED below.
"""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medhier import columns as C
from medhier.config import DicomConfig
from medhier.io.dicom import REASONS, DicomRejected, decode, patient_key

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
ALL_FILES = sorted(p for p in TEST_FILES.rglob("*") if p.is_file())

# Files pydicom cannot turn into an image, and the reason medhier must give.
REJECTED = {
    "ExplVR_BigEndNoMeta.dcm": "no_pixels",  # RT plan
    "ExplVR_LitEndNoMeta.dcm": "no_pixels",
    "JPEG-lossy.dcm": "corrupt_pixels",  # non-conformant JPEG: every installed decoder fails
    "JPEG2000-embedded-sequence-delimiter.dcm": "corrupt_pixels",  # codestream overwritten
    "MR_truncated.dcm": "corrupt_pixels",
    "README.txt": "not_dicom",
    "UN_sequence.dcm": "no_pixels",
    "badVR.dcm": "unsupported_image",  # NumberOfFrames '1A'
    "crayons.icc": "not_dicom",
    "empty_charset_LEI.dcm": "no_pixels",
    "meta_missing_tsyntax.dcm": "unsupported_image",  # pixel data without Rows/Columns
    "nested_priv_SQ.dcm": "unsupported_image",
    "no_meta.dcm": "not_dicom",  # a stray byte before the first tag: pydicom reads garbage too
    "no_meta_group_length.dcm": "no_pixels",
    "priv_SQ.dcm": "no_pixels",
    "reportsi.dcm": "no_pixels",
    "reportsi_with_empty_number_tags.dcm": "no_pixels",
    "rtplan.dcm": "no_pixels",
    "rtplan.dump": "not_dicom",
    "rtplan_truncated.dcm": "corrupt_header",  # cut inside an element: truncation wins over "no pixels"
    "rtstruct.dcm": "no_pixels",
    "rtstruct.dump": "not_dicom",
    "test-SR.dcm": "no_pixels",
    "test1.json": "not_dicom",
    "test_PN.json": "not_dicom",
    "waveform_ecg.dcm": "no_pixels",
    "zipMR.gz": "not_dicom",
}


def _rel(path: Path) -> str:
    return str(path.relative_to(TEST_FILES))


def _expected_rejection(rel: str) -> str | None:
    if rel in REJECTED:
        return REJECTED[rel]
    name = rel.rsplit("/", 1)[-1]
    if rel.startswith("dicomdirtests/"):
        if name.startswith("DICOMDIR") or rel.startswith("dicomdirtests/TINY_ALPHA/PT"):
            return "no_pixels"  # directories, and CT headers stripped of their pixels
        if name == "README.txt" or name == "README":
            return "not_dicom"
    return None


# -- the oracle ----------------------------------------------------------------------------


def _voi_output_range(ds: Dataset) -> tuple[float, float]:
    """PS3.3 C.11.2.1.2: the window maps onto the output range of the modality LUT stage."""
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.PixelRepresentation) == 0:
        lo, hi = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        lo, hi = -float(2 ** (int(ds.BitsStored) - 1)), float(2 ** (int(ds.BitsStored) - 1) - 1)
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = lo * slope + intercept, hi * slope + intercept
    return lo, hi


def reference(ds: Dataset, frame_arr: np.ndarray, meta: dict, file_window_index: int = 0) -> np.ndarray:
    """pydicom's pipeline for one frame -> [0, 1] with 0 = black."""
    pi = str(ds.PhotometricInterpretation).upper()
    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(frame_arr, ds).astype(np.float64)
        full = 2 ** int(ds.RedPaletteColorLookupTableDescriptor[2]) - 1
        return (rgb @ [0.299, 0.587, 0.114]) / full
    if frame_arr.ndim == 3:  # pydicom hands colour over as RGB
        return (frame_arr.astype(np.float64) @ [0.299, 0.587, 0.114]) / (2 ** int(ds.BitsStored) - 1)
    modality = apply_modality_lut(frame_arr, ds)
    voi_ds = copy.deepcopy(ds)
    if meta[C.WINDOW_SOURCE] != "file":
        if "VOILUTSequence" in voi_ds:
            del voi_ds.VOILUTSequence
        voi_ds.WindowCenter = meta["window_center"]
        voi_ds.WindowWidth = meta["window_width"]
        voi_ds.VOILUTFunction = meta["window_function"]
        file_window_index = 0
    out = apply_voi_lut(modality, voi_ds, index=file_window_index).astype(np.float64)
    if meta[C.WINDOW_SOURCE] == "file" and voi_ds.get("VOILUTSequence"):
        lo, hi = 0.0, float(2 ** int(voi_ds.VOILUTSequence[file_window_index].LUTDescriptor[2]) - 1)
    else:
        lo, hi = _voi_output_range(voi_ds)
    out = np.clip((out - lo) / (hi - lo), 0, 1)
    return 1 - out if pi == "MONOCHROME1" else out


def _pydicom_frames(ds: Dataset) -> np.ndarray | None:
    """All frames as pydicom decodes them, shape (F, H, W[, 3]); None if pydicom cannot."""
    try:
        arr = ds.pixel_array
    except Exception:
        return None
    n = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    if n == 1 and arr.ndim == (2 if samples == 1 else 3):
        arr = arr[None]
    return arr


@pytest.mark.parametrize("path", ALL_FILES, ids=_rel)
def test_pydicom_test_file_matches_oracle_or_is_rejected(path: Path):
    rel = _rel(path)
    data = path.read_bytes()
    expected_reason = _expected_rejection(rel)
    if expected_reason:
        with pytest.raises(DicomRejected) as info:
            decode(data, source=rel)
        assert info.value.reason == expected_reason, info.value.message
        assert rel in info.value.message  # the message names the input
        return

    ds = pydicom.dcmread(path, force=True)
    frames = _pydicom_frames(ds)
    assert frames is not None, f"{rel}: pydicom decodes no image; add it to REJECTED with its reason"
    result = decode(data, source=rel)
    assert result.pixels.dtype == np.float32
    assert result.pixels.shape == (1, int(ds.Rows), int(ds.Columns))
    n = frames.shape[0]
    assert result.frames == (n // 2,)  # middle frame by default
    expected = reference(ds, frames[n // 2], result.meta)
    np.testing.assert_allclose(result.pixels[0], expected, atol=2e-5, err_msg=rel)
    assert 0.0 <= result.pixels.min() and result.pixels.max() <= 1.0


def test_every_rejection_table_entry_exists():
    names = {_rel(p) for p in ALL_FILES}
    assert set(REJECTED) <= names


# -- windows -------------------------------------------------------------------------------


def _ct(pixels: np.ndarray, **attrs) -> Dataset:
    """A minimal CT image dataset around ``pixels`` (int16/uint16/int8/uint8 2-D or 3-D)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = pydicom.uid.CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.PatientID, ds.PatientName = "ID-12345", "Doe^Jane"
    ds.PatientBirthDate, ds.AccessionNumber = "19700101", "ACC-999"
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.tobytes()
    return ds


def _to_bytes(ds: Dataset, preamble: bool = True) -> bytes:
    buf = io.BytesIO()
    if preamble:
        ds.save_as(buf, enforce_file_format=True)
    else:
        pydicom.dcmwrite(buf, ds, implicit_vr=False, little_endian=True)
    return buf.getvalue()


RNG = np.random.default_rng(7)
HU = (RNG.integers(0, 4096, size=(32, 48)) - 1024).astype(np.int16)


def _lut_item(bits: int, entries: np.ndarray, first: int) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(entries), first, bits]
    item.add_new(0x00283006, "US", entries.astype(np.uint16).tolist())  # LUTData, "US or OW"
    return item


WINDOW_CASES = {
    "rescale+file window": (dict(RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400), DicomConfig(), "file"),
    "config preset beats file": (dict(RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400), DicomConfig(windows={"CT": "bone"}), "config:CT"),
    "config [c, w]": (dict(RescaleSlope=2, RescaleIntercept=-2048), DicomConfig(windows={"ct": [100, 700]}), "config:CT"),
    "second file window": (dict(RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=[400, 40], WindowWidth=[1800, 400]), DicomConfig(file_window_index=1), "file"),
    "sigmoid": (dict(RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=100, WindowWidth=300, VOILUTFunction="SIGMOID"), DicomConfig(), "file"),
    "linear exact": (dict(RescaleSlope=1, RescaleIntercept=0, WindowCenter=10.5, WindowWidth=0.5, VOILUTFunction="LINEAR_EXACT"), DicomConfig(), "file"),
    "no window -> percentile": (dict(RescaleSlope=1, RescaleIntercept=-1024), DicomConfig(), "percentile"),
    "file only, none -> minmax": (dict(RescaleSlope=1, RescaleIntercept=-1024), DicomConfig(window_order=["file"]), "minmax"),
    "MONOCHROME1": (dict(RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400, PhotometricInterpretation="MONOCHROME1"), DicomConfig(), "file"),
    "invalid width skipped": (dict(RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=0), DicomConfig(), "percentile"),
}


@pytest.mark.parametrize("attrs,cfg,source", WINDOW_CASES.values(), ids=WINDOW_CASES.keys())
def test_window_sources_match_oracle(attrs, cfg, source):
    ds = _ct(HU, **attrs)
    result = decode(_to_bytes(ds), cfg)
    assert result.meta[C.WINDOW_SOURCE] == source
    expected = reference(pydicom.dcmread(io.BytesIO(_to_bytes(ds))), HU, result.meta, cfg.file_window_index)
    np.testing.assert_allclose(result.pixels[0], expected, atol=2e-5)


def test_config_window_is_the_configured_one():
    result = decode(_to_bytes(_ct(HU, RescaleSlope=1, RescaleIntercept=-1024)), DicomConfig(windows={"CT": "bone"}))
    assert (result.meta["window_center"], result.meta["window_width"]) == (400.0, 1800.0)
    hu = HU.astype(float) - 1024
    # Bone window: -500 HU and below are black, 1300 HU and above white.
    assert np.all(result.pixels[0][hu <= -500] == 0) and np.all(result.pixels[0][hu >= 1300] == 1)


def test_modality_lut_sequence_and_voi_lut_sequence():
    stored = RNG.integers(0, 256, size=(16, 16)).astype(np.uint16)
    ds = _ct(stored)
    ds.BitsStored, ds.HighBit = 8, 7
    mlut = Sequence([_lut_item(16, (np.arange(256) * 16).clip(0, 4095), 0)])
    mlut[0].ModalityLUTType = "HU"
    ds.ModalityLUTSequence = mlut
    ds.VOILUTSequence = Sequence([_lut_item(10, np.linspace(0, 1023, 4096).round(), 0)])
    result = decode(_to_bytes(ds))
    assert result.meta[C.WINDOW_SOURCE] == "file"
    expected = reference(pydicom.dcmread(io.BytesIO(_to_bytes(ds))), stored, result.meta)
    np.testing.assert_allclose(result.pixels[0], expected, atol=2e-5)
    assert result.pixels.max() > 0.9 and result.pixels.min() < 0.1


def test_malformed_lut_is_rejected_not_raised():
    ds = _ct(RNG.integers(0, 256, size=(8, 8)).astype(np.uint16))
    ds.ModalityLUTSequence = Sequence([_lut_item(12, np.arange(256), 0)])  # must be 8 or 16 bits
    with pytest.raises(DicomRejected) as info:
        decode(_to_bytes(ds), source="bad-lut.dcm")
    assert info.value.reason == "unsupported_image"


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32])
def test_integer_widths_and_signs(dtype):
    info = np.iinfo(dtype)
    stored = RNG.integers(max(info.min, -30000), min(info.max, 30000), size=(20, 24)).astype(dtype)
    ds = _ct(stored, RescaleSlope=1, RescaleIntercept=0)
    result = decode(_to_bytes(ds))
    expected = reference(pydicom.dcmread(io.BytesIO(_to_bytes(ds))), stored, result.meta)
    np.testing.assert_allclose(result.pixels[0], expected, atol=2e-5)


def test_big_endian_and_no_preamble_match_little_endian():
    ds = _ct(HU, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    reference_pixels = decode(_to_bytes(ds)).pixels
    no_preamble = decode(_to_bytes(ds, preamble=False)).pixels
    big = copy.deepcopy(ds)
    big.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
    big.PixelData = HU.astype(">i2").tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, big, little_endian=False, implicit_vr=False)
    np.testing.assert_array_equal(no_preamble, reference_pixels)
    np.testing.assert_array_equal(decode(buf.getvalue()).pixels, reference_pixels)


def test_float_pixel_data_and_non_finite():
    values = RNG.normal(size=(8, 8)).astype(np.float32)
    ds = _ct(np.zeros((8, 8), np.uint16))
    del ds.PixelData, ds.PixelRepresentation
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.FloatPixelData = values.tobytes()
    ok = decode(_to_bytes(ds))
    assert ok.meta[C.WINDOW_SOURCE] == "percentile" and np.isfinite(ok.pixels).all()
    # Monotonic: the brightest stored value is white.
    assert ok.pixels[0].flat[values.argmax()] == 1.0
    values[3, 3] = np.nan
    ds.FloatPixelData = values.tobytes()
    with pytest.raises(DicomRejected) as info:
        decode(_to_bytes(ds), source="nan.dcm")
    assert info.value.reason == "non_finite"


def test_enhanced_multiframe_uses_per_frame_rescale():
    frames = np.stack([np.full((4, 4), 100, np.int16), np.full((4, 4), 100, np.int16), np.full((4, 4), 100, np.int16)])
    ds = _ct(frames, WindowCenter=0, WindowWidth=1000)
    ds.PerFrameFunctionalGroupsSequence = Sequence()
    for intercept in (-1000, 0, 300):  # frame 1 (middle) -> 100 HU, frame 2 -> 400 HU
        group, pvt = Dataset(), Dataset()
        pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = 1, intercept, "HU"
        group.PixelValueTransformationSequence = Sequence([pvt])
        ds.PerFrameFunctionalGroupsSequence.append(group)
    middle = decode(_to_bytes(ds))
    assert middle.frames == (1,)
    # window [-500, 500]: 100 HU -> 0.6; with the top-level (absent) rescale it would be 0.6 too,
    # so check the frame whose rescale differs.
    last = decode(_to_bytes(ds), DicomConfig(frames="all"))
    np.testing.assert_allclose(last.pixels[:, 0, 0], [0.0, 0.6, 0.9], atol=2e-3)


# -- frames --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,policy,frames",
    [
        ("SC_rgb_rle_2frame.dcm", "middle", (1,)),
        ("SC_rgb_rle_2frame.dcm", "first", (0,)),
        ("SC_rgb_rle_2frame.dcm", "all", (0, 1)),
        ("examples_ybr_color.dcm", "middle", (15,)),
        ("rtdose.dcm", "all", tuple(range(15))),
        ("CT_small.dcm", "all", (0,)),
    ],
)
def test_frame_policy(name, policy, frames):
    path = TEST_FILES / name
    result = decode(path.read_bytes(), DicomConfig(frames=policy))
    assert result.frames == frames
    assert result.pixels.shape[0] == len(frames)
    ds = pydicom.dcmread(path)
    all_frames = _pydicom_frames(ds)
    for i, f in enumerate(frames):
        np.testing.assert_allclose(result.pixels[i], reference(ds, all_frames[f], result.meta), atol=2e-5)
    assert result.meta[C.NUM_FRAMES] == int(ds.get("NumberOfFrames") or 1)


# -- rejections ----------------------------------------------------------------------------


def _with_tsyntax(uid) -> bytes:
    ds = _ct(HU)
    ds.file_meta.TransferSyntaxUID = uid
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x01\x02\x03" * 8])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()  # explicit encoding: pydicom cannot infer one for a private syntax
    pydicom.dcmwrite(buf, ds, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return buf.getvalue()


def _truncated_pixels() -> bytes:
    data = _to_bytes(_ct(HU, RescaleSlope=1, RescaleIntercept=-1024))
    return data[: len(data) - 500]


def _cut_before_pixels() -> bytes:
    ds = _ct(HU)
    del ds.PixelData
    return _to_bytes(ds)


def _huge() -> bytes:
    ds = _ct(np.zeros((2, 2), np.uint16))
    ds.Rows, ds.Columns = 60000, 60000
    return _to_bytes(ds)


REJECTION_CASES = {
    "empty": (b"", "not_dicom"),
    "text": (b"hello, this is not an image\n" * 10, "not_dicom"),
    "png": (b"\x89PNG\r\n\x1a\n" + bytes(200), "not_dicom"),
    "preamble then garbage": (bytes(128) + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + os.urandom(40), "corrupt_header"),
    "header cut short": (_to_bytes(_ct(HU))[:200], "corrupt_header"),
    "truncated pixels": (_truncated_pixels(), "corrupt_pixels"),
    "cut before the pixel data": (_cut_before_pixels(), "corrupt_pixels"),
    "garbage JPEG 2000": (_with_tsyntax(pydicom.uid.JPEG2000Lossless), "corrupt_pixels"),
    "MPEG2 video": (_with_tsyntax(pydicom.uid.MPEG2MPML), "unsupported_syntax"),
    "unknown syntax": (_with_tsyntax("1.2.3.4.5.6.7"), "unsupported_syntax"),
    "decompression bomb": (_huge(), "too_large"),
    "SR": ((TEST_FILES / "reportsi.dcm").read_bytes(), "no_pixels"),
}


@pytest.mark.parametrize("data,reason", REJECTION_CASES.values(), ids=REJECTION_CASES.keys())
def test_rejections_have_distinct_reasons(data, reason):
    with pytest.raises(DicomRejected) as info:
        decode(data, source="archive/x.dcm")
    assert info.value.reason == reason, info.value.message
    assert info.value.reason in REASONS
    assert "archive/x.dcm" in info.value.message


def test_max_pixels_is_configurable():
    data = _to_bytes(_ct(HU))
    decode(data, DicomConfig(max_pixels=HU.size))
    with pytest.raises(DicomRejected) as info:
        decode(data, DicomConfig(max_pixels=HU.size - 1))
    assert info.value.reason == "too_large"


# -- metadata and privacy ------------------------------------------------------------------


def test_metadata_fields_and_no_raw_identifiers(monkeypatch):
    ds = _ct(HU, RescaleSlope=1, RescaleIntercept=-1024, BodyPartExamined="LSPINE")
    result = decode(_to_bytes(ds))
    meta = result.meta
    assert meta[C.SOP_INSTANCE_UID] == ds.SOPInstanceUID
    assert meta[C.STUDY_INSTANCE_UID] == ds.StudyInstanceUID
    assert meta[C.SERIES_INSTANCE_UID] == ds.SeriesInstanceUID
    assert (meta[C.MODALITY], meta[C.BODY_PART]) == ("CT", "LSPINE")
    assert (meta[C.ROWS], meta[C.COLUMNS], meta[C.NUM_FRAMES]) == (32, 48, 1)
    assert meta[C.PHOTOMETRIC] == "MONOCHROME2"
    assert meta[C.TRANSFER_SYNTAX] == ExplicitVRLittleEndian
    assert len(meta[C.PATIENT_KEY]) == 20
    text = repr(meta)
    for raw in ("ID-12345", "Doe", "Jane", "19700101", "ACC-999"):
        assert raw not in text


def test_patient_key_is_salted_and_stable(monkeypatch):
    monkeypatch.setenv("MEDHIER_PATIENT_SALT", "site-a")
    a1, a2 = patient_key("ID-1"), patient_key("ID-1")
    monkeypatch.setenv("MEDHIER_PATIENT_SALT", "site-b")
    b = patient_key("ID-1")
    assert a1 == a2 != b
    assert patient_key("ID-1", salt="explicit") != patient_key("ID-2", salt="explicit")
    assert patient_key("") == ""
    cfg_key = decode(_to_bytes(_ct(HU)), DicomConfig(patient_salt="explicit")).meta[C.PATIENT_KEY]
    assert cfg_key == patient_key("ID-12345", salt="explicit")
