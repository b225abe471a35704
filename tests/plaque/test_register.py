"""Rigid registration of a visit's sequences: known motions of a small neck phantom are recovered
within 0.5 voxel and 1 degree, in one contrast and across contrasts; the highdicom <-> SimpleITK
conversion keeps every voxel in place on an oblique grid; transforms survive the visit manifest;
label maps keep their labels; volumes that do not meet are refused by name."""

from __future__ import annotations

import json

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from medhier.plaque.register import (
    RegistrationError,
    RigidTransform,
    overlap_fraction,
    register_rigid,
    resample,
    sitk_to_volume,
    volume_to_sitk,
)
from medhier.synthetic import carotid

FRAME = "1.2.826.0.1.3680043.8.498.1"  # one session's frame of reference
CENTRE = np.array([10.0, -20.0, 50.0])  # the fixed grid's centre, mm LPS
# Axial slices as a DICOM series stacks them: axis 0 slices (2 mm, +z), axis 1 rows (0.5 mm, +y),
# axis 2 columns (0.5 mm, +x).
SHAPE = (14, 64, 64)
AXES = np.array([[0.0, 0.0, 2.0], [0.0, 0.5, 0.0], [0.5, 0.0, 0.0]]).T  # columns: the array axes

# The neck phantom, painted in this order (offsets from CENTRE, mm): an elliptic neck, a muscle,
# two vertebral bodies around a disc, both carotids branching at different heights, a lymph node
# and a gland. Everything but the neck ends or tilts inside the slab, so every motion, along z
# included, changes the image.
STRUCTURES = (
    ("neck", "column", (0.0, 0.0), (13.0, 10.0)),
    ("muscle", "ellipsoid", (-7.0, 2.0, -4.0), (3.5, 3.0, 9.0)),
    ("vertebra", "ellipsoid", (1.0, 6.0, -8.0), (5.0, 3.5, 5.5)),
    ("disc", "ellipsoid", (1.0, 6.0, -1.0), (5.0, 3.5, 1.5)),
    ("vertebra", "ellipsoid", (1.0, 6.0, 6.0), (5.0, 3.5, 5.5)),
    ("lumen", "capsule", ((6.0, -2.0, -20.0), (6.0, -2.0, -3.0)), 3.0),  # right common carotid
    ("lumen", "capsule", ((6.0, -2.0, -3.0), (8.5, 0.5, 20.0)), 2.2),  # internal
    ("lumen", "capsule", ((6.0, -2.0, -3.0), (4.0, -5.0, 20.0)), 1.6),  # external
    ("lumen", "capsule", ((-5.5, -2.5, -20.0), (-5.5, -2.5, 4.0)), 2.8),  # left common carotid
    ("lumen", "capsule", ((-5.5, -2.5, 4.0), (-8.0, 0.0, 20.0)), 2.1),
    ("lumen", "capsule", ((-5.5, -2.5, 4.0), (-3.5, -5.5, 20.0)), 1.5),
    ("node", "ellipsoid", (-3.0, -7.0, 5.0), (3.0, 2.5, 4.0)),
    ("gland", "ellipsoid", (8.5, 5.0, -6.0), (2.5, 3.0, 5.0)),
)
# Four contrasts of one anatomy; each reorders the tissues (none is a monotone map of another).
# TOF: bright inflowing blood, fat-rich neck and marrow moderately bright, saturated muscle and
# disc dark. CE-T1w: black blood, the node and gland enhanced.
CONTRASTS = {
    "T1w": {"background": 0.05, "neck": 0.45, "muscle": 0.6, "vertebra": 0.75, "disc": 0.3, "lumen": 0.95, "node": 0.35, "gland": 0.2},
    "T2w": {"background": 0.05, "neck": 0.8, "muscle": 0.3, "vertebra": 0.5, "disc": 0.95, "lumen": 0.15, "node": 0.6, "gland": 0.9},
    "TOF": {"background": 0.05, "neck": 0.5, "muscle": 0.22, "vertebra": 0.45, "disc": 0.18, "lumen": 1.0, "node": 0.28, "gland": 0.3},
    "CE-T1w": {"background": 0.05, "neck": 0.4, "muscle": 0.65, "vertebra": 0.8, "disc": 0.3, "lumen": 0.1, "node": 0.75, "gland": 0.6},
}
EDGE_MM = 0.3  # soft tissue boundaries: partial volume instead of aliasing
NOISE = 0.03
SLICE_PROFILE = (-0.4, -0.2, 0.0, 0.2, 0.4)  # sub-samples across a slice, in slices


