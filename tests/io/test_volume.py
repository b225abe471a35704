"""medhier.io.volume against the headers and pydicom's own decode: synthetic series with known
geometry (axial, coronal, double-oblique; single-frame and enhanced multi-frame), pydicom's real
CT and MR series, and one case per rejection reason."""

from __future__ import annotations

import dataclasses
import io
import pathlib
import random
import subprocess
import sys
import warnings

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.sequence import Sequence as DicomSequence

from medhier.io.dicom import patient_key
from medhier.io.volume import REASONS, SeriesRejected, SeriesVolume, read_series, stack_slices, volume_from_datasets
from tests.io import series as S

TEST_FILES = pathlib.Path(pydicom.data.__file__).parent / "test_files"
DIRTESTS = TEST_FILES / "dicomdirtests"


def _ipp(ds: Dataset) -> np.ndarray:
    return np.array([float(v) for v in ds.ImagePositionPatient])


def _results(pairs) -> tuple[list[SeriesVolume], list[SeriesRejected]]:
    out = list(read_series(pairs))
    return [r for r in out if isinstance(r, SeriesVolume)], [r for r in out if isinstance(r, SeriesRejected)]


def _accounted(results, pairs) -> None:
    """Every instance ends up in exactly one volume or rejection."""
    seen = [s for r in results for s in (r.sources if isinstance(r, SeriesRejected) else dict.fromkeys(r.sources))]
    assert sorted(seen) == sorted(name for name, _ in pairs)


# -- synthetic series: geometry and values ------------------------------------------------------


ORDERS = {
    "shuffled": lambda items: random.Random(3).sample(items, len(items)),
    "reversed": lambda items: items[::-1],
}


