"""medhier.io.seg: SEG round trips on single- and multi-frame series, segment mapping and
flattening, SEGs on other grids, pydicom's real liver SEG, NIfTI orientation, and one case per
rejection reason."""

from __future__ import annotations

import datetime as dt
import gzip
import io
import pathlib
import time
import warnings

import highdicom as hd
import nibabel
import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from medhier.config import PlaqueConfig
from medhier.io.seg import (
    REASONS,
    TISSUE,
    LabelMapping,
    SegmentSpec,
    SegRejected,
    read_nifti_labels,
    read_seg,
    write_seg,
)
from medhier.io.volume import volume_from_datasets
from tests.io import series as S

# The plaque label set as plain data (io imports no task); outer_wall paints the wall value.
VALUES = {"lumen": 1, "wall": 2, "outer_wall": 2, "lipid_core": 3, "haemorrhage": 4, "calcification": 5, "fibrous_cap": 6}
MAPPING = LabelMapping(VALUES, PlaqueConfig().seg_labels)
SPECS = {
    1: SegmentSpec("Lumen", codes.SCT.LumenOfArtery, codes.SCT.AnatomicalStructure),
    2: SegmentSpec("Vessel wall"),
    3: SegmentSpec("Lipid-rich necrotic core"),
    4: SegmentSpec("Intraplaque haemorrhage", codes.SCT.Hemorrhage, codes.SCT.MorphologicallyAbnormalStructure),
    5: SegmentSpec("Calcification", codes.SCT.VascularCalcification, codes.SCT.MorphologicallyAbnormalStructure),
    6: SegmentSpec("Fibrous cap"),
}


def _reference(orientation=S.AXIAL, shape=(6, 16, 14), key="ref", multiframe=False):
    datasets = [S.reread(ds) for ds in S.series(shape, (2.0, 0.5, 0.6), orientation, key=key)]
    if multiframe:
        datasets = [S.enhanced(datasets, key=key)]
    return volume_from_datasets(datasets), datasets


def _headers(datasets):
    return [pydicom.dcmread(io.BytesIO(S.to_bytes(ds)), stop_before_pixels=True) for ds in datasets]


def _plaque(shape) -> np.ndarray:
    """A vessel in every slice but the first: wall ring, lumen, and each component somewhere."""
    z, y, x = np.indices(shape)
    cy, cx = shape[1] / 2, shape[2] / 2
    r = np.hypot(y - cy, x - cx)
    labels = np.zeros(shape, np.uint8)
    vessel = z >= 1
    labels[vessel & (r < 6)] = 2
    labels[vessel & (r < 2.5)] = 1
    labels[(z == 2) & (r >= 3) & (r < 5) & (y < cy)] = 3
    labels[(z == 3) & (r >= 3) & (r < 5) & (x < cx)] = 4
    labels[(z == 4) & (r >= 4) & (r < 6) & (y > cy)] = 5
    labels[(z == 2) & (r >= 2.5) & (r < 3) & (y < cy)] = 6
    return labels