def _distance(points: np.ndarray, kind: str, where, size) -> np.ndarray:
    """Signed distance (mm, negative inside; approximate for ellipses) from the structure's surface."""
    if kind == "capsule":
        start, end = CENTRE + np.asarray(where)
        along = np.clip((points - start) @ (end - start) / np.sum((end - start) ** 2), 0.0, 1.0)
        return np.linalg.norm(points - start - np.outer(along, end - start), axis=1) - size
    rel = points[:, : len(where)] - (CENTRE[: len(where)] + np.asarray(where))
    return (np.sqrt(((rel / np.asarray(size)) ** 2).sum(axis=1)) - 1.0) * min(size)


def phantom(contrast: str, truth: np.ndarray | None = None, *, affine: np.ndarray | None = None,
            shape=SHAPE, seed: int = 0, frame: str | None = FRAME) -> hd.Volume:
    """The phantom in ``contrast`` on a grid (``affine``, ``shape``), its anatomy moved so that
    ``truth`` (4x4, fixed -> moving, as ITK) maps the unmoved phantom's points onto it."""
    affine = _affine() if affine is None else affine
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    table = CONTRASTS[contrast]
    image = np.zeros(len(index))
    # A slice has a thickness: each voxel averages the anatomy across it (a box slice profile),
    # as an MR slice does, instead of point samples that alias the 2 mm slices.
    for across in SLICE_PROFILE:
        points = (index + [across, 0.0, 0.0]) @ affine[:3, :3].T + affine[:3, 3]
        if truth is not None:
            # The moving image at y shows the fixed anatomy at T^-1(y).
            inverse = np.linalg.inv(truth)
            points = points @ inverse[:3, :3].T + inverse[:3, 3]
        sample = np.full(len(points), table["background"])
        for name, kind, where, size in STRUCTURES:
            occ = 1.0 / (1.0 + np.exp(np.clip(_distance(points, kind, where, size) / EDGE_MM, -50, 50)))
            sample = sample * (1 - occ) + table[name] * occ
        image += sample / len(SLICE_PROFILE)
    image = image + np.random.default_rng(seed).normal(0.0, NOISE, image.shape)
    return hd.Volume(image.reshape(shape).astype(np.float32), affine, "PATIENT", frame_of_reference_uid=frame)


def _affine(axes: np.ndarray = AXES, shape=SHAPE, centre=CENTRE) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = axes
    affine[:3, 3] = centre - axes @ ((np.asarray(shape) - 1) / 2)
    return affine


def _truth(angles_deg, translation_mm) -> np.ndarray:
    return RigidTransform(tuple(angles_deg), tuple(translation_mm), tuple(CENTRE)).matrix


def _errors(found: RigidTransform, truth: np.ndarray) -> tuple[np.ndarray, float]:
    """(displacement error at the fixed centre in fixed voxels per array axis, rotation error deg)."""
    centre = np.append(CENTRE, 1.0)
    error_mm = (found.matrix @ centre - truth @ centre)[:3]
    error_voxels = np.linalg.solve(AXES, error_mm)
    relative = Rotation.from_matrix(found.matrix[:3, :3] @ truth[:3, :3].T)
    return error_voxels, float(np.degrees(relative.magnitude()))


# An oblique grid of another resolution: 10 degrees about z and 5 about x, 0.6 mm in-plane, 2.5 mm slices.
OBLIQUE = Rotation.from_euler("zx", [10, 5], degrees=True).as_matrix() @ np.array(
    [[0.0, 0.0, 2.5], [0.0, 0.6, 0.0], [0.6, 0.0, 0.0]]
).T
OBLIQUE_SHAPE = (12, 56, 56)