@pytest.mark.parametrize("orientation", [S.AXIAL, S.CORONAL, S.OBLIQUE], ids=["axial", "coronal", "oblique"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("rescale", [None, (2.0, -100.0)], ids=["raw", "rescaled"])
def test_single_frame_series_becomes_the_volume_its_headers_describe(orientation, order, rescale):
    shape, spacing = (5, 6, 7), (2.0, 0.5, 0.75)
    datasets = [S.reread(ds) for ds in S.series(shape, spacing, orientation, rescale=rescale)]
    names = [f"IM{k:04d}.dcm" for k in range(shape[0])]
    pairs = ORDERS[order](list(zip(names, datasets)))
    volume = volume_from_datasets([d for _, d in pairs], [n for n, _ in pairs])

    assert volume.shape == shape
    np.testing.assert_allclose(volume.spacing, spacing, rtol=1e-6)
    slope, intercept = rescale or (1.0, 0.0)
    expected = S.stored_values(shape) * slope + intercept
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, expected)
    # the affine reproduces every slice's header: position of slice k, then steps along rows/columns
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    for k, ds in enumerate(datasets):
        np.testing.assert_allclose(volume.affine @ [k, 0, 0, 1], [*_ipp(ds), 1], atol=1e-5)
        np.testing.assert_allclose(
            volume.affine @ [k, 3, 2, 1], [*(_ipp(ds) + 3 * spacing[1] * col + 2 * spacing[2] * row), 1], atol=1e-5
        )
    assert volume.sop_uids == tuple(str(ds.SOPInstanceUID) for ds in datasets)
    assert volume.sources == tuple(names)
    assert volume.frame_numbers == (1,) * shape[0]


def test_series_metadata_is_what_a_visit_manifest_needs_without_raw_identifiers():
    datasets = [S.reread(ds) for ds in S.series(key="meta", patient_id="MRN-42")]
    volume = volume_from_datasets(datasets)
    first = datasets[0]
    assert (volume.series_uid, volume.study_uid, volume.frame_of_reference_uid) == (
        first.SeriesInstanceUID,
        first.StudyInstanceUID,
        first.FrameOfReferenceUID,
    )
    assert (volume.modality, volume.series_description, volume.series_number) == ("MR", "T1w meta", 7)
    assert (volume.study_date, volume.study_time, volume.series_date, volume.series_time) == (
        "20240305",
        "101500",
        "20240305",
        "102000",
    )
    assert volume.patient_key == patient_key("MRN-42") != ""
    plain = {f.name: getattr(volume, f.name) for f in dataclasses.fields(volume) if f.name != "volume"}
    assert "MRN-42" not in repr(plain) and "Test^Patient" not in repr(plain)


def test_enhanced_multiframe_gives_the_single_frame_stacks_volume_with_frames_out_of_order():
    datasets = [S.reread(ds) for ds in S.series(orientation=S.OBLIQUE, rescale=(0.5, 10.0), key="enh")]
    single = volume_from_datasets(datasets)
    multi = S.enhanced(datasets)
    # Store the frames in reverse slice order: the reader must sort by position, not by frame.
    n = int(multi.NumberOfFrames)
    frames = multi.pixel_array[::-1].copy()
    multi.PerFrameFunctionalGroupsSequence = DicomSequence(list(multi.PerFrameFunctionalGroupsSequence)[::-1])
    multi.PixelData = frames.tobytes()
    volume = volume_from_datasets([S.reread(multi)], ["enhanced.dcm"])

    np.testing.assert_array_equal(volume.array, single.array)
    np.testing.assert_allclose(volume.affine, single.affine, atol=1e-5)
    assert volume.frame_numbers == tuple(range(n, 0, -1))
    assert volume.sop_uids == (str(multi.SOPInstanceUID),) * n
    assert volume.sop_class_uid == "1.2.840.10008.5.1.4.1.1.4.4"  # Legacy Converted Enhanced MR


def test_headers_without_pixels_give_the_same_stack():
    datasets = [S.reread(ds) for ds in S.series(orientation=S.OBLIQUE)]
    headers = [pydicom.dcmread(io.BytesIO(S.to_bytes(ds)), stop_before_pixels=True) for ds in datasets[::-1]]
    stack = stack_slices(headers, pixels=False)
    volume = volume_from_datasets(datasets)
    np.testing.assert_allclose(stack.geometry.affine, volume.affine)
    assert [headers[i].SOPInstanceUID for i, _ in stack.slices] == list(volume.sop_uids)
    with pytest.raises(SeriesRejected) as info:
        stack_slices(headers)  # pixels required by default
    assert info.value.reason == "no_pixels"


# -- real series ----------------------------------------------------------------------------------


def test_pydicom_ct_series_matches_headers_and_pydicoms_decode():
    paths = sorted((DIRTESTS / "98892001" / "CT5N").iterdir())
    pairs = [(str(p.relative_to(TEST_FILES)), p.read_bytes()) for p in paths]
    volumes, rejected = _results(pairs)
    assert not rejected and len(volumes) == 1
    volume = volumes[0]
    headers = {str(p.relative_to(TEST_FILES)): pydicom.dcmread(p) for p in paths}
    # axial: the slice normal (columns x rows) points to the feet, so z falls with k
    expected_order = sorted(headers, key=lambda name: -_ipp(headers[name])[2])
    assert list(volume.sources) == expected_order
    assert volume.shape == (5, 16, 16)
    np.testing.assert_allclose(volume.spacing, (2.5, 0.488281, 0.488281), rtol=1e-6)
    assert volume.modality == "CT" and volume.series_description == "SmartScore - Gated 0.5 sec"
    for k, name in enumerate(volume.sources):
        ds = headers[name]
        np.testing.assert_allclose(volume.affine @ [k, 0, 0, 1], [*_ipp(ds), 1], atol=1e-4)
        np.testing.assert_array_equal(volume.array[k], apply_modality_lut(ds.pixel_array, ds))  # HU
    assert volume.array.min() < -800  # air in HU: the rescale was applied


# Every file under dicomdirtests/ and the reason it must get (None: part of a volume).
def _dirtests_expectation(rel: str) -> str | None:
    parts = rel.split("/")
    name = parts[-1]
    if name.startswith("DICOMDIR"):
        return "no_series_uid"  # media directories
    if name.startswith("README"):
        return "unreadable_instance"
    folder = "/".join(parts[1:3]) if parts[1] != "TINY_ALPHA" else "TINY_ALPHA"
    return {
        "77654033/CR1": "no_geometry",  # projection radiographs: no patient-space geometry
        "77654033/CR2": "no_geometry",
        "77654033/CR3": "no_geometry",
        "77654033/CT2": "missing_positions",  # one slice 161 steps away from the other three
        "98892001/CT2N": "mixed_orientation",  # two scouts
        "98892001/CT5N": None,
        "98892003/MR1": "single_slice",  # three one-slice localizer series
        "98892003/MR700": "mixed_orientation",  # radial MIP projections
        "TINY_ALPHA": "no_pixels",  # CT headers stripped of their pixels
    }.get(folder, "mixed_orientation" if name != "15970" else "single_slice")  # MR2: tri-plane pilots


def test_every_dicomdirtests_file_lands_in_one_volume_or_one_typed_rejection():
    paths = sorted(p for p in DIRTESTS.rglob("*") if p.is_file())
    pairs = [(str(p.relative_to(TEST_FILES)), p.read_bytes()) for p in paths]
    results = list(read_series(pairs))
    _accounted(results, pairs)
    got = {}
    for r in results:
        for source in r.sources:
            got[source] = r.reason if isinstance(r, SeriesRejected) else None
    expected = {rel: _dirtests_expectation(rel) for rel, _ in pairs}
    assert got == expected
    counts = {reason: sum(1 for r in results if isinstance(r, SeriesRejected) and r.reason == reason) for reason in REASONS}
    assert counts["mixed_orientation"] == 4 and counts["single_slice"] == 4 and counts["missing_positions"] == 1
    for r in results:
        if isinstance(r, SeriesRejected):
            assert any(s and s in r.message for s in r.sources) or r.series_uid in r.message


def test_missing_positions_message_says_how_many_and_where():
    paths = sorted((DIRTESTS / "77654033" / "CT2").iterdir())
    (rejected,) = read_series([(p.name, p.read_bytes()) for p in paths])
    assert rejected.reason == "missing_positions"
    assert "161 slice(s) missing from a regular 1.250 mm stack" in rejected.message
    assert "between 17136 and 17106" in rejected.message


def test_real_segmentation_and_enhanced_mr_without_geometry_are_rejected():
    pairs = [("liver_1frame.dcm", pathlib.Path(pydicom.data.get_testdata_file("liver_1frame.dcm")).read_bytes())]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a failed download warns
        emri = pydicom.data.get_testdata_file("emri_small.dcm")  # pydicom-data: cache or network
    if emri:
        pairs.append(("emri_small.dcm", pathlib.Path(emri).read_bytes()))
    reasons = {r.sources[0]: r.reason for r in read_series(pairs)}
    assert reasons["liver_1frame.dcm"] == "segmentation"
    if not emri:
        pytest.skip("pydicom-data's emri_small.dcm is not cached here and cannot be downloaded")
    # an enhanced MR whose functional groups were stripped by anonymisation: no plane positions
    assert reasons["emri_small.dcm"] == "no_geometry"


# -- one case per rejection reason ---------------------------------------------------------------


def _mutated(change, n: int = 5, key: str = "reject") -> list[tuple[str, bytes]]:
    datasets = S.series((n, 6, 7), key=key)
    change(datasets)
    return [(f"SE/IM{k}.dcm", S.to_bytes(ds) if isinstance(ds, Dataset) else ds) for k, ds in enumerate(datasets)]


def _set(k: int, **attributes):
    def change(datasets):
        for keyword, value in attributes.items():
            if value is None:
                delattr(datasets[k], keyword)
            else:
                setattr(datasets[k], keyword, value)

    return change


def _shift(k: int, along: str, mm: float):
    def change(datasets):
        direction = {"normal": S.normal(S.AXIAL), "row": np.array(S.AXIAL[:3])}[along]
        datasets[k].ImagePositionPatient = list(_ipp(datasets[k]) + mm * direction)

    return change


def _each(change_one):
    def change(datasets):
        for k, ds in enumerate(datasets):
            change_one(k, ds)

    return change


def _rgb(k, ds):
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = bytes(int(ds.Rows) * int(ds.Columns) * 3)


def _float_pixels(k, ds):
    values = np.full((int(ds.Rows), int(ds.Columns)), 1.5, dtype=np.float32)
    if k == 2:
        values[1, 1] = np.nan
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    ds.FloatPixelData = values.tobytes()


def _bigger(k):
    def change(datasets):
        datasets[k].Rows, datasets[k].Columns = 8, 9
        datasets[k].PixelData = bytes(8 * 9 * 2)

    return change


def _replace(k, data: bytes):
    def change(datasets):
        datasets[k] = data

    return change


def _copy_of(k_from: int, k_to: int):
    def change(datasets):
        datasets[k_to] = S.to_bytes(datasets[k_from])

    return change


def _drop(k: int):
    def change(datasets):
        del datasets[k]

    return change


def _sheared(k, ds):
    ds.ImagePositionPatient = list(_ipp(ds) + 0.3 * k * np.array(S.AXIAL[:3]))  # 0.3 mm per slice: 8.5 degrees


def _liver(datasets):
    datasets[:] = [pathlib.Path(pydicom.data.get_testdata_file("liver_1frame.dcm")).read_bytes()]


# reason -> (change to a regular 5-slice series, instances the rejection accounts for)
REJECTIONS = {
    "unreadable_instance": (_replace(4, b"this is not DICOM"), 1),
    "no_series_uid": (_set(4, SeriesInstanceUID=None), 1),
    "duplicate_instance": (_copy_of(1, 4), 1),
    # a header stripped of its image (io.dicom calls pixel attributes without pixels truncation)
    "no_pixels": (_set(2, PixelData=None, Rows=None, Columns=None, BitsAllocated=None), 5),
    "segmentation": (_liver, 1),
    "unsupported_pixels": (_each(_rgb), 5),
    "mixed_sop_class": (_set(3, SOPClassUID=S.CT_IMAGE), 5),
    "mixed_patients": (_set(1, PatientID="PAT-002"), 5),
    "no_geometry": (_set(2, ImagePositionPatient=None), 5),
    "mixed_frame_of_reference": (_set(2, FrameOfReferenceUID="1.2.3.4"), 5),
    "mixed_orientation": (_set(2, ImageOrientationPatient=list(S.CORONAL)), 5),
    "unequal_slice_size": (_bigger(2), 5),
    "mixed_pixel_spacing": (_set(2, PixelSpacing=[0.6, 0.75]), 5),
    "single_slice": (lambda datasets: datasets.__delitem__(slice(1, None)), 1),
    "duplicate_positions": (lambda datasets: setattr(datasets[3], "ImagePositionPatient", datasets[2].ImagePositionPatient), 5),
    "sheared_stack": (_each(_sheared), 5),
    "missing_positions": (_drop(2), 4),
    "inconsistent_spacing": (_shift(2, "normal", 0.7), 5),
    "undecodable_slice": (_set(3, PixelData=b"\x00\x01" * 10), 5),
    "non_finite": (_each(_float_pixels), 5),
}


def test_every_reason_has_a_case():
    assert set(REJECTIONS) == set(REASONS)


@pytest.mark.parametrize("reason", REJECTIONS)
def test_rejection_reason(reason):
    change, n_rejected = REJECTIONS[reason]
    pairs = _mutated(change)
    results = list(read_series(pairs))
    _accounted(results, pairs)
    rejected = [r for r in results if isinstance(r, SeriesRejected)]
    assert [r.reason for r in rejected] == [reason], [str(r) for r in rejected]
    (r,) = rejected
    assert len(r.sources) == n_rejected
    assert str(r).startswith(f"{reason}: ")
    assert any(source in r.message for source in r.sources)  # the message names an input
    volumes = [v for v in results if isinstance(v, SeriesVolume)]
    # an instance-level rejection leaves the rest of the series to form its volume
    assert len(volumes) == (1 if reason in ("no_series_uid", "duplicate_instance", "unreadable_instance") else 0)


def _garbled_position(datasets):
    """Slice 2's ImagePositionPatient overwritten with letters in the file's bytes."""
    data = S.to_bytes(datasets[2])
    value = "\\".join(str(v) for v in datasets[2].ImagePositionPatient).encode()
    assert data.count(value) == 1
    datasets[2] = data.replace(value, b"x" * len(value))


@pytest.mark.parametrize(
    "change, words",
    [
        (_set(2, ImageOrientationPatient=[1, 0, 0, 0.1, 1, 0]), "orthonormal"),
        (_set(2, PixelSpacing=[0, 0.75]), "PixelSpacing"),
        (_garbled_position, "not numeric"),
        (_set(0, ImageOrientationPatient=None), "ImageOrientationPatient"),
    ],
    ids=["skewed-cosines", "zero-spacing", "text-position", "no-orientation"],
)
def test_unusable_geometry_is_no_geometry(change, words):
    datasets = S.series((3, 4, 4))
    change(datasets)
    datasets = [S.reread(ds) if isinstance(ds, Dataset) else pydicom.dcmread(io.BytesIO(ds)) for ds in datasets]
    with pytest.raises(SeriesRejected) as info:
        volume_from_datasets(datasets)
    assert info.value.reason == "no_geometry" and words in info.value.message


def test_a_small_drift_along_the_normal_is_still_a_volume():
    # 0.01 mm in a 2 mm stack: rounding in the headers, not a different spacing
    volumes, rejected = _results(_mutated(_shift(2, "normal", 0.01)))
    assert not rejected and volumes[0].shape == (5, 6, 7)


def test_io_volume_and_seg_import_neither_ray_nor_torch():
    code = "import sys, medhier.io.volume, medhier.io.seg; print(sorted(m for m in ('ray', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
