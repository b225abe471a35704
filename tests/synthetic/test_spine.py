"""The phantom archive generator: deterministic bytes, a manifest that matches the files, DICOM
that medhier.dicom and pydicom read back exactly, anatomy whose findings are measurable in the
pixels, and broken files that fail for the documented reason."""

from __future__ import annotations

import csv
import io
import os
import re

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless
from scipy import ndimage

from medhier.io import storage
from medhier.synthetic import spine as S
from medhier.config import DataConfig, DicomConfig
from medhier.io.dicom import DicomRejected, decode, patient_key
from medhier.classify.taxonomy import Taxonomy
from tests.synthetic.tree import files_under

SALT = "synthetic-test-salt"
BONE_HU = 150  # above soft tissue and discs (< 100 HU), below cancellous bone (>= 200 HU)
# Small but varied: every encoding kind appears (checked in test_archive_covers_every_encoding).
ARCHIVE = dict(n=36, seed=3, size=64, difficulty=0.3, monochrome1_fraction=0.25, compressed_fraction=0.5)


def _labels(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))


def _stored_hu(data: bytes) -> np.ndarray:
    """HU as a standard reader gets them: pixel_array -> modality LUT, undoing the MONOCHROME1
    reflection about the bone window."""
    ds = pydicom.dcmread(io.BytesIO(data))
    hu = apply_modality_lut(ds.pixel_array, ds)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        hu = 2 * S.BONE_WINDOW[0] - 1 - hu
    return hu


COMPRESSED_KINDS = {RLELossless: "rle", JPEG2000Lossless: "j2k"}
AVAILABLE_KINDS = {"int16", "uint12", "monochrome1"} | {COMPRESSED_KINDS[u] for u in S.compressed_syntaxes()}


def _kind(spec: S.ImageSpec) -> str:
    if spec.photometric == "MONOCHROME1":
        return "monochrome1"
    if spec.transfer_syntax in COMPRESSED_KINDS:
        return COMPRESSED_KINDS[spec.transfer_syntax]
    return "int16" if spec.signed else "uint12"


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("archive"))
    summary = S.generate_archive(root, patient_salt=SALT, **ARCHIVE)
    plan = S.plan_archive(**ARCHIVE)
    return root, summary, plan


# -- determinism ------------------------------------------------------------------------------

DETERMINISM_CASES = [
    # overrides of the second archive, dicom files equal, labels.csv equal
    pytest.param({}, True, True, id="same arguments"),
    pytest.param({"seed": 1}, False, False, id="another seed"),
    pytest.param({"patient_salt": "other"}, True, False, id="another salt changes only the keys"),
    pytest.param({"workers": 2}, True, True, id="two worker processes"),
]


@pytest.mark.parametrize("overrides, same_files, same_labels", DETERMINISM_CASES)
def test_archives_are_byte_identical_for_identical_arguments(tmp_path, overrides, same_files, same_labels):
    base = dict(n=10, seed=0, size=64, monochrome1_fraction=0.3, compressed_fraction=0.5, patient_salt=SALT)
    S.generate_archive(str(tmp_path / "a"), **base)
    S.generate_archive(str(tmp_path / "b"), **{**base, **overrides})
    a, b = files_under(str(tmp_path / "a")), files_under(str(tmp_path / "b"))
    labels_a, labels_b = a.pop("labels.csv"), b.pop("labels.csv")
    assert (labels_a == labels_b) is same_labels
    if same_files:
        assert a == b
    else:
        assert a.keys() != b.keys() or any(a[k] != b.get(k) for k in a)


def test_render_is_deterministic_and_leaves_share_the_patient():
    """Same generator state -> same pixels; another leaf from the same state is the same patient
    with the same noise, so pixels away from the finding are identical."""
    one = S.render("lesion/benign", np.random.default_rng(7), size=96)
    again = S.render("lesion/benign", np.random.default_rng(7), size=96)
    normal = S.render("normal/normal", np.random.default_rng(7), size=96)
    assert np.array_equal(one.hu, again.hu) and np.array_equal(one.finding, again.finding)
    far = ~ndimage.binary_dilation(one.finding, iterations=5)
    assert np.array_equal(one.hu[far], normal.hu[far])
    rng = np.random.default_rng(7)
    first, second = S.render("normal/normal", rng, size=96), S.render("normal/normal", rng, size=96)
    assert not np.array_equal(first.hu, second.hu)  # one generator gives a new patient each call