def _seg_bytes(seg) -> bytes:
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _hd_seg(sources, pixel_array, descriptions, **kwargs) -> bytes:
    """A SEG built directly with highdicom (another tool's SEG, as far as read_seg knows)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=pixel_array,
            segmentation_type="BINARY",
            segment_descriptions=descriptions,
            series_instance_uid=generate_uid(),
            series_number=99,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer="another tool",
            manufacturer_model_name="t",
            software_versions="1",
            device_serial_number="1",
            **kwargs,
        )
    return _seg_bytes(seg)


def _description(number, label, prop=TISSUE, category=TISSUE):
    return hd.seg.SegmentDescription(number, label, category, prop, "MANUAL")


# -- round trip --------------------------------------------------------------------------------


@pytest.mark.parametrize("multiframe", [False, True], ids=["single-frame", "enhanced"])
@pytest.mark.parametrize("orientation", [S.AXIAL, S.OBLIQUE], ids=["axial", "oblique"])
def test_write_then_read_gives_the_same_label_map(orientation, multiframe):
    reference, datasets = _reference(orientation, multiframe=multiframe)
    labels = _plaque(reference.shape)
    data = write_seg(labels, _headers(datasets), SPECS, entropy="model-1:" + reference.series_uid)
    result = read_seg(data, reference, MAPPING, source="plaque.seg.dcm")

    np.testing.assert_array_equal(result.array, labels)
    assert sorted(result.mapped.values()) == ["calcification", "fibrous_cap", "haemorrhage", "lipid_core", "lumen", "outer_wall"]
    assert result.unmapped == {} and result.resampled is False and result.outside == 0


def test_written_seg_describes_its_segments_and_references_the_series():
    reference, datasets = _reference(key="describe")
    labels = _plaque(reference.shape)
    labels[labels == 6] = 2  # no fibrous cap in this one: no segment for it
    data = write_seg(labels, _headers(datasets), SPECS, entropy="e1")
    seg = hd.seg.segread(io.BytesIO(data))

    assert seg.segmentation_type == hd.seg.SegmentationTypeValues.BINARY
    described = {
        seg.get_segment_description(n).segment_label: seg.get_segment_description(n).segmented_property_type.value
        for n in seg.segment_numbers
    }
    assert described == {
        "Lumen": "67170007",
        "Vessel wall": TISSUE.value,
        "Lipid-rich necrotic core": TISSUE.value,
        "Intraplaque haemorrhage": "50960005",
        "Calcification": "237897009",
    }
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [reference.series_uid]
    assert seg.StudyInstanceUID == reference.study_uid and seg.FrameOfReferenceUID == reference.frame_of_reference_uid
    again = hd.seg.segread(io.BytesIO(write_seg(labels, _headers(datasets), SPECS, entropy="e1")))
    other = hd.seg.segread(io.BytesIO(write_seg(labels, _headers(datasets), SPECS, entropy="e2")))
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (seg.SeriesInstanceUID, seg.SOPInstanceUID)
    assert other.SeriesInstanceUID != seg.SeriesInstanceUID and other.SOPInstanceUID != seg.SOPInstanceUID


@pytest.mark.parametrize(
    "created, stamp",
    [(None, ("20240305", "102000")), (dt.datetime(2025, 1, 31, 23, 59, 58), ("20250131", "235958"))],
    ids=["series-time", "given"],
)
def test_written_seg_is_the_same_bytes_at_any_time(created, stamp):
    reference, datasets = _reference(key="clock")
    labels = _plaque(reference.shape)
    first = write_seg(labels, _headers(datasets), SPECS, entropy="clock", created=created)
    time.sleep(1.1)  # highdicom's own stamps would move by a second
    assert write_seg(labels, _headers(datasets), SPECS, entropy="clock", created=created) == first
    ds = pydicom.dcmread(io.BytesIO(first))
    assert (ds.InstanceCreationDate, ds.InstanceCreationTime) == stamp and (ds.ContentDate, ds.ContentTime) == stamp
    assert [e.ContributionDateTime for e in ds.ContributingEquipmentSequence if e.get("ManufacturerModelName") == "highdicom"] == ["".join(stamp)]
    uids = {item.DimensionOrganizationUID for item in ds.DimensionIndexSequence}
    assert uids == {ds.DimensionOrganizationSequence[0].DimensionOrganizationUID}
    other = pydicom.dcmread(io.BytesIO(write_seg(labels, _headers(datasets), SPECS, entropy="other", created=created)))
    assert other.DimensionOrganizationSequence[0].DimensionOrganizationUID not in uids


def test_a_boolean_mask_is_label_one():
    reference, datasets = _reference(key="bool")
    mask = _plaque(reference.shape) > 0
    result = read_seg(write_seg(mask, _headers(datasets), {1: SPECS[1]}, entropy="b"), reference, MAPPING)
    np.testing.assert_array_equal(result.array, mask.astype(np.uint8))


@pytest.mark.parametrize(
    "labels, words",
    [
        (lambda shape: np.zeros(shape, np.uint8), "empty"),
        (lambda shape: np.full(shape, 9, np.uint8), "[9]"),
        (lambda shape: np.ones((2, 3, 4), np.uint8), "shape"),
        (lambda shape: np.ones(shape, np.float32), "integers"),
        (lambda shape: np.full(shape, -1, np.int8), "negative"),
    ],
    ids=["empty", "unknown-value", "wrong-shape", "float", "negative"],
)
def test_write_seg_refuses_what_it_cannot_describe(labels, words):
    reference, datasets = _reference(key="refuse")
    with pytest.raises(ValueError) as info:
        write_seg(labels(reference.shape), _headers(datasets), SPECS, entropy="x")
    assert words in str(info.value)


# -- mapping and flattening ---------------------------------------------------------------------


def test_overlapping_segments_flatten_wall_lumen_components_and_unmapped_are_reported():
    reference, datasets = _reference(key="overlap")
    shape = reference.shape
    outer, lumen, lipid, bleed, other = (np.zeros(shape, bool) for _ in range(5))
    outer[1:5, 2:14, 2:12] = True  # the whole vessel, lumen included
    lumen[1:5, 6:10, 5:9] = True
    lipid[2, 3:8, 3:6] = True  # overlaps the lumen's corner: a component wins
    bleed[3, 10:13, 8:11] = True
    other[4, 0:2, 0:2] = True
    stacked = np.stack([outer, lumen, lipid, bleed, other], axis=-1).astype(np.uint8)
    descriptions = [
        _description(1, "Outer wall"),
        _description(2, "Lumen"),
        _description(3, "LRNC"),
        _description(4, "Segment 4", prop=codes.SCT.Hemorrhage),  # recognised by its coded property
        _description(5, "Thrombus"),
    ]
    data = _hd_seg(datasets, stacked, descriptions)
    result = read_seg(data, reference, MAPPING)

    expected = np.zeros(shape, np.uint8)
    expected[outer] = 2
    expected[lumen] = 1
    expected[lipid] = 3
    expected[bleed] = 4
    np.testing.assert_array_equal(result.array, expected)
    assert result.mapped == {1: "outer_wall", 2: "lumen", 3: "lipid_core", 4: "haemorrhage"}
    assert result.unmapped == {5: "Thrombus"}


@pytest.mark.parametrize(
    "label, prop, patterns, expected",
    [
        ("LUMEN", TISSUE, {"lumen": ["*lumen*"]}, "lumen"),  # case-insensitive
        ("seg 1", codes.SCT.LumenOfArtery, {"lumen": ["SCT:67170007"]}, "lumen"),  # by code
        ("calcified cap", TISSUE, {"calcification": ["*calc*"], "fibrous_cap": ["*cap*"]}, "calcification"),  # first wins
        ("Lumen", codes.SCT.Hemorrhage, {"haemorrhage": ["*hemorrhage*"], "lumen": ["*lumen*"]}, "lumen"),  # label first
        ("Thrombus", TISSUE, {"lumen": ["*lumen*"]}, None),
    ],
)
def test_segment_mapping_rule(label, prop, patterns, expected):
    assert LabelMapping(VALUES, patterns).name_for(label, prop.meaning, f"{prop.scheme_designator}:{prop.value}") == expected


@pytest.mark.parametrize(
    "values, patterns, words",
    [
        ({"lumen": 1}, {"wall": ["*wall*"]}, "no value"),
        ({"lumen": 0}, {}, "1..255"),
        ({"lumen": 1}, {"lumen": "*lumen*"}, "list"),
    ],
)
def test_label_mapping_checks_itself(values, patterns, words):
    with pytest.raises(ValueError) as info:
        LabelMapping(values, patterns)
    assert words in str(info.value)


# -- other grids ----------------------------------------------------------------------------------


def _finer(reference, mask: np.ndarray) -> hd.Volume:
    """``mask`` on a grid with half the in-plane spacing and the same first voxel centre: fine
    voxel (k, 2i, 2j) is reference voxel (k, i, j), and each reference voxel owns 2 x 2 fine ones."""
    affine = reference.affine.copy()
    affine[:3, 1:3] /= 2
    fine = mask.repeat(2, axis=1).repeat(2, axis=2).astype(np.uint8)
    return hd.Volume(fine, affine, coordinate_system="PATIENT", frame_of_reference_uid=reference.frame_of_reference_uid)


@pytest.mark.parametrize(
    "regrid",
    [
        _finer,
        # the same voxels stored with rows and columns swapped and slices reversed
        lambda ref, mask: hd.Volume(
            mask.astype(np.uint8), ref.affine, coordinate_system="PATIENT", frame_of_reference_uid=ref.frame_of_reference_uid
        )
        .permute_spatial_axes([0, 2, 1])
        .flip_spatial(0),
    ],
    ids=["finer-in-plane", "permuted-and-flipped"],
)
@pytest.mark.parametrize("orientation", [S.AXIAL, S.OBLIQUE], ids=["axial", "oblique"])
def test_seg_on_another_grid_is_placed_onto_the_reference(regrid, orientation):
    reference, datasets = _reference(orientation, key="grid")
    mask = np.zeros(reference.shape, bool)
    mask[1, 2:6, 3:7] = True
    mask[4, 9:13, 1:4] = True  # slices 2 and 3 empty: frames omitted from the SEG
    data = _hd_seg(datasets, regrid(reference, mask), [_description(1, "Lumen")])
    result = read_seg(data, reference, MAPPING)
    assert result.resampled is (regrid is _finer) and result.outside == 0  # the other is the same lattice
    np.testing.assert_array_equal(result.array, mask.astype(np.uint8) * VALUES["lumen"])


def test_seg_reaching_beyond_the_reference_counts_what_falls_outside():
    reference, datasets = _reference(key="outside")
    mask = np.zeros(reference.shape, bool)
    mask[2, 0:3, 0:3] = True
    affine = reference.affine
    affine[:3, 3] -= 2 * affine[:3, 2]  # the same lattice, two columns further left
    shifted = hd.Volume(
        mask.astype(np.uint8), affine, coordinate_system="PATIENT", frame_of_reference_uid=reference.frame_of_reference_uid
    )
    result = read_seg(_hd_seg(datasets, shifted, [_description(1, "Lumen")]), reference, MAPPING)
    assert result.outside == 3 * 2 and result.resampled is False  # 3 rows x 2 columns left of column 0
    expected = np.zeros(reference.shape, np.uint8)
    expected[2, 0:3, 0:1] = 1
    np.testing.assert_array_equal(result.array, expected)


# -- a real SEG -----------------------------------------------------------------------------------


def _liver_reference():
    """A CT series that pydicom's liver SEG could have been drawn on: its series, instances,
    frame of reference and geometry (the SEG's frame lies on the referenced instance 23433)."""
    seg = hd.seg.segread(pydicom.data.get_testdata_file("liver_1frame.dcm"))
    frame = seg.PerFrameFunctionalGroupsSequence[0]
    shared = seg.SharedFunctionalGroupsSequence[0]
    position = np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
    orientation = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    referenced = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
    others = sorted({uid for _, _, uid in seg.get_source_image_uids()} - {referenced})
    # axial: slice k = 1 holds the referenced instance, 1 mm from each neighbour
    datasets = S.series((3, 512, 512), (1.0, *spacing), orientation, position - S.normal(orientation), modality="CT", key="liver")
    for ds, uid in zip(datasets, [others[0], referenced, others[1]]):
        ds.SOPInstanceUID = uid
        ds.SeriesInstanceUID = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
        ds.StudyInstanceUID = seg.StudyInstanceUID
        ds.FrameOfReferenceUID = seg.FrameOfReferenceUID
    return volume_from_datasets([S.reread(ds) for ds in datasets]), seg


def test_pydicoms_liver_seg_lands_on_its_source_slice():
    reference, seg = _liver_reference()
    data = pathlib.Path(pydicom.data.get_testdata_file("liver_1frame.dcm")).read_bytes()
    result = read_seg(data, reference, LabelMapping({"liver": 1}, {"liver": ["*liver*"]}), source="liver_1frame.dcm")
    assert result.mapped == {1: "liver"} and not result.resampled
    expected = np.zeros(reference.shape, np.uint8)
    expected[1] = seg.pixel_array.reshape(512, 512) > 0
    np.testing.assert_array_equal(result.array, expected)
    assert result.array.sum() > 10_000  # a liver, not a speck

    unmapped = read_seg(data, reference, MAPPING)  # the plaque mapping knows no liver
    assert unmapped.unmapped == {1: "Liver"} and unmapped.mapped == {} and not unmapped.array.any()


# -- rejections -----------------------------------------------------------------------------------


def _written_seg(key="rejections"):
    reference, datasets = _reference(key=key)
    return write_seg(_plaque(reference.shape), _headers(datasets), SPECS, entropy=key), reference


def _irregular_seg():
    """Frames at irregular positions, on another pixel grid than the reference's instances."""
    reference, datasets = _reference(key="irregular")
    normal = S.normal(S.AXIAL)
    origin = np.array([float(v) for v in datasets[0].ImagePositionPatient])
    positions = [hd.PlanePositionSequence("PATIENT", list(origin + d * normal)) for d in (0.0, 1.0, 3.5)]
    pixels = np.ones((3, 8, 7), np.uint8)
    data = _hd_seg(
        datasets,
        pixels,
        [_description(1, "Lumen")],
        plane_positions=positions,
        plane_orientation=hd.PlaneOrientationSequence("PATIENT", list(S.AXIAL)),
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=[1.0, 1.2], slice_thickness=1.0),
    )
    return data, reference


