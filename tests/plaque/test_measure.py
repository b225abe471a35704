"""medhier.plaque.measure against analytic phantoms: rings, eccentric plaques, caps and stenoses
drawn in millimetres and rasterised at voxel centres; every value within one voxel of the truth.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from medhier.plaque.labels import BACKGROUND, CALCIFICATION, CAP, HAEMORRHAGE, LIPID, LUMEN, WALL
from medhier.plaque.measure import MEASUREMENTS, measure

# The grid's origin sits off the voxel lattice so no phantom is accidentally symmetric about it.
ORIGIN = (0.37, 0.21)  # voxels


def grid(n: int, spacing_yx: tuple[float, float], *, angle_deg: float = 0.0, shift_mm=(0.0, 0.0)):
    """(Y, X) mm coordinates of an n x n slice's voxel centres, in the phantom's own frame: the
    phantom is rotated by ``angle_deg`` and moved by ``shift_mm`` in the image."""
    y = (np.arange(n) - n / 2 + ORIGIN[0]) * spacing_yx[0] - shift_mm[0]
    x = (np.arange(n) - n / 2 + ORIGIN[1]) * spacing_yx[1] - shift_mm[1]
    yy, xx = np.meshgrid(y, x, indexing="ij")
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return c * yy + s * xx, -s * yy + c * xx


def tube(spacing, outer_r, lumen_r, *, lumen_shift=(0.0, 0.0), centre=(0.0, 0.0), nz=5, n=None):
    """A vessel along Z: outer disc ``outer_r`` mm, lumen disc ``lumen_r`` mm (one value, or one per
    slice) shifted by ``lumen_shift`` mm from the outer disc's centre."""
    radii = np.broadcast_to(np.asarray(lumen_r, dtype=float), (nz,))
    n = n or int(2 * (outer_r + 2) / min(spacing[1:])) + 6
    yy, xx = grid(n, spacing[1:])
    yy, xx = yy - centre[0], xx - centre[1]
    labels = np.zeros((nz, n, n), dtype=np.uint8)
    labels[:, np.hypot(yy, xx) < outer_r] = WALL
    for z, r in enumerate(radii):
        labels[z][np.hypot(yy - lumen_shift[0], xx - lumen_shift[1]) < r] = LUMEN
    return labels


def voxel(spacing) -> float:
    """One in-plane voxel, mm: the tolerance 'within one voxel' means."""
    return max(spacing[1:])


# --- concentric rings -------------------------------------------------------------------------

RINGS = [  # (lumen radius, outer radius) mm, spacing (dz, dy, dx) mm
    pytest.param(3.0, 4.5, (2.0, 0.5, 0.5), id="carotid-0.5mm"),
    pytest.param(2.5, 3.4, (3.0, 0.3, 0.3), id="thin-wall-0.3mm"),
    pytest.param(3.0, 5.0, (2.0, 0.4, 0.7), id="anisotropic-0.4x0.7"),
    pytest.param(4.0, 5.2, (1.0, 0.6, 0.35), id="anisotropic-0.6x0.35"),
    pytest.param(2.0, 4.0, (2.0, 1.0, 1.0), id="coarse-1mm"),
]