REGISTRATION_CASES = [
    # (id, moving contrast, angles deg (x, y, z), translation mm, moving grid)
    ("identity-T1w", "T1w", (0, 0, 0), (0, 0, 0), "same"),
    ("identity-T2w", "T2w", (0, 0, 0), (0, 0, 0), "same"),
    ("shift-x-T1w", "T1w", (0, 0, 0), (1.7, 0, 0), "same"),
    ("shift-y-T2w", "T2w", (0, 0, 0), (0, -2.3, 0), "same"),
    ("shift-z-T1w", "T1w", (0, 0, 0), (0, 0, 3.0), "same"),
    ("shift-z-T2w", "T2w", (0, 0, 0), (0, 0, -2.5), "same"),
    ("rotate-z-T1w", "T1w", (0, 0, 6), (0, 0, 0), "same"),
    ("rotate-x-T2w", "T2w", (3, 0, 0), (0, 0, 0), "same"),
    ("rotate-y-T1w", "T1w", (0, -3, 0), (0, 0, 0), "same"),
    ("combined-T1w", "T1w", (2, -2, 4), (1.2, -0.8, 1.5), "same"),
    ("combined-T2w", "T2w", (-2, 2.5, -5), (-1.5, 1.0, -2.0), "same"),
    ("combined-T2w-oblique-grid", "T2w", (1.5, 1, 3), (0.8, 1.2, -1.0), "oblique"),
    ("large-T2w", "T2w", (4, -4, 8), (3.0, -3.0, 4.0), "same"),
    ("identity-TOF", "TOF", (0, 0, 0), (0, 0, 0), "same"),
    ("shift-z-TOF", "TOF", (0, 0, 0), (0, 0, 2.5), "same"),
    ("rotate-z-TOF", "TOF", (0, 0, -5), (0, 0, 0), "same"),
    ("combined-TOF", "TOF", (1.5, -2, 3), (1.0, -1.2, -1.5), "same"),
    ("combined-TOF-oblique-grid", "TOF", (-1, 1.5, -3), (-0.7, 0.9, 1.2), "oblique"),
    ("combined-CE-T1w", "CE-T1w", (-2, 1, 4), (0.9, 1.1, -1.8), "same"),
]


@pytest.fixture(scope="module")
def fixed() -> hd.Volume:
    return phantom("T1w", seed=1)


@pytest.mark.parametrize("contrast, angles, translation, grid", [c[1:] for c in REGISTRATION_CASES],
                         ids=[c[0] for c in REGISTRATION_CASES])
def test_known_motion_is_recovered(fixed, contrast, angles, translation, grid):
    truth = _truth(angles, translation)
    grid_args = {} if grid == "same" else {"affine": _affine(OBLIQUE, OBLIQUE_SHAPE, CENTRE + [0.4, -0.7, 1.1]), "shape": OBLIQUE_SHAPE}
    moving = phantom(contrast, truth, seed=2, **grid_args)
    found = register_rigid(fixed, moving)
    error_voxels, error_deg = _errors(found, truth)
    assert np.all(np.abs(error_voxels) < 0.5), f"error {error_voxels} voxels (slices, rows, columns)"
    assert error_deg < 1.0, f"error {error_deg:.3f} deg"
    assert found.metric is not None and found.metric < 0  # minus the mutual information
    assert found.iterations > 0 and found.stop
    # Resampling with the found transform undoes the motion: the moving image, read on the fixed
    # grid, matches the unmoved phantom in that contrast (noise of two draws: sqrt(2) x 0.03).
    unmoved = phantom(contrast, seed=3)
    back = resample(moving, found, fixed)
    inner = (slice(2, -2), slice(8, -8), slice(8, -8))  # away from edges the motion exposed
    assert np.sqrt(np.mean((back.array[inner] - unmoved.array[inner]) ** 2)) < 0.06


def test_registration_is_reproducible(fixed):
    """Bit-identical transforms from the same inputs, and ITK's global thread default restored."""
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    moving = phantom("T2w", _truth((1, 0, 2), (0.5, 0.5, 0.5)), seed=4)
    assert register_rigid(fixed, moving) == register_rigid(fixed, moving)
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == threads