# -- the manifest -----------------------------------------------------------------------------


def test_labels_csv_lists_every_file_once_with_its_leaf_and_patient_key(archive):
    root, summary, _ = archive
    files = files_under(root)
    with open(os.path.join(root, "labels.csv"), newline="") as f:
        header = next(csv.reader(f))
    assert header == ["path", "main", "sub", "patient_key"]
    rows = _labels(files["labels.csv"])
    dicoms = sorted(p for p in files if p.endswith(".dcm"))
    assert sorted(r["path"] for r in rows) == dicoms
    assert len(rows) == len(dicoms) == ARCHIVE["n"] == summary.files
    assert all(re.fullmatch(r"P\d{4}/ST01/SE01/IM\d{4}\.dcm", r["path"]) for r in rows)

    leaves = set(Taxonomy.from_dict(S.DEFAULT_CLASSES).leaf_names)
    leaf_of_patient: dict[str, set[str]] = {}
    for row in rows:
        leaf = f"{row['main']}/{row['sub']}"
        assert leaf in leaves
        decoded = decode(files[row["path"]], DicomConfig(patient_salt=SALT), source=row["path"])
        assert row["patient_key"] == decoded.meta["patient_key"] != ""
        leaf_of_patient.setdefault(row["patient_key"], set()).add(leaf)
        leaf_of_patient.setdefault(row["path"].split("/")[0], set()).add(leaf)
    assert all(len(found) == 1 for found in leaf_of_patient.values())  # one condition per patient
    assert summary.patients == len({r["path"].split("/")[0] for r in rows})
    assert sum(summary.leaves.values()) == summary.files
    assert summary.bytes == sum(len(files[p]) for p in dicoms)
    table = summary.table()
    assert all(leaf in table for leaf in summary.leaves)


def test_series_structure_and_uids(archive):
    root, _, plan = archive
    by_patient: dict[int, list] = {}
    for spec in plan:
        by_patient.setdefault(spec.patient, []).append(spec)
    assert all(1 <= len(v) <= 3 for v in by_patient.values())
    datasets = [pydicom.dcmread(os.path.join(root, s.path)) for s in plan]
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(plan)
    for specs in by_patient.values():
        same = [datasets[s.index] for s in specs]
        assert len({ds.StudyInstanceUID for ds in same}) == len({ds.SeriesInstanceUID for ds in same}) == 1
        assert [int(ds.InstanceNumber) for ds in same] == list(range(1, len(same) + 1))
    ds = datasets[0]
    assert (ds.Modality, ds.BodyPartExamined, ds.Manufacturer, ds.SOPClassUID) == (
        "CT", "LSPINE", "medhier-phantom", pydicom.uid.CTImageStorage
    )
    assert [float(v) for v in ds.ImageOrientationPatient] == [0, 1, 0, 0, 0, -1]  # sagittal
    assert float(ds.PixelSpacing[0]) == pytest.approx(S.FOV_MM / ARCHIVE["size"])
    assert ds.preamble is not None and ds.file_meta.TransferSyntaxUID is not None


@pytest.mark.parametrize(
    "difficulty, expected_normal",
    [(0.0, 1 / 5), (1.0, 13 / 17)],  # balanced when easy; clinical prevalence when hard
)
def test_difficulty_sets_how_often_patients_are_normal(difficulty, expected_normal):
    plan = S.plan_archive(4000, seed=11, size=64, difficulty=difficulty)
    first = {s.patient: s.leaf for s in plan}
    normal = np.mean([leaf == "normal/normal" for leaf in first.values()])
    assert abs(normal - expected_normal) < 0.04
    assert set(first.values()) == set(S.LEAVES)


# -- DICOM encoding ---------------------------------------------------------------------------


def test_archive_covers_every_encoding(archive):
    _, summary, plan = archive
    assert {_kind(s) for s in plan} == AVAILABLE_KINDS
    assert any(s.multi_window for s in plan)
    assert set(summary.photometrics) == {"MONOCHROME1", "MONOCHROME2"}