@pytest.mark.parametrize("r1, r2, spacing", RINGS)
def test_ring_areas_volumes_nwi(r1, r2, spacing):
    m = measure(tube(spacing, r2, r1, nz=4), spacing)
    half = voxel(spacing) / 2
    # Digitised areas: the equivalent-circle radius is within half a voxel of the drawn one.
    assert np.sqrt(m.slices.lumen_area_mm2 / np.pi) == pytest.approx(np.full(4, r1), abs=half)
    assert np.sqrt(m.slices.outer_area_mm2 / np.pi) == pytest.approx(np.full(4, r2), abs=half)
    length = 4 * spacing[0]
    assert m.n_slices == 4 and m.vessel_length_mm == pytest.approx(length)
    assert math.sqrt(m.lumen_volume_mm3 / (np.pi * length)) == pytest.approx(r1, abs=half)
    assert math.sqrt(m.vessel_volume_mm3 / (np.pi * length)) == pytest.approx(r2, abs=half)
    assert m.wall_volume_mm3 == pytest.approx(m.vessel_volume_mm3 - m.lumen_volume_mm3)
    nwi_bounds = (1 - ((r1 + half) / (r2 - half)) ** 2, 1 - ((r1 - half) / (r2 + half)) ** 2)
    assert nwi_bounds[0] < m.mean_nwi < nwi_bounds[1] and m.max_nwi == pytest.approx(m.mean_nwi)
    assert m.stenosis_area_pct == 0 and m.stenosis_diameter_pct == 0
    assert math.isnan(m.min_cap_thickness_mm) and m.lipid_core_volume_mm3 == 0


@pytest.mark.parametrize("r1, r2, spacing", RINGS)
def test_ring_thickness(r1, r2, spacing):
    m = measure(tube(spacing, r2, r1, nz=2), spacing)
    assert m.max_wall_thickness_mm == pytest.approx(r2 - r1, abs=voxel(spacing))
    # The mean over the contour averages the digitisation out: within half a voxel.
    assert m.mean_wall_thickness_mm == pytest.approx(r2 - r1, abs=voxel(spacing) / 2)
    assert m.slices.max_wall_thickness_mm == pytest.approx(np.full(2, m.max_wall_thickness_mm))


# --- eccentric plaque ---------------------------------------------------------------------------

ECCENTRIC = [  # lumen radius, outer radius, lumen shift (dy, dx) mm, spacing
    pytest.param(2.5, 5.0, (1.2, 0.0), (2.0, 0.5, 0.5), id="shift-up"),
    pytest.param(3.0, 5.5, (-0.9, 1.1), (2.0, 0.4, 0.4), id="shift-diagonal"),
    pytest.param(2.0, 4.5, (0.0, -1.5), (2.0, 0.35, 0.6), id="shift-left-anisotropic"),
]


@pytest.mark.parametrize("r1, r2, shift, spacing", ECCENTRIC)
def test_eccentric_plaque_thickness(r1, r2, shift, spacing):
    m = measure(tube(spacing, r2, r1, lumen_shift=shift, nz=2), spacing)
    e = math.hypot(*shift)
    # Outer contour point at angle t: its distance to the lumen circle is |p - c| - r1.
    t = np.linspace(0, 2 * np.pi, 3600, endpoint=False)
    profile = np.hypot(r2 * np.sin(t) - shift[0], r2 * np.cos(t) - shift[1]) - r1
    assert profile.max() == pytest.approx(r2 - r1 + e)
    assert m.max_wall_thickness_mm == pytest.approx(r2 - r1 + e, abs=voxel(spacing))
    assert m.mean_wall_thickness_mm == pytest.approx(profile.mean(), abs=voxel(spacing) / 2)
    assert r2 - r1 - e < m.mean_wall_thickness_mm < r2 - r1 + e


# --- fibrous cap --------------------------------------------------------------------------------


def capped(spacing, r1, cap, *, core=1.5, toward_deg=30.0, half_width_deg=50.0, nz=2):
    """A lumen of radius r1 mm, a fibrous cap ``cap`` mm thick over a lipid core ``core`` mm thick,
    both spanning +-half_width_deg around the direction toward_deg, inside a wall 1 mm beyond."""
    r2 = r1 + cap + core + 1.0
    labels = tube(spacing, r2, r1, nz=nz)
    yy, xx = grid(labels.shape[1], spacing[1:])
    r, angle = np.hypot(yy, xx), np.degrees(np.arctan2(yy, xx))
    sector = np.abs((angle - toward_deg + 180) % 360 - 180) < half_width_deg
    labels[:, sector & (r >= r1) & (r < r1 + cap)] = CAP
    labels[:, sector & (r >= r1 + cap) & (r < r1 + cap + core)] = LIPID
    return labels