def _other_frame_of_reference():
    data, _ = _written_seg("frame")
    datasets = [S.reread(ds) for ds in S.series((6, 16, 14), (2.0, 0.5, 0.6), key="frame")]
    for ds in datasets:
        ds.FrameOfReferenceUID = "1.2.3.4.5"
    return data, volume_from_datasets(datasets)


REJECTIONS = {
    "unreadable": lambda: (b"\x00" * 300, _reference(key="u")[0]),
    "not_a_seg": lambda: (S.to_bytes(S.series(key="mr")[0]), _reference(key="mr")[0]),
    "other_series": lambda: (_written_seg("a")[0], _reference(key="b")[0]),
    "other_frame_of_reference": _other_frame_of_reference,
    "not_a_volume": _irregular_seg,
}


def test_every_reason_has_a_case():
    assert set(REJECTIONS) | {"not_labels"} == set(REASONS)


@pytest.mark.parametrize("reason", REJECTIONS)
def test_seg_rejection_reason(reason):
    data, reference = REJECTIONS[reason]()
    with pytest.raises(SegRejected) as info:
        read_seg(data, reference, MAPPING, source="input.seg.dcm")
    assert info.value.reason == reason, str(info.value)
    assert "input.seg.dcm" in info.value.message
    if reason == "other_series":
        assert reference.series_uid in info.value.message