@pytest.mark.parametrize("kind", ["int16", "uint12", "rle", "j2k", "monochrome1"])
def test_stored_hu_equal_the_rendered_hu(archive, kind):
    """Every file decodes with medhier.dicom, and a standard reader gets back the rendered HU
    (rounded, clipped to 12 bits), whatever the storage or compression."""
    if kind not in AVAILABLE_KINDS:
        pytest.skip(f"no {kind} encoder installed")
    root, _, plan = archive
    specs = [s for s in plan if _kind(s) == kind]
    assert specs
    for spec in specs:
        with open(os.path.join(root, spec.path), "rb") as f:
            data = f.read()
        decoded = decode(data, source=spec.path)
        assert decoded.pixels.shape == (1, ARCHIVE["size"], ARCHIVE["size"])
        assert decoded.meta["transfer_syntax"] == spec.transfer_syntax
        rendered = spec.render(ARCHIVE["size"], ARCHIVE["difficulty"]).hu
        expected = np.clip(np.rint(rendered), -1024, 3071)
        np.testing.assert_array_equal(_stored_hu(data), expected)


def test_monochrome1_displays_like_monochrome2(archive):
    """A correct reader shows MONOCHROME1 files exactly as their MONOCHROME2 encoding; one that
    ignores MONOCHROME1 sees the negative."""
    root, _, plan = archive
    cfg = DicomConfig(window_order=["file"])
    specs = [s for s in plan if s.photometric == "MONOCHROME1"]
    assert specs
    for spec in specs:
        with open(os.path.join(root, spec.path), "rb") as f:
            inverted = decode(f.read(), cfg).pixels
        phantom = spec.render(ARCHIVE["size"], ARCHIVE["difficulty"])
        as_monochrome2 = spec.encode_phantom(
            phantom, photometric="MONOCHROME2", transfer_syntax=ExplicitVRLittleEndian
        )
        plain = decode(as_monochrome2, cfg).pixels
        np.testing.assert_allclose(inverted, plain, rtol=0, atol=1e-6)
        assert np.abs(inverted - plain).max() < 1e-6 < np.abs(inverted - (1 - plain)).max()


DICOM_BYTES_CASES = [
    # (photometric, transfer syntax, signed, multi_window, bits stored)
    ("MONOCHROME2", ExplicitVRLittleEndian, True, False, 16),
    ("MONOCHROME2", ExplicitVRLittleEndian, False, True, 12),
    ("MONOCHROME2", RLELossless, False, False, 12),
    ("MONOCHROME2", JPEG2000Lossless, True, True, 16),
    ("MONOCHROME1", ExplicitVRLittleEndian, True, False, 16),
    ("MONOCHROME1", RLELossless, True, False, 16),
]


@pytest.mark.parametrize("photometric, syntax, signed, multi_window, bits", DICOM_BYTES_CASES)
def test_dicom_bytes_round_trips_hu_and_window(photometric, syntax, signed, multi_window, bits):
    if syntax != ExplicitVRLittleEndian and syntax not in S.compressed_syntaxes():
        pytest.skip(f"no encoder for {syntax.name} here")
    hu = np.linspace(-1100, 3200, 48 * 40, dtype=np.float32).reshape(48, 40)  # beyond 12 bits
    uids = S.Uids.derive("test", "PHANTOM-9", 1)
    data = S.dicom_bytes(hu, uids=uids, patient_id="PHANTOM-9", photometric=photometric,
                         transfer_syntax=syntax, signed=signed, multi_window=multi_window)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert (ds.BitsStored, ds.PixelRepresentation) == (bits, int(signed))
    assert ds.PhotometricInterpretation == photometric
    assert ds.file_meta.TransferSyntaxUID == syntax and data[128:132] == b"DICM"
    assert (ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType) == (-1024, 1, "HU")
    centers = ds.WindowCenter if ds["WindowCenter"].VM > 1 else [ds.WindowCenter]
    assert [float(c) for c in centers] == ([400.0, 40.0] if multi_window else [400.0])
    np.testing.assert_array_equal(_stored_hu(data), np.clip(np.rint(hu), -1024, 3071))


@pytest.mark.parametrize("kwargs", [
    dict(photometric="MONOCHROME1", signed=False),
    dict(photometric="MONOCHROME1", multi_window=True),
    dict(photometric="RGB"),
    dict(transfer_syntax=pydicom.uid.MPEG2MPML),
])
def test_dicom_bytes_rejects_encodings_it_cannot_make_faithfully(kwargs):
    with pytest.raises(ValueError):
        S.dicom_bytes(np.zeros((8, 8)), uids=S.Uids.derive("t", "p", 1), patient_id="p", **kwargs)