def test_geometry_initial_aligns_centres_of_different_frames(fixed):
    """Volumes from different frames of reference start from their centres: a 40 mm offset of the
    moving grid (and its anatomy) is taken up by the initialiser, and the 1 mm motion on top is found."""
    offset = np.array([0.0, 0.0, 40.0])
    truth = _truth((0, 0, 0), offset + [1.0, 0.0, 0.0])
    moving = phantom("T1w", truth, affine=_affine(centre=CENTRE + offset), seed=5, frame=None)
    error_voxels, error_deg = _errors(register_rigid(fixed, moving), truth)
    assert np.all(np.abs(error_voxels) < 0.5) and error_deg < 1.0


CONVERSION_CASES = [
    # (id, column vectors of the affine's 3x3, shape); DICOM's slice stacking is left-handed here
    ("axial-left-handed", AXES, (5, 6, 7)),
    ("oblique-anisotropic", OBLIQUE, (5, 6, 7)),
    ("rows-flipped-right-handed", AXES @ np.diag([1.0, -1.0, 1.0]), (4, 3, 2)),
]


@pytest.mark.parametrize("axes, shape", [c[1:] for c in CONVERSION_CASES], ids=[c[0] for c in CONVERSION_CASES])
def test_sitk_conversion_keeps_every_voxel_in_place(axes, shape):
    affine = _affine(axes, shape)
    array = np.arange(np.prod(shape), dtype=np.int16).reshape(shape)
    volume = hd.Volume(array, affine, "PATIENT", frame_of_reference_uid=FRAME)
    image = volume_to_sitk(volume)
    assert image.GetSize() == shape  # SimpleITK's (i, j, k) is the array's [i, j, k]
    for index in [(0, 0, 0), (shape[0] - 1, 0, 0), (0, shape[1] - 1, 0), (1, 2, shape[2] - 1), tuple(n - 1 for n in shape)]:
        assert image[index] == array[index]
        where = volume.map_indices_to_reference(np.array([index]))[0]
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(index), where, atol=1e-9)
    back = sitk_to_volume(image, FRAME)
    np.testing.assert_array_equal(back.array, array)
    np.testing.assert_allclose(back.affine, affine, atol=1e-9)
    assert back.frame_of_reference_uid == FRAME


TRANSFORMS = [
    RigidTransform.identity(),
    RigidTransform((1.25, -2.5, 30.0), (0.1, -7.3, 12.0), (10.0, -20.0, 50.0), metric=-0.8312, iterations=57, stop="Step too small"),
]


@pytest.mark.parametrize("transform", TRANSFORMS, ids=["identity", "registered"])
def test_transform_round_trips_through_the_manifest(transform):
    text = json.dumps(transform.to_dict())
    again = RigidTransform.from_dict(json.loads(text))
    assert again == transform
    np.testing.assert_allclose(again.to_sitk().TransformPoint((1.0, 2.0, 3.0)), transform.matrix[:3] @ [1.0, 2.0, 3.0, 1.0], atol=1e-9)


