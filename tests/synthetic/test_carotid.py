"""The carotid MR phantom: deterministic bytes, MR DICOM whose geometry and pixels read back,
SeriesDescriptions the plaque config maps to the right sequence, contrasts that order as
documented, visits and growth that follow the documented rates, known misregistration, S3, and
broken series that fail for the documented reason."""

from __future__ import annotations

import csv
import datetime as dt
import fnmatch
import io
import math

import boto3
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest

from medhier.config import PlaqueConfig
from medhier.io import storage
from medhier.io.dicom import DicomRejected, patient_key, read_dataset
from medhier.io.seg import LabelMapping, read_seg
from medhier.io.volume import SeriesRejected, SeriesVolume, read_series
from medhier.plaque import labels as L
from medhier.synthetic import carotid as C
from tests.synthetic.tree import files_under

SALT = "carotid-test-salt"
ARCHIVE = dict(patients=3, seed=11, patient_salt=SALT)


def _series(files: dict[str, bytes], folder: str) -> list[pydicom.Dataset]:
    """The datasets of ``folder`` (e.g. "P0001/V01/T1w"), in InstanceNumber order."""
    datasets = [pydicom.dcmread(io.BytesIO(data)) for path, data in files.items() if path.startswith(folder + "/")]
    return sorted(datasets, key=lambda ds: int(ds.InstanceNumber))


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("carotid"))
    summary = C.generate_plaque_archive(root, broken=True, **ARCHIVE)
    return root, summary, C.plan_plaque_archive(ARCHIVE["patients"], ARCHIVE["seed"]), files_under(root)


@pytest.fixture(scope="module")
def plans():
    """Enough patients (planned, not written) for statistics on rates and visits."""
    return C.plan_plaque_archive(200, seed=5)


# -- determinism and layout ------------------------------------------------------------------------


def test_same_arguments_write_the_same_bytes(archive, tmp_path):
    """Patient p depends on (seed, p) only: a one-patient archive repeats the first patient's
    files byte for byte, and the broken series."""
    _, _, _, files = archive
    again = str(tmp_path / "again")
    C.generate_plaque_archive(again, patients=1, seed=ARCHIVE["seed"], patient_salt=SALT, broken=True)
    repeated = files_under(again)
    shared = [p for p in files if p.startswith(("P0001/", "broken/"))]
    assert shared and sorted(p for p in repeated if p.startswith(("P0001/", "broken/"))) == sorted(shared)
    assert all(repeated[p] == files[p] for p in shared)
    assert repeated["patients.csv"].splitlines()[:2] == files["patients.csv"].splitlines()[:2]


def test_another_seed_draws_other_patients(archive):
    _, _, plans, _ = archive
    other = C.plan_plaque_archive(1, seed=ARCHIVE["seed"] + 1)[0]
    assert other.covariates != plans[0].covariates and other.rates != plans[0].rates
    mine, theirs = (C.render_labels(p.visits[0])[0] for p in (plans[0], other))
    assert (mine != theirs).any()


def test_layout_and_summary(archive):
    root, summary, plans, files = archive
    visits = sum(len(p.visits) for p in plans)
    dicom = [p for p in files if p.startswith("P") and p.endswith(".dcm")]
    assert summary.patients == 3 and summary.visits == visits
    assert summary.series == 4 * visits and summary.segs == visits
    assert summary.files == len(dicom) == 4 * visits * C.SLICES + visits
    assert summary.bytes == sum(len(files[p]) for p in dicom)
    for patient in plans:
        for visit in patient.visits:
            assert f"{patient.folder}/V{visit.index:02d}/SEG/seg.dcm" in files
            for seq in C.SEQUENCES:
                for k in range(1, C.SLICES + 1):
                    assert f"{patient.folder}/V{visit.index:02d}/{seq}/IM{k:04d}.dcm" in files
    for name in ("patients.csv", "truth.parquet", "truth_rates.parquet", "truth_motion.parquet"):
        assert name in files
    assert "3 patients" in summary.table() and "missing_positions" in summary.table()


# -- DICOM ------------------------------------------------------------------------------------------