def test_raw_identifiers_never_leave_medhier_dicom(archive):
    root, _, plan = archive
    for spec in plan:
        with open(os.path.join(root, spec.path), "rb") as f:
            data = f.read()
        ds = pydicom.dcmread(io.BytesIO(data))
        raw = [str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber]
        assert all(raw)  # present on purpose
        meta = " ".join(str(v) for v in decode(data).meta.values())
        assert not [value for value in raw if value in meta]


# -- anatomy and findings ---------------------------------------------------------------------

SIZE = 128
SEEDS = range(6)


def _target_body(hu: np.ndarray) -> np.ndarray:
    """The target vertebral body, found in the pixels: among the large bone components left of
    centre (the anterior column), the one nearest the middle row."""
    labels, n = ndimage.label(hu > BONE_HU)
    index = np.arange(1, n + 1)
    area = ndimage.sum_labels(np.ones_like(hu), labels, index)
    rows, cols = np.array(ndimage.center_of_mass(np.ones_like(hu), labels, index)).T
    candidates = (area > 0.25 * area.max()) & (cols < hu.shape[1] / 2)
    best = index[candidates][np.argmin(np.abs(rows[candidates] - hu.shape[0] / 2))]
    return labels == best


def _anterior_posterior_heights(body: np.ndarray) -> tuple[float, float]:
    """Median column heights (pixels) of the anterior (left) and posterior (right) fifths."""
    cols = np.flatnonzero(body.any(0))
    left, right = cols[0], cols[-1]
    fifth = int(0.2 * (right - left + 1))
    heights = body.sum(0)
    anterior, posterior = heights[left : left + fifth + 1], heights[right - fifth : right + 1]
    return float(np.median(anterior)), float(np.median(posterior))