CAPS = [  # lumen radius, cap thickness mm, direction deg, spacing
    pytest.param(3.0, 0.6, 30.0, (2.0, 0.3, 0.3), id="thin-cap-0.3mm"),
    pytest.param(3.0, 1.0, 90.0, (2.0, 0.5, 0.5), id="cap-1mm-axis"),
    pytest.param(2.5, 1.5, 135.0, (2.0, 0.4, 0.4), id="cap-1.5mm-diagonal"),
    pytest.param(3.0, 1.2, -60.0, (2.0, 0.35, 0.6), id="cap-anisotropic"),
]


@pytest.mark.parametrize("r1, cap, toward, spacing", CAPS)
def test_fibrous_cap_thickness(r1, cap, toward, spacing):
    m = measure(capped(spacing, r1, cap, toward_deg=toward), spacing)
    assert m.min_cap_thickness_mm == pytest.approx(cap, abs=voxel(spacing))
    assert m.slices.cap_thickness_mm == pytest.approx(np.full(2, m.min_cap_thickness_mm))
    assert m.lipid_core_volume_mm3 > 0 and m.fibrous_cap_volume_mm3 > 0


def test_core_touching_lumen_has_no_cap():
    spacing = (2.0, 0.5, 0.5)
    labels = capped(spacing, 3.0, 1.0)
    labels[labels == CAP] = LIPID  # the core reaches the lumen: a ruptured cap
    assert measure(labels, spacing).min_cap_thickness_mm == 0.0


# --- accuracy over many random shapes: the figures the module docstring states ----------------


def random_ring_errors(rng, spacing) -> tuple[float, float]:
    """(max, mean) wall-thickness errors in voxels of one random eccentric ring: lumen radius 4-9
    voxels, thinnest wall 1-4 voxels, lumen shifted 0-2 voxels, outer centre anywhere in a voxel."""
    v = voxel(spacing)
    r1, wall, e = rng.uniform((4, 1, 0), (9, 4, 2)) * v
    angle = rng.uniform(0, 2 * np.pi)
    shift, r2 = (e * math.sin(angle), e * math.cos(angle)), r1 + wall + e
    centre = tuple(rng.uniform(-0.5, 0.5, 2) * spacing[1:])
    m = measure(tube(spacing, r2, r1, lumen_shift=shift, centre=centre, nz=1), spacing)
    t = np.linspace(0, 2 * np.pi, 3600, endpoint=False)
    profile = np.hypot(r2 * np.sin(t) - shift[0], r2 * np.cos(t) - shift[1]) - r1
    return (m.max_wall_thickness_mm - profile.max()) / v, (m.mean_wall_thickness_mm - profile.mean()) / v


def random_cap_error(rng, spacing) -> float:
    """Cap-thickness error in voxels of one random curved cap 1-3 voxels thick over a core
    spanning 30-120 degrees, in any direction, around a lumen of radius 4-9 voxels."""
    v = voxel(spacing)
    cap, r1 = rng.uniform((1, 4), (3, 9)) * v
    labels = capped(spacing, r1, cap, toward_deg=rng.uniform(-180, 180), half_width_deg=rng.uniform(15, 60), nz=1)
    return (measure(labels, spacing).min_cap_thickness_mm - cap) / v


# Error bounds in voxels, (worst low, worst high) and (median low, median high): the module
# docstring's accuracy figures, with a margin.
STATED_ACCURACY = {
    "max": ((-0.4, 1.0), (-0.1, 0.2)),
    "mean": ((-0.35, 0.2), (-0.15, 0.05)),
    "cap": ((-1.0, 0.4), (-0.35, -0.1)),
}