def test_every_file_reads_back_with_consistent_geometry(archive):
    _, _, plans, files = archive
    for patient in plans:
        study_uids = set()
        for visit in patient.visits:
            rendered = C.render_visit(patient, visit) if patient.index == 1 else None
            per_visit = {}
            for seq in C.SEQUENCES:
                datasets = _series(files, f"{patient.folder}/V{visit.index:02d}/{seq}")
                assert len(datasets) == C.SLICES
                positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
                # contiguous 2 mm slices from head to feet, one in-plane origin
                steps = np.diff(positions, axis=0)
                np.testing.assert_allclose(steps, [[0, 0, -C.SLICE_MM]] * (C.SLICES - 1), atol=1e-6)
                np.testing.assert_allclose(positions, visit.positions(), atol=1e-6)
                for ds in datasets:
                    assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.Modality == "MR"
                    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
                    assert [float(v) for v in ds.PixelSpacing] == [C.PIXEL_MM, C.PIXEL_MM]
                    assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == C.SLICE_MM
                    assert (ds.Rows, ds.Columns) == (C.SIZE, C.SIZE)
                    assert ds.StudyDate == visit.date.strftime("%Y%m%d")
                    assert patient_key(ds.PatientID, ds.IssuerOfPatientID, SALT) == patient.key(SALT)
                if rendered is not None:  # the pixels are the rendered ones
                    np.testing.assert_array_equal(np.stack([ds.pixel_array for ds in datasets]), rendered.images[seq])
                per_visit[seq] = datasets[0]
                assert len({ds.SOPInstanceUID for ds in datasets}) == C.SLICES
                assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
            # one study, one frame of reference, four series per visit
            assert len({ds.StudyInstanceUID for ds in per_visit.values()}) == 1
            assert len({ds.FrameOfReferenceUID for ds in per_visit.values()}) == 1
            assert len({ds.SeriesInstanceUID for ds in per_visit.values()}) == 4
            study_uids.add(per_visit["T1w"].StudyInstanceUID)
        assert len(study_uids) == len(patient.visits)


def _volumes(files: dict[str, bytes], prefix: str) -> dict[str, object]:
    """io.volume.read_series over every file under ``prefix`` -> {source or series folder: result}."""
    instances = [(path, data) for path, data in sorted(files.items()) if path.startswith(prefix)]
    out = {}
    for result in read_series(instances, patient_salt=SALT):
        sources = result.sources
        folders = {path.rsplit("/", 1)[0] + "/" for path in sources}
        unreadable = isinstance(result, SeriesRejected) and result.reason == "unreadable_instance"
        key = sources[0] if unreadable else folders.pop()
        out[key] = result
    return out


def test_every_visit_assembles_into_volumes_and_its_seg_reads_back_to_the_truth(archive):
    _, _, plans, files = archive
    mapping = LabelMapping(
        values={**{name: value for value, name in enumerate(L.NAMES) if value}, "outer_wall": L.WALL},
        patterns=PlaqueConfig().seg_labels,
    )
    for patient in plans:
        for visit in patient.visits:
            folder = f"{patient.folder}/V{visit.index:02d}/"
            results = _volumes(files, folder)
            assert results[folder + "SEG/"].reason == "segmentation"  # a SEG is no image volume
            labels, _ = C.render_labels(visit)
            for seq in C.SEQUENCES:
                volume = results[f"{folder}{seq}/"]
                assert isinstance(volume, SeriesVolume), volume
                assert volume.shape == (C.SLICES, C.SIZE, C.SIZE)
                assert volume.spacing == pytest.approx((C.SLICE_MM, C.PIXEL_MM, C.PIXEL_MM))
                np.testing.assert_allclose(volume.affine[:3, 3], visit.positions()[0], atol=1e-6)
                assert volume.patient_key == patient.key(SALT)
            truth = read_seg(files[folder + "SEG/seg.dcm"], results[f"{folder}T1w/"], mapping)
            assert not truth.unmapped and not truth.resampled and truth.outside == 0
            np.testing.assert_array_equal(truth.array, labels)


def _sequence_of(description: str, patterns: dict[str, list[str]]) -> str | None:
    """The plaque config's rule: the first sequence (in order) with a matching pattern."""
    for seq, globs in patterns.items():
        if any(fnmatch.fnmatchcase(description.upper(), g.upper()) for g in globs):
            return seq
    return None


@pytest.mark.parametrize("sequence", C.SEQUENCES)
def test_series_descriptions_map_to_their_sequence(archive, sequence):
    _, _, _, files = archive
    description = _series(files, f"P0001/V01/{sequence}")[0].SeriesDescription
    assert description == C.SERIES_DESCRIPTIONS[sequence]
    assert _sequence_of(description, PlaqueConfig().sequences) == sequence