def _pair(leaf: str, seed: int):
    """(normal, leaf) renders of the same patient at the easy end."""
    return (
        S.render("normal/normal", np.random.default_rng(seed), SIZE, difficulty=0.0),
        S.render(leaf, np.random.default_rng(seed), SIZE, difficulty=0.0),
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_normal_body_is_rectangular_and_compression_is_an_anterior_wedge(seed):
    normal, compression = _pair("fracture/compression", seed)
    ant, post = _anterior_posterior_heights(_target_body(normal.hu))
    assert ant / post == pytest.approx(1.0, abs=0.12)
    c_ant, c_post = _anterior_posterior_heights(_target_body(compression.hu))
    assert c_ant / c_post < 0.88 * (ant / post)  # >= 25% anterior loss at difficulty 0
    assert c_post == pytest.approx(post, abs=2)  # the posterior wall keeps its height


@pytest.mark.parametrize("seed", SEEDS)
def test_burst_loses_height_and_pushes_bone_into_the_canal(seed):
    normal, burst = _pair("fracture/burst", seed)
    body = _target_body(normal.hu)
    rows, cols = np.flatnonzero(body.any(1)), np.flatnonzero(body.any(0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1]
    canal = slice(right + 2, right + 2 + int(5 / (S.FOV_MM / SIZE)))  # 2-7 px behind the wall
    assert (normal.hu[top:bottom, canal] > BONE_HU).sum() == 0
    assert (burst.hu[top:bottom, canal] > BONE_HU).sum() >= 2  # retropulsed fragment
    width = right - left + 1
    centre = slice(left + int(0.3 * width), right - int(0.3 * width) + 1)
    height = lambda hu: np.median((hu[top:bottom, centre] > BONE_HU).sum(0))  # noqa: E731
    assert height(burst.hu) < 0.8 * height(normal.hu)


@pytest.mark.parametrize("seed", SEEDS)
def test_lesions_change_only_their_region_and_benign_is_more_uniform(seed):
    normal, benign = _pair("lesion/benign", seed)
    _, malignant = _pair("lesion/malignant", seed)
    interiors = {}
    for name, lesion in (("benign", benign), ("malignant", malignant)):
        diff = np.abs(lesion.hu - normal.hu)
        assert diff[lesion.finding].mean() > 100  # visible inside the body
        far = ~ndimage.binary_dilation(lesion.finding, iterations=6)
        assert diff[far].max() == 0  # and nothing else changes
        interior = ndimage.binary_erosion(lesion.finding, iterations=2)
        assert interior.sum() >= 5
        interiors[name] = lesion.hu[interior].std()
    assert interiors["benign"] < 0.5 * interiors["malignant"]


@pytest.mark.parametrize("leaf", S.LEAVES)
@pytest.mark.parametrize("difficulty", [0.0, 1.0])
def test_finding_mask_is_empty_only_for_normal(leaf, difficulty):
    for seed in range(3):
        phantom = S.render(leaf, np.random.default_rng(seed), size=96, difficulty=difficulty)
        assert phantom.hu.dtype == np.float32 and phantom.hu.shape == phantom.finding.shape == (96, 96)
        assert -1024 <= phantom.hu.min() and phantom.hu.max() <= 3071
        assert phantom.finding.any() == (leaf != "normal/normal")
        assert phantom.leaf == leaf


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: S.render("fracture/pathologic", np.random.default_rng(0)), "fracture/pathologic"),
        (lambda: S.render("normal/normal", np.random.default_rng(0), difficulty=1.5), "difficulty"),
        (
            lambda: S.generate_archive(
                "unused", 2, taxonomy=Taxonomy.from_dict({"normal": ["normal"], "tumour": ["glioma"]})
            ),
            "tumour/glioma",
        ),
        (lambda: S.generate_archive("unused", 2, seed=-1), "seed"),
        (lambda: S.generate_archive("unused", 2, workers=0), "workers"),
        (lambda: S.plan_archive(2, compressed_fraction=1.5), "compressed_fraction"),
    ],
)
def test_bad_arguments_raise_naming_the_problem(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


# -- broken files -----------------------------------------------------------------------------

BROKEN = {
    "broken/truncated.dcm": "corrupt_pixels",
    "broken/notes.txt": "not_dicom",
    "broken/empty.dcm": "not_dicom",
    "broken/report_sr.dcm": "no_pixels",
    "broken/bad_header.dcm": "corrupt_header",
    "broken/mpeg2.dcm": "unsupported_syntax",
    # Garbage in a JPEG 2000 frame is corrupt pixels, unless no JPEG 2000 decoder is installed.
    "broken/j2k_garbage.dcm": (
        "corrupt_pixels" if pydicom.pixels.get_decoder(JPEG2000Lossless).is_available else "unsupported_syntax"
    ),
}


def test_broken_files_are_rejected_for_their_documented_reason(tmp_path):
    expected = S.add_broken_files(str(tmp_path), seed=5)
    assert expected == BROKEN
    pages = storage.list_objects(str(tmp_path), exclude=DataConfig().exclude)
    listed = [info.path for page in pages for info in page]
    assert sorted(listed) == sorted(BROKEN)  # none hidden by the archive lister's exclusions
    for rel, reason in expected.items():
        with open(tmp_path / rel, "rb") as f:
            data = f.read()
        with pytest.raises(DicomRejected) as info:
            decode(data, source=rel)
        assert info.value.reason == reason, f"{rel}: {info.value}"


# -- S3 ---------------------------------------------------------------------------------------


@pytest.mark.s3
def test_archive_to_s3_is_readable_with_boto3(s3_bucket, storage_cfg):
    import boto3

    uri = f"{s3_bucket}/archive"
    summary = S.generate_archive(uri, 7, seed=2, size=64, storage_cfg=storage_cfg, patient_salt=SALT)
    client = boto3.client("s3", endpoint_url=storage_cfg.s3_endpoint, region_name="us-east-1")
    bucket = s3_bucket[len("s3://") :]
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="archive/")["Contents"]}
    labels = _labels(client.get_object(Bucket=bucket, Key="archive/labels.csv")["Body"].read())
    assert keys == {"archive/labels.csv"} | {f"archive/{r['path']}" for r in labels}
    assert len(labels) == summary.files == 7
    first = client.get_object(Bucket=bucket, Key=f"archive/{labels[0]['path']}")["Body"].read()
    decoded = decode(first, DicomConfig(patient_salt=SALT))
    assert decoded.meta["patient_key"] == labels[0]["patient_key"]
    local = S.plan_archive(7, seed=2, size=64)[0].encode(64, 0.3)
    assert first == local  # the same bytes as a local archive
    ds = pydicom.dcmread(io.BytesIO(first))
    assert patient_key(ds.PatientID, ds.IssuerOfPatientID, SALT) == labels[0]["patient_key"]