def test_liver_seg_against_another_series_names_both():
    reference, _ = _reference(key="not liver")
    data = pathlib.Path(pydicom.data.get_testdata_file("liver_1frame.dcm")).read_bytes()
    with pytest.raises(SegRejected) as info:
        read_seg(data, reference, MAPPING, source="liver_1frame.dcm")
    assert info.value.reason == "other_series"
    assert "1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1" in info.value.message
    assert reference.series_uid in info.value.message


# -- NIfTI ----------------------------------------------------------------------------------------

# NIfTI voxel (a, b, c) <- reference voxel (k, i, j): the usual x = columns, y = rows, z = slices
TO_REFERENCE = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _nifti(reference, labels: np.ndarray, layout: str, version=nibabel.Nifti1Image, compress=False) -> bytes:
    """``labels`` (Z, Y, X on the reference grid) as a NIfTI file, written without highdicom."""
    if layout == "reference-order":  # the array as is, only the affine converted to RAS
        array, affine = labels, LPS_TO_RAS @ reference.affine
    else:  # (X, Y, Z) as most converters write it
        array, affine = labels.transpose(2, 1, 0), LPS_TO_RAS @ reference.affine @ TO_REFERENCE
        if layout == "rows-flipped":  # dcm2niix flips the rows of axial images
            flip = np.eye(4)
            flip[1, 1], flip[1, 3] = -1, array.shape[1] - 1
            array, affine = array[:, ::-1, :], affine @ flip
    data = version(np.ascontiguousarray(array).astype(np.int16), affine).to_bytes()
    return gzip.compress(data) if compress else data