# -- contrasts ----------------------------------------------------------------------------------------

# sequence -> [(brighter label, darker label, smallest ratio of their mean intensities)]
CONTRASTS = {
    "T1w": [("haemorrhage", "wall", 1.5), ("wall", "lumen", 4.0), ("wall", "calcification", 3.0)],
    "T2w": [("wall", "lipid_core", 1.5), ("fibrous_cap", "wall", 1.1), ("wall", "lumen", 4.0)],
    "TOF": [("lumen", "haemorrhage", 1.2), ("lumen", "wall", 2.0), ("haemorrhage", "wall", 1.5),
            ("wall", "fibrous_cap", 1.2)],
    "CE-T1w": [("fibrous_cap", "wall", 1.2), ("wall", "lipid_core", 1.3), ("wall", "lumen", 4.0)],
}
ORDER_CASES = [(sequence, *case) for sequence, cases in CONTRASTS.items() for case in cases]


@pytest.fixture(scope="module")
def label_means():
    """Mean noise-free, motion-free intensity of every label's nearly pure voxels in two visits
    with calcification and enough haemorrhage for pure voxels: [{sequence: {label name: mean}}]."""
    chosen = [
        (p, v) for p in C.plan_plaque_archive(40, seed=3) for v in p.visits[-1:]
        if v.state.haemorrhage_mm3 > 8 and p.anatomy.calcification is not None
    ][:2]
    assert len(chosen) == 2
    out = []
    for patient, visit in chosen:
        rendered = C.render_visit(patient, visit, noise=False, motion=False)
        pure = rendered.purity >= 0.8
        means = {}
        for seq in C.SEQUENCES:
            means[seq] = {}
            for value, name in enumerate(L.NAMES):
                voxels = rendered.images[seq][pure & (rendered.labels == value)]
                if voxels.size >= 3:
                    means[seq][name] = float(voxels.mean())
        out.append(means)
    return out


@pytest.mark.parametrize("sequence,brighter,darker,ratio", ORDER_CASES)
def test_component_intensities_order_as_documented(label_means, sequence, brighter, darker, ratio):
    for means in label_means:
        assert means[sequence][brighter] >= ratio * means[sequence][darker]


def test_lipid_core_is_iso_on_t1w_and_does_not_enhance(label_means):
    tissues = ("lipid_core", "wall", "fibrous_cap")
    for means in label_means:
        assert abs(means["T1w"]["lipid_core"] / means["T1w"]["wall"] - 1) < 0.2
        enhancement = {name: means["CE-T1w"][name] / means["T1w"][name] for name in tissues}
        assert enhancement["lipid_core"] < 1.2 < enhancement["wall"] < enhancement["fibrous_cap"]


def test_noise_is_rician_around_the_clean_image():
    patient = C.plan_plaque_archive(1, seed=4)[0]
    visit = patient.visits[0]
    noisy = C.render_visit(patient, visit).images["T1w"].astype(float)
    clean = C.render_visit(patient, visit, noise=False).images["T1w"].astype(float)
    bright = clean > 300  # where Rician noise is nearly Gaussian: SNR >= ~10
    residual = (noisy - clean)[bright]
    assert abs(residual.mean()) < 3
    assert 10 < residual.std() < 40  # muscle 350-500 at SNR 15-25, scaled by the bias field
    dark = clean < 40  # the lumen: magnitude noise never goes below 0 and biases upward
    assert (noisy[dark] - clean[dark]).mean() > 5


# -- misregistration ------------------------------------------------------------------------------------


def _lumen_centroids(image: np.ndarray, positions: np.ndarray, bright: bool) -> np.ndarray:
    """World (x, y) of the lumen's centroid per slice: the TOF's bright disk or a black-blood
    image's dark one, found as the connected blob nearest the image centre."""
    from scipy import ndimage

    out = []
    for k, img in enumerate(image.astype(float)):
        level = np.percentile(img, 99) * 0.6 if bright else np.percentile(img, 50) * 0.35
        blobs, n = ndimage.label(img > level if bright else img < level)
        centres = ndimage.center_of_mass(np.ones_like(img), blobs, range(1, n + 1))
        sizes = ndimage.sum(np.ones_like(img), blobs, range(1, n + 1))
        best = min((c for c, s in zip(centres, sizes) if s > 20), key=lambda c: math.hypot(c[0] - 32, c[1] - 32))
        out.append((positions[k, 0] + best[1] * C.PIXEL_MM, positions[k, 1] + best[0] * C.PIXEL_MM))
    return np.array(out)