@pytest.mark.parametrize("spacing_yx", [(0.5, 0.5), (0.4, 0.7), (0.6, 0.35)])
def test_thickness_accuracy_over_random_shapes(spacing_yx):
    rng = np.random.default_rng(18)
    spacing = (2.0, *spacing_yx)
    rings = np.array([random_ring_errors(rng, spacing) for _ in range(100)])
    errors = {"max": rings[:, 0], "mean": rings[:, 1], "cap": np.array([random_cap_error(rng, spacing) for _ in range(100)])}
    for name, ((low, high), (median_low, median_high)) in STATED_ACCURACY.items():
        assert low < errors[name].min() and errors[name].max() < high, name
        assert median_low < np.median(errors[name]) < median_high, name


# --- stenosis -----------------------------------------------------------------------------------

STENOSES = [  # reference lumen radius, narrowest lumen radius, mm; spacing
    pytest.param(3.0, 1.5, (2.0, 0.4, 0.4), id="50pct-diameter"),
    pytest.param(3.5, 1.0, (2.0, 0.3, 0.3), id="severe"),
    pytest.param(3.0, 2.4, (1.5, 0.5, 0.35), id="mild-anisotropic"),
]


@pytest.mark.parametrize("r_ref, r_min, spacing", STENOSES)
def test_stenosis_against_the_least_diseased_slice(r_ref, r_min, spacing):
    radii = [r_ref, r_ref, r_ref, r_min, r_ref, r_ref]
    m = measure(tube(spacing, r_ref + 1.5, radii, nz=6), spacing)
    assert m.most_stenosed_slice == 3 and m.reference_slice != 3
    half = voxel(spacing) / 2
    assert math.sqrt(m.min_lumen_area_mm2 / np.pi) == pytest.approx(r_min, abs=half)
    assert math.sqrt(m.reference_lumen_area_mm2 / np.pi) == pytest.approx(r_ref, abs=half)
    # Truth, and its range when both radii are off by up to half a voxel the bad way or the good way.
    for column, power in (("stenosis_area_pct", 2), ("stenosis_diameter_pct", 1)):
        truth = 100 * (1 - (r_min / r_ref) ** power)
        low, high = (100 * (1 - ((r_min + s * half) / (r_ref - s * half)) ** power) for s in (1, -1))
        assert low < getattr(m, column) < high, (column, truth)
    assert m.stenosis_diameter_pct == pytest.approx(100 * (1 - math.sqrt(m.min_lumen_area_mm2 / m.reference_lumen_area_mm2)))


def test_stenosis_against_a_given_reference_slice():
    spacing = (2.0, 0.4, 0.4)
    labels = tube(spacing, 4.5, [3.0, 2.5, 2.0, 1.5], nz=4)
    m = measure(labels, spacing, reference_slice=1)
    assert m.reference_slice == 1 and m.most_stenosed_slice == 3
    assert m.reference_lumen_area_mm2 == pytest.approx(m.slices.lumen_area_mm2[1])
    assert measure(labels, spacing, reference_slice=3).stenosis_area_pct == 0.0
    assert measure(labels, spacing).reference_slice == 0  # the widest lumen: the smallest NWI


def test_occluded_slice_is_full_stenosis():
    spacing = (2.0, 0.5, 0.5)
    m = measure(tube(spacing, 4.0, [3.0, 3.0, 0.0], nz=3), spacing)
    assert m.stenosis_area_pct == 100.0 and m.stenosis_diameter_pct == 100.0
    assert m.slices.nwi[2] == 1.0 and math.isnan(m.slices.max_wall_thickness_mm[2])
    assert m.max_nwi == 1.0 and not math.isnan(m.max_wall_thickness_mm)


# --- component volumes --------------------------------------------------------------------------

BOXES = [  # component, box in voxels (z, y, x) placed inside the wall
    pytest.param(LIPID, (3, 2, 4), id="lipid"),
    pytest.param(HAEMORRHAGE, (2, 3, 3), id="haemorrhage"),
    pytest.param(CALCIFICATION, (1, 2, 2), id="calcification"),
    pytest.param(CAP, (4, 1, 5), id="fibrous-cap"),
]