@pytest.mark.parametrize("data, message", [
    ({"angles_deg": [0, 0], "translation_mm": [0, 0, 0]}, "angles_deg: need 3 finite numbers"),
    ({"angles_deg": [0, 0, 0], "translation_mm": ["1 mm", 0, 0]}, "translation_mm: need 3 finite numbers"),
    ({"angles_deg": [0, 0, 0], "translation_mm": [float("nan"), 0, 0]}, "translation_mm: need 3 finite numbers"),
    ({"angles_deg": [0, 0, 0]}, "missing keys ['translation_mm']"),
    ({"angles_deg": [0, 0, 0], "translation_mm": [0, 0, 0], "scale": 1}, "unknown keys ['scale']"),
])
def test_bad_manifest_entries_fail_by_name(data, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        RigidTransform.from_dict(data)


def test_matrix_follows_itk_convention():
    """2 mm along +x and 90 degrees about z around the origin: a fixed point at (1, 0, 0) is read
    in the moving image at R (1, 0, 0) + t = (0, 1, 0) + (2, 0, 0)."""
    transform = RigidTransform((0.0, 0.0, 90.0), (2.0, 0.0, 0.0))
    np.testing.assert_allclose(transform.matrix[:3] @ [1.0, 0.0, 0.0, 1.0], [2.0, 1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(transform.to_sitk().TransformPoint((1.0, 0.0, 0.0)), [2.0, 1.0, 0.0], atol=1e-12)


LABEL_CASES = [
    # (id, dtype, angles, translation)
    ("uint8-shift", np.uint8, (0, 0, 0), (0.7, -1.3, 2.0)),
    ("int16-rotate", np.int16, (2, -1, 7), (0.3, 0.2, -0.4)),
    ("bool-identity", np.bool_, (0, 0, 0), (0, 0, 0)),
]


@pytest.mark.parametrize("dtype, angles, translation", [c[1:] for c in LABEL_CASES], ids=[c[0] for c in LABEL_CASES])
def test_nearest_resampling_keeps_label_values(fixed, dtype, angles, translation):
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 7, SHAPE).astype(dtype)
    moving = hd.Volume(labels, fixed.affine, "PATIENT", frame_of_reference_uid=FRAME)
    out = resample(moving, RigidTransform(angles, translation, tuple(CENTRE)), fixed, interpolation="nearest")
    assert out.dtype == labels.dtype
    assert set(np.unique(out.array)) <= set(np.unique(labels))
    np.testing.assert_allclose(out.affine, fixed.affine)
    assert out.frame_of_reference_uid == FRAME
    if not any(angles) and not any(translation):
        np.testing.assert_array_equal(out.array, labels)


def test_linear_resampling_interpolates_between_voxels(fixed):
    """Half a column (0.25 mm along +x) reads halfway between neighbouring columns."""
    ramp = np.broadcast_to(np.arange(SHAPE[2], dtype=np.int16), SHAPE).copy()
    moving = hd.Volume(ramp, fixed.affine, "PATIENT")
    out = resample(moving, RigidTransform((0, 0, 0), (0.25, 0, 0)), fixed)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.array[:, :, :-1], ramp[:, :, :-1] + 0.5, atol=1e-5)
    # A bare grid (highdicom.VolumeGeometry) serves as the target as well as a volume.
    np.testing.assert_array_equal(resample(moving, RigidTransform((0, 0, 0), (0.25, 0, 0)), fixed.get_geometry()).array, out.array)


FAR = [
    # (id, moving grid centre offset mm, transform translation mm)
    ("grids-apart", (0.0, 0.0, 200.0), (0.0, 0.0, 0.0)),
    ("transform-moves-away", (0.0, 0.0, 0.0), (0.0, 100.0, 0.0)),
]


@pytest.mark.parametrize("offset, translation", [c[1:] for c in FAR], ids=[c[0] for c in FAR])
def test_volumes_that_do_not_meet_are_refused(fixed, offset, translation):
    moving = phantom("T2w", affine=_affine(centre=CENTRE + offset), seed=6)
    transform = RigidTransform((0, 0, 0), translation, tuple(CENTRE))
    assert overlap_fraction(moving, transform, fixed) == 0.0
    with pytest.raises(RegistrationError, match=r"no_overlap: resample: the moving volume \(centre \(10.0, -20.0, \d+.0\) mm LPS.* does not cover any voxel of the fixed grid") as caught:
        resample(moving, transform, fixed)
    assert caught.value.reason == "no_overlap"
    if not any(translation):
        # Same frame of reference: registration starts from the scanner coordinates and refuses.
        with pytest.raises(RegistrationError, match="no_overlap"):
            register_rigid(fixed, moving)


@pytest.mark.parametrize("case, reason, message", [
    ("constant", "constant", "moving: every voxel is 0.5"),
    ("nan", "non_finite", "moving: 3 voxels are NaN or infinite"),
    ("four-d", "unsupported", r"moving: a single-channel 3-D volume is needed, got array shape \(14, 64, 64, 2\)"),
])
def test_bad_volumes_are_refused_by_name(fixed, case, reason, message):
    if case == "constant":
        moving = fixed.with_array(np.full(SHAPE, 0.5, np.float32))
    elif case == "nan":
        array = fixed.array.copy()
        array[0, 0, :3] = np.nan
        moving = fixed.with_array(array)
    else:
        moving = hd.Volume(np.zeros((*SHAPE, 2), np.float32), fixed.affine, "PATIENT", channels={"OpticalPathIdentifier": ["1", "2"]})
    with pytest.raises(RegistrationError, match=message) as caught:
        register_rigid(fixed, moving)
    assert caught.value.reason == reason


def test_sitk_image_of_wrong_dimension_is_refused():
    with pytest.raises(RegistrationError, match="sitk_to_volume: a 3-D scalar image is needed, got 2-D"):
        sitk_to_volume(sitk.Image(4, 4, sitk.sitkUInt8))


# -- the carotid generator's own visits -------------------------------------------------------------

CAROTID_PATIENTS, CAROTID_SEED = 2, 3  # five visits (the second patient has three), 15 registrations


def _carotid_volume(positions: np.ndarray, image: np.ndarray) -> hd.Volume:
    """A rendered series as medhier.io.volume assembles it: axis 0 slices (head to feet), 1 rows
    (+y), 2 columns (+x), one frame of reference for the visit's sequences."""
    affine = np.eye(4)
    affine[:3, 0] = positions[1] - positions[0]
    affine[:3, 1] = (0.0, carotid.PIXEL_MM, 0.0)
    affine[:3, 2] = (carotid.PIXEL_MM, 0.0, 0.0)
    affine[:3, 3] = positions[0]
    return hd.Volume(image, affine, "PATIENT", frame_of_reference_uid=FRAME)


@pytest.fixture(scope="module")
def carotid_visits() -> dict[str, tuple[dict[str, hd.Volume], np.ndarray, dict[str, np.ndarray]]]:
    """"P0001/V01" -> (sequence -> volume, truth label map on the T1w grid, sequence -> true motion)."""
    out = {}
    for patient in carotid.plan_plaque_archive(CAROTID_PATIENTS, CAROTID_SEED):
        for visit in patient.visits:
            rendered = carotid.render_visit(patient, visit)
            volumes = {seq: _carotid_volume(rendered.positions, rendered.images[seq]) for seq in carotid.SEQUENCES}
            out[f"{patient.folder}/V{visit.index:02d}"] = (volumes, rendered.labels, visit.motion)
    return out


CAROTID_CASES = [  # (visit folder, moving sequence); planning renders nothing
    (f"{patient.folder}/V{visit.index:02d}", seq)
    for patient in carotid.plan_plaque_archive(CAROTID_PATIENTS, CAROTID_SEED)
    for visit in patient.visits
    for seq in carotid.SEQUENCES
    if seq != carotid.REFERENCE
]


@pytest.mark.parametrize("visit, sequence", CAROTID_CASES, ids=[f"{v}-{s}" for v, s in CAROTID_CASES])
def test_carotid_visit_sequences_register_onto_t1w(carotid_visits, visit, sequence):
    """Every sequence of the phantom's visits (bright-lumen TOF included) lands within 0.5 voxel
    along every array axis at every voxel of the vessel, and within 1 degree, of the generator's
    recorded misregistration."""
    volumes, labels, motion = carotid_visits[visit]
    fixed = volumes[carotid.REFERENCE]
    found = register_rigid(fixed, volumes[sequence])
    truth = motion[sequence]
    vessel = fixed.map_indices_to_reference(np.argwhere(labels > 0))
    points = np.column_stack([vessel, np.ones(len(vessel))])
    error_mm = (points @ found.matrix.T - points @ truth.T)[:, :3]
    error_voxels = np.abs(np.linalg.solve(fixed.affine[:3, :3], error_mm.T)).max(axis=1)
    error_deg = float(np.degrees(Rotation.from_matrix(found.matrix[:3, :3] @ truth[:3, :3].T).magnitude()))
    assert np.all(error_voxels < 0.5), f"largest error over the vessel {error_voxels} voxels (slices, rows, columns)"
    assert error_deg < 1.0, f"error {error_deg:.3f} deg"