def test_sequences_are_misregistered_by_the_recorded_motion(archive):
    _, _, plans, files = archive
    motion = pq.read_table(io.BytesIO(files["truth_motion.parquet"])).to_pylist()
    assert len(motion) == 3 * sum(len(p.visits) for p in plans)
    for row in motion:
        assert 1.0 <= row["rotation_deg"] <= 3.0 + 1e-9
        assert 0.5 <= row["translation_mm"] <= 1.5 + 1e-9
    patient = plans[0]
    visit = patient.visits[0]
    rendered = C.render_visit(patient, visit, noise=False)
    reference = _lumen_centroids(rendered.images["T1w"], rendered.positions, bright=False)
    tof = _lumen_centroids(rendered.images["TOF"], rendered.positions, bright=True)
    key = patient.key(SALT)
    row = next(r for r in motion if (r["patient_key"], r["visit"], r["sequence"]) == (key, 1, "TOF"))
    m = np.array(row["matrix"]).reshape(4, 4)
    # Where the T1w lumen centre moves under the recorded motion, in the middle slices (the ends
    # move through-plane too).
    k = slice(3, 7)
    points = np.column_stack([reference[k], rendered.positions[k, 2], np.ones(4)])
    predicted = (points @ m.T)[:, :2]
    np.testing.assert_allclose(tof[k], predicted, atol=0.35)
    assert np.linalg.norm(tof[k] - reference[k], axis=1).mean() > 0.3  # it did move


# -- patients, visits and rates ----------------------------------------------------------------------


def test_patients_csv_holds_every_patient_by_key_only(archive):
    _, _, plans, files = archive
    rows = list(csv.DictReader(io.StringIO(files["patients.csv"].decode())))
    assert [r["patient_key"] for r in rows] == [p.key(SALT) for p in plans]
    for row, patient in zip(rows, plans):
        cov = patient.covariates
        assert row["sex"] == cov.sex and int(row["age_years"]) == cov.age_years
        assert float(row["systolic_bp_mmhg"]) == cov.systolic_bp_mmhg and int(row["statin"]) == int(cov.statin)
    tables = ("patients.csv", "truth.parquet", "truth_rates.parquet", "truth_motion.parquet")
    texts = b"".join(files[name] for name in tables)
    for patient in plans:
        assert patient.patient_id.encode() not in texts and patient.patient_name.encode() not in texts


def test_visits_come_6_to_36_months_apart(plans, archive):
    gaps = [b.days - a.days for p in plans for a, b in zip(p.visits, p.visits[1:])]
    assert min(gaps) >= round(6 * 30.4375) and max(gaps) <= round(36 * 30.4375)
    counts = np.bincount([len(p.visits) for p in plans])
    assert counts[2] > counts[3] > 0.2 * len(plans)  # two visits, some three
    _, _, written, files = archive
    for patient in written:
        dates = [
            dt.datetime.strptime(_series(files, f"{patient.folder}/V{v.index:02d}/T1w")[0].StudyDate, "%Y%m%d").date()
            for v in patient.visits
        ]
        assert all(183 <= (b - a).days <= 1096 for a, b in zip(dates, dates[1:]))


def test_rate_function_matches_the_documented_formula():
    neutral = C.Covariates("F", 65, 75.0, "never", "none", 130, 80, 5.5, 70, False, False)
    assert C.risk_score(neutral) == pytest.approx(0.0)
    assert C.rate_function(neutral, haemorrhage=False).as_array() == pytest.approx([0.08, 1.0, 2.0, 0.0, -0.04])
    assert C.rate_function(neutral, haemorrhage=True).as_array() == pytest.approx([0.13, 1.8, 2.0, 1.0, -0.04])
    # A 75-year-old male current smoker with systolic 150 on a statin: risk 0.4+0.4+0.8+0.5-0.9 = 1.2
    risky = C.Covariates("M", 75, 75.0, "current", "none", 150, 80, 5.5, 70, True, False)
    assert C.risk_score(risky) == pytest.approx(1.2)
    assert C.rate_function(risky, haemorrhage=True).as_array() == pytest.approx(
        [0.08 + 0.072 + 0.05, 1.0 + 1.2 + 0.8, 2.0 + 2.4 - 1.5, 1.0 + 1.2 + 1.0, -0.04 - 0.048 + 0.05]
    )