@pytest.mark.parametrize("spacing", [(2.0, 0.5, 0.5), (1.2, 0.3, 0.45)])
@pytest.mark.parametrize("component, box", BOXES)
def test_component_volume_is_voxels_times_voxel_volume(component, box, spacing):
    labels = tube(spacing, 5.0, 2.0, nz=5)
    y0 = labels.shape[1] // 2 + int(2.3 / spacing[1])  # inside the wall, above the lumen
    x0 = labels.shape[2] // 2 - box[2] // 2
    labels[1 : 1 + box[0], y0 : y0 + box[1], x0 : x0 + box[2]] = component
    m = measure(labels, spacing)
    voxel_mm3 = spacing[0] * spacing[1] * spacing[2]
    name = {LIPID: "lipid_core", HAEMORRHAGE: "haemorrhage", CALCIFICATION: "calcification", CAP: "fibrous_cap"}
    for other, column in name.items():
        expected = math.prod(box) * voxel_mm3 if other == component else 0.0
        assert getattr(m, f"{column}_volume_mm3") == pytest.approx(expected)
    assert m.wall_volume_mm3 == pytest.approx(m.vessel_volume_mm3 - m.lumen_volume_mm3)


# --- invariance ---------------------------------------------------------------------------------


def plaque(spacing, *, angle_deg=0.0, shift_mm=(0.0, 0.0), n=44):
    """Every label at once: an eccentric lumen narrowing along Z, a lipid core under a cap, a
    haemorrhage and a calcification, in the phantom frame rotated/moved as :func:`grid` says."""
    labels = np.zeros((6, n, n), dtype=np.uint8)
    yy, xx = grid(n, spacing[1:], angle_deg=angle_deg, shift_mm=shift_mm)
    r = np.hypot(yy - 0.5, xx)  # from the lumen's centre, 0.5 mm off the outer disc's
    theta = np.degrees(np.arctan2(yy - 0.5, xx))
    for z, lumen_r in enumerate([3.0, 2.8, 2.4, 1.9, 2.3, 2.9]):
        s = labels[z]
        s[np.hypot(yy, xx) < 5.5] = WALL
        s[(np.abs(theta + 135) < 40) & (r >= lumen_r) & (r < lumen_r + 0.8)] = CAP
        s[(np.abs(theta + 135) < 40) & (r >= lumen_r + 0.8) & (r < lumen_r + 2.0)] = LIPID
        s[(np.abs(theta - 45) < 25) & (r >= lumen_r + 0.5) & (r < lumen_r + 1.5)] = HAEMORRHAGE
        s[(np.abs(theta - 135) < 15) & (r >= lumen_r + 0.6) & (r < lumen_r + 1.4)] = CALCIFICATION
        s[r < lumen_r] = LUMEN
    return labels


MOVES = [  # (labels, spacing) -> (moved labels, their spacing); whether slice indices run backwards
    pytest.param(lambda a, sp: (a[::-1], sp), True, id="reversed-slices"),
    pytest.param(lambda a, sp: (np.rot90(a, 1, axes=(1, 2)), (sp[0], sp[2], sp[1])), False, id="rot90"),
    pytest.param(lambda a, sp: (np.rot90(a, 2, axes=(1, 2)), sp), False, id="rot180"),
    pytest.param(lambda a, sp: (np.rot90(a, 3, axes=(1, 2)), (sp[0], sp[2], sp[1])), False, id="rot270"),
    pytest.param(lambda a, sp: (a[:, ::-1], sp), False, id="flip-y"),
    pytest.param(lambda a, sp: (a[:, :, ::-1], sp), False, id="flip-x"),
    pytest.param(lambda a, sp: (np.roll(np.pad(a, ((0, 0), (5, 5), (5, 5))), (3, -4), axis=(1, 2)), sp), False, id="shift"),
]
SLICE_INDICES = ("reference_slice", "most_stenosed_slice")