CORNERS = [(0, 0, 0), (5, 0, 0), (0, 15, 0), (0, 0, 13), (5, 15, 13)]


@pytest.mark.parametrize("layout", ["reference-order", "xyz", "rows-flipped"])
@pytest.mark.parametrize("orientation", [S.AXIAL, S.OBLIQUE], ids=["axial", "oblique"])
def test_nifti_mask_on_a_corner_lands_on_the_same_voxels(layout, orientation):
    reference, _ = _reference(orientation, key="nifti")
    labels = np.zeros(reference.shape, np.int16)
    for n, corner in enumerate(CORNERS, start=1):
        labels[corner] = n
    table = {1: "lumen", 2: "wall", 3: "lipid_core", 4: "haemorrhage", 5: "calcification"}
    result = read_nifti_labels(_nifti(reference, labels, layout), reference, table, VALUES, source="mask.nii")
    for n, corner in enumerate(CORNERS, start=1):
        assert result.array[corner] == VALUES[table[n]], corner
    assert np.count_nonzero(result.array) == len(CORNERS)
    assert result.resampled is False and result.outside == 0  # every layout is the same lattice


def test_nifti_2_gzipped_and_unmapped_values_reported():
    reference, _ = _reference(key="nifti2")
    labels = np.zeros(reference.shape, np.int16)
    labels[2, 3:5, 4:6] = 1
    labels[3, 7, 7] = 9
    data = _nifti(reference, labels, "rows-flipped", version=nibabel.Nifti2Image, compress=True)
    result = read_nifti_labels(data, reference, {1: "lumen"}, VALUES)
    np.testing.assert_array_equal(result.array, (labels == 1).astype(np.uint8))
    assert result.mapped == {1: "lumen"} and result.unmapped == {9: "value 9"}


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda ref: b"not a nifti file at all" * 20, "unreadable"),
        (lambda ref: nibabel.Nifti1Image(np.zeros((4, 4, 4, 2), np.int16), np.eye(4)).to_bytes(), "not_labels"),
        (lambda ref: nibabel.Nifti1Image(np.full((4, 4, 4), 0.3, np.float32), np.eye(4)).to_bytes(), "not_labels"),
    ],
    ids=["garbage", "4-d", "probabilities"],
)
def test_nifti_rejection(make, reason):
    reference, _ = _reference(key="nifti-bad")
    with pytest.raises(SegRejected) as info:
        read_nifti_labels(make(reference), reference, {1: "lumen"}, VALUES, source="bad.nii")
    assert info.value.reason == reason and "bad.nii" in info.value.message