def _iph(patient: C.PatientPlan) -> bool:
    return patient.visits[0].state.haemorrhage_mm3 > 0


def test_true_rates_are_the_covariate_function_plus_the_stated_noise(plans):
    clean = [p for p in plans if not p.rates_clipped]
    assert len(clean) > 0.85 * len(plans)
    for p in plans:
        if not _iph(p):
            assert p.rates.haemorrhage_change_mm3_per_year == 0.0
    residuals = np.array(
        [p.rates.as_array() - C.rate_function(p.covariates, _iph(p)).as_array() for p in clean]
    )
    iph = np.array([_iph(p) for p in clean])
    z = residuals / C.RATE_NOISE.as_array()
    for column in range(5):
        values = z[iph, column] if column == 3 else z[:, column]
        assert abs(values.mean()) < 4 / math.sqrt(len(values)), column
        assert 0.8 < values.std() < 1.2, column
    # and the function carries signal a model can learn: the rates spread well beyond the noise
    spread = np.array([C.rate_function(p.covariates, False).as_array() for p in clean]).std(axis=0)
    assert (spread[[0, 1, 2, 4]] > 1.5 * C.RATE_NOISE.as_array()[[0, 1, 2, 4]]).all()


# (rate, geometry column, measured column, largest |measured change - rate x years| allowed:
# the bounds of the module docstring's noise table)
GROWTH_CASES = [
    ("wall_thickening_mm_per_year", "max_wall_mm", "max_wall_thickness_mm", 0.6),
    ("stenosis_change_pct_per_year", "stenosis_pct", "stenosis_area_pct", 9.0),
    ("lipid_growth_mm3_per_year", "lipid_mm3", "lipid_core_volume_mm3", 6.0),
    ("haemorrhage_change_mm3_per_year", "haemorrhage_mm3", "haemorrhage_volume_mm3", 3.0),
    ("cap_thickness_change_mm_per_year", "cap_mm", "min_cap_thickness_mm", 0.6),
]


@pytest.fixture(scope="module")
def truth(archive):
    _, _, _, files = archive
    visits = pq.read_table(io.BytesIO(files["truth.parquet"])).to_pylist()
    rates = {r["patient_key"]: r for r in pq.read_table(io.BytesIO(files["truth_rates.parquet"])).to_pylist()}
    return visits, rates


@pytest.mark.parametrize("rate,geometry,measured,tolerance", GROWTH_CASES)
def test_later_visits_grow_by_rate_times_years(truth, rate, geometry, measured, tolerance):
    visits, rates = truth
    first = {r["patient_key"]: r for r in visits if r["visit"] == 1}
    later = [r for r in visits if r["visit"] > 1]
    assert later
    for row in later:
        base, r = first[row["patient_key"]], rates[row["patient_key"]][rate]
        expected = r * row["years_since_first"]
        assert row[f"geometry_{geometry}"] - base[f"geometry_{geometry}"] == pytest.approx(expected, abs=1e-9)
        assert abs((row[measured] - base[measured]) - expected) <= tolerance


@pytest.fixture(scope="module")
def measured_visits():
    """The truth label maps of 12 patients (no images) measured: [(patient, [measurements per visit])]."""
    return [
        (patient, [C.measure_truth(C.render_labels(visit)[0]) for visit in patient.visits])
        for patient in C.plan_plaque_archive(12, seed=21)
    ]


@pytest.mark.parametrize("rate,geometry,measured,tolerance", GROWTH_CASES)
def test_measured_truth_follows_the_geometry_over_many_visits(measured_visits, rate, geometry, measured, tolerance):
    """Each later visit's measured change against the first equals rate x years within the
    stated tolerance."""
    for patient, values in measured_visits:
        for visit, value in zip(patient.visits[1:], values[1:]):
            expected = getattr(patient.rates, rate) * visit.years
            assert abs((value[measured] - values[0][measured]) - expected) <= tolerance, (patient.index, visit.index)


def test_truth_rates_table(truth, archive):
    _, rates = truth
    _, _, plans, _ = archive
    bounds = {rate: bound for rate, _, _, bound in GROWTH_CASES}
    for patient in plans:
        row = rates[patient.key(SALT)]
        assert row["visits"] == len(patient.visits)
        assert row["rates_clipped"] == patient.rates_clipped
        assert [row[name] for name in C.RATE_MEASUREMENTS] == patient.rates.as_array().tolist()
        # measured from the first to the last visit: the change's bound spread over the years
        for name in C.RATE_MEASUREMENTS:
            assert abs(row[f"measured_{name}"] - row[name]) <= bounds[name] / patient.visits[-1].years