@pytest.mark.parametrize("move, reverses_z", MOVES)
def test_rigid_moves_give_the_same_scalars(move, reverses_z):
    spacing = (2.0, 0.4, 0.55)  # anisotropic: a 90 degree turn must swap dy and dx
    labels = plaque(spacing)
    before = measure(labels, spacing).to_dict()
    after = measure(*move(labels, spacing)).to_dict()
    for name in SLICE_INDICES:
        assert after[name] == (labels.shape[0] - 1 - before[name] if reverses_z else before[name])
    rest = [name for name in MEASUREMENTS if name not in SLICE_INDICES]
    assert [after[k] for k in rest] == pytest.approx([before[k] for k in rest], rel=1e-9, nan_ok=True)


# The regions each area or volume column counts: a rigid move re-rasterises them along their
# contours, so each may change by about half its contour voxels (half a voxel of contour movement).
REGIONS = {
    "lumen_volume_mm3": lambda a: a == LUMEN,
    "vessel_volume_mm3": lambda a: a > BACKGROUND,
    "wall_volume_mm3": lambda a: a >= WALL,
    "lipid_core_volume_mm3": lambda a: a == LIPID,
    "haemorrhage_volume_mm3": lambda a: a == HAEMORRHAGE,
    "calcification_volume_mm3": lambda a: a == CALCIFICATION,
    "fibrous_cap_volume_mm3": lambda a: a == CAP,
    "reference_lumen_area_mm2": lambda a: a[0] == LUMEN,  # slice 0 (see the assert below)
    "min_lumen_area_mm2": lambda a: a[3] == LUMEN,
}
# Differences of ratios of those areas, at this phantom's size: a few % of stenosis, NWI 0.02.
RATIO_TOLERANCE = {"%": 5.0, "1": 0.02}


def contour_voxels(mask: np.ndarray) -> int:
    """Voxels of ``mask`` with an in-plane face neighbour outside it: the ones a move can flip."""
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndi.generate_binary_structure(2, 1)
    structure = in_plane if mask.ndim == 3 else in_plane[1]
    return int((mask & ~ndi.binary_erosion(mask, structure)).sum())


@pytest.mark.parametrize("angle, shift", [(7.0, (0.13, -0.31)), (-23.0, (0.4, 0.2)), (61.0, (-0.25, 0.05))])
def test_small_rotation_changes_scalars_within_tolerance(angle, shift):
    spacing = (2.0, 0.4, 0.4)
    labels = plaque(spacing)
    before = measure(labels, spacing)
    after = measure(plaque(spacing, angle_deg=angle, shift_mm=shift), spacing)
    assert (after.reference_slice, after.most_stenosed_slice) == (before.reference_slice, before.most_stenosed_slice) == (0, 3)
    for name, (unit, _) in MEASUREMENTS.items():
        a, b = getattr(after, name), getattr(before, name)
        if name in REGIONS:
            size = spacing[1] * spacing[2] * (spacing[0] if unit == "mm3" else 1.0)
            assert a == pytest.approx(b, abs=contour_voxels(REGIONS[name](labels)) * size / 2), name
        elif name == "mean_wall_thickness_mm":
            assert a == pytest.approx(b, abs=voxel(spacing) / 2), name
        elif unit == "mm":
            assert a == pytest.approx(b, abs=voxel(spacing)), name
        elif unit in RATIO_TOLERANCE:
            assert a == pytest.approx(b, abs=RATIO_TOLERANCE[unit]), name
        else:
            assert a == b, name


# --- several vessels, none, bad input -----------------------------------------------------------


def test_two_vessels_measure_the_larger():
    spacing = (2.0, 0.5, 0.5)
    big = tube(spacing, 4.5, 3.0, centre=(0.0, -6.0), n=48)
    small = tube(spacing, 2.5, 1.5, centre=(0.0, 6.5), n=48)
    both = np.maximum(big, small)
    m = measure(both, spacing)
    alone = measure(big, spacing).to_dict()
    assert m.n_vessels == 2 and alone["n_vessels"] == 1
    assert {k: v for k, v in m.to_dict().items() if k != "n_vessels"} == pytest.approx(
        {k: v for k, v in alone.items() if k != "n_vessels"}, nan_ok=True
    )