# -- storage --------------------------------------------------------------------------------------------


@pytest.mark.s3
def test_writes_to_s3_the_same_bytes(archive, s3_bucket, storage_cfg):
    _, _, _, files = archive
    out = f"{s3_bucket}/carotid"
    summary = C.generate_plaque_archive(
        out, patients=1, seed=ARCHIVE["seed"], patient_salt=SALT, storage_cfg=storage_cfg
    )
    client = boto3.client("s3", endpoint_url=storage_cfg.s3_endpoint, region_name="us-east-1")
    bucket = s3_bucket.removeprefix("s3://")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    dicom = sorted(k.removeprefix("carotid/") for k in keys if k.endswith(".dcm"))
    assert len(dicom) == summary.files
    # patient 1 depends on (seed, 1) only: the same files as in the 3-patient archive
    for rel in dicom[:: C.SLICES]:
        assert storage.read_bytes(f"{out}/{rel}", storage_cfg) == files[rel]
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(f"{out}/patients.csv", storage_cfg).decode())))
    assert len(rows) == 1


# -- broken series --------------------------------------------------------------------------------------


def test_broken_series_are_listed_with_volume_reasons(archive):
    _, summary, _, files = archive
    assert summary.broken == {
        "broken/duplicate_position/": "duplicate_positions",
        "broken/gap/": "missing_positions",
        "broken/mixed_orientation/": "mixed_orientation",
        "broken/non_dicom_file/notes.txt": "unreadable_instance",
        "broken/truncated_pixels/": "missing_positions",
        "broken/truncated_pixels/IM0006.dcm": "unreadable_instance",
        "broken/unequal_slice_size/": "unequal_slice_size",
    }
    for path in summary.broken:
        assert path.endswith("/") or path in files


def test_broken_series_fail_volume_assembly_for_the_listed_reason(archive):
    _, summary, _, files = archive
    results = _volumes(files, "broken/")
    for path, reason in summary.broken.items():
        assert isinstance(results[path], SeriesRejected) and results[path].reason == reason, path
    # the series beside the text file is complete
    assert isinstance(results["broken/non_dicom_file/"], SeriesVolume)


def _headers(files: dict[str, bytes], kind: str) -> list[pydicom.Dataset]:
    return [
        pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        for path, data in sorted(files.items())
        if path.startswith(f"broken/{kind}/") and path.endswith(".dcm")
    ]


def _z(datasets) -> list[float]:
    return sorted(float(ds.ImagePositionPatient[2]) for ds in datasets)


@pytest.mark.parametrize(
    "kind,check",
    [
        ("gap", lambda h, f: len(h) == 9 and sorted(np.round(np.diff(_z(h)), 6)) == [2.0] * 7 + [4.0]),
        ("duplicate_position", lambda h, f: len(h) == 11 and len(set(_z(h))) == 10),
        ("mixed_orientation", lambda h, f: len({tuple(map(float, ds.ImageOrientationPatient)) for ds in h}) == 2),
        ("unequal_slice_size", lambda h, f: sorted({(ds.Rows, ds.Columns) for ds in h}) == [(48, 48), (64, 64)]),
        ("non_dicom_file", lambda h, f: len(h) == 10 and f["broken/non_dicom_file/notes.txt"].startswith(b"Carotid")),
    ],
)
def test_broken_series_exist_as_described(archive, kind, check):
    _, _, _, files = archive
    headers = _headers(files, kind)
    assert len({ds.SeriesInstanceUID for ds in headers}) == 1
    assert check(headers, files)


def test_truncated_slice_is_cut_inside_its_pixel_data(archive):
    _, _, _, files = archive
    data = files["broken/truncated_pixels/IM0006.dcm"]
    whole = files["broken/truncated_pixels/IM0005.dcm"]
    assert len(data) == len(whole) - C.SIZE * C.SIZE
    with pytest.raises(DicomRejected) as info:
        read_dataset(data, source="IM0006.dcm")
    assert info.value.reason == "corrupt_pixels"


# -- argument checks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [(dict(patients=-1), "patients"), (dict(patients=1, seed=-2), "seed")])
def test_bad_arguments_name_the_argument(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        C.generate_plaque_archive(str(tmp_path), **kwargs)