def test_empty_map_gives_empty_measurements():
    m = measure(np.zeros((4, 16, 16), dtype=np.uint8), (2.0, 0.5, 0.5))
    row = m.to_dict()
    assert (m.n_slices, m.n_vessels, m.reference_slice, m.most_stenosed_slice) == (0, 0, -1, -1)
    assert [row[k] for k in MEASUREMENTS if k.endswith("_mm3")] == [0.0] * 7
    assert all(math.isnan(row[k]) for k in MEASUREMENTS if MEASUREMENTS[k][0] in ("mm2", "%", "1") or k.endswith("thickness_mm"))
    assert all(np.isnan(getattr(m.slices, f)).all() and getattr(m.slices, f).shape == (4,) for f in vars(m.slices))


def test_columns_are_the_documented_table():
    spacing = (2.0, 0.5, 0.5)
    row = measure(plaque(spacing), spacing).to_dict()
    assert list(row) == list(MEASUREMENTS)
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row.values())
    assert all(unit and meaning for unit, meaning in MEASUREMENTS.values())
    assert all(not math.isnan(v) for v in row.values())  # this phantom has every label


GOOD = np.zeros((2, 8, 8), dtype=np.uint8)
GOOD[:, 2:6, 2:6] = WALL
GOOD[:, 3:5, 3:5] = LUMEN
MALFORMED = [  # labels, spacing, keyword arguments, words the error must name
    pytest.param(GOOD[0], (0.5, 0.5, 0.5), {}, "3-D", id="2-D"),
    pytest.param(GOOD[None], (0.5, 0.5, 0.5), {}, "3-D", id="4-D"),
    pytest.param(GOOD.astype(float), (2, 0.5, 0.5), {}, "float64", id="float"),
    pytest.param(GOOD > 0, (2, 0.5, 0.5), {}, "bool", id="bool-mask"),
    pytest.param(np.where(GOOD == LUMEN, 7, GOOD), (2, 0.5, 0.5), {}, "[7]", id="label-7"),
    pytest.param(GOOD.astype(np.int16) - 1, (2, 0.5, 0.5), {}, "[-1]", id="label-negative"),
    pytest.param(GOOD, (0.5, 0.5), {}, "spacing", id="spacing-2"),
    pytest.param(GOOD, (2, 0, 0.5), {}, "spacing", id="spacing-zero"),
    pytest.param(GOOD, (2, 0.5, -0.5), {}, "spacing", id="spacing-negative"),
    pytest.param(GOOD, (2, float("nan"), 0.5), {}, "spacing", id="spacing-nan"),
    pytest.param(GOOD, "abc", {}, "spacing", id="spacing-text"),
    pytest.param(GOOD, 0.5, {}, "spacing", id="spacing-scalar"),
    pytest.param(GOOD, (2, 0.5, 0.5), {"reference_slice": 2}, "reference_slice", id="reference-outside"),
    pytest.param(GOOD, (2, 0.5, 0.5), {"reference_slice": 1.0}, "reference_slice", id="reference-float"),
]


@pytest.mark.parametrize("labels, spacing, kwargs, words", MALFORMED)
def test_malformed_input_is_named(labels, spacing, kwargs, words):
    with pytest.raises(ValueError, match=r"^(labels|spacing|reference_slice): ") as err:
        measure(labels, spacing, **kwargs)
    assert words in str(err.value)


def test_reference_slice_without_vessel_is_named():
    labels = np.concatenate([np.zeros((1, 8, 8), dtype=np.uint8), GOOD])
    with pytest.raises(ValueError, match=r"reference_slice: slice 0 holds no measured vessel \(it is in slices 1..2\)"):
        measure(labels, (2, 0.5, 0.5), reference_slice=0)
