"""One visit's plaque measurements, in millimetres, from an exclusive label map
(:mod:`medhier.plaque.labels`): the row a visit contributes to the change rates.

:func:`measure` takes ``labels`` of shape ``(Z, Y, X)`` (axial slices along Z, the vessel running
roughly along Z) and ``spacing`` ``(dz, dy, dx)`` in mm, and returns :class:`Measurements`: the
scalar columns of :data:`MEASUREMENTS` (``to_dict()``, one Parquet row) and per-slice arrays
(:class:`SliceMeasurements`) for plots and checks.

Definitions
-----------
* **Vessel.** ``labels > 0`` is the region inside the outer wall contour. Its 3-D connected
  components (26-connected, so a thin vessel stepping diagonally between slices stays one) are
  counted in ``n_vessels``; only the largest (most voxels) is measured, every other voxel is
  ignored. Segmentation specks count as vessels: ``n_vessels > 1`` is worth a look.
* **Areas and volumes** are voxel counts times the pixel area ``dy * dx`` or the voxel volume
  ``dz * dy * dx``. Outer-wall area/volume counts every non-zero voxel; wall = outer - lumen (the
  wall with all its plaque components); each component (lipid core, haemorrhage, calcification,
  fibrous cap) is its own label's count.
* **NWI** (normalised wall index) of a slice = wall area / outer-wall area; 1 where the slice has
  no lumen (occluded).
* **Wall thickness** is in-plane, per slice: at every outer-contour voxel (a vessel voxel with a
  face neighbour outside the vessel), the distance from its centre to the centre of the nearest
  lumen voxel (``scipy.ndimage.distance_transform_edt`` with ``sampling=(dy, dx)``). Both centres
  are the last ones inside their region, so each lies, on average, half a voxel inside its contour
  and the two offsets cancel: on a straight wall of n voxels the value is exactly n voxels, with
  no correction term. Each contour voxel's value is averaged with the contour voxels of its 3 x 3
  neighbourhood, so one staircase step of a digitised contour does not set the maximum. The
  slice's maximum and mean over its outer contour are reported; NaN on a slice without lumen.
* **Fibrous-cap thickness** of a slice: the shortest in-plane straight-line distance from the lumen
  to the lipid core, built the same way: at every non-core voxel that touches the core (face
  neighbour), the distance to the nearest lumen voxel centre, averaged over 3 x 3 as above; the
  minimum. 0 where the core lies against the lumen (over a few voxels: one touching voxel alone
  is averaged up by its neighbours); NaN on a slice without lumen or without lipid core. Reported
  as the minimum over slices.
* **Accuracy** (``tests/plaque/test_measure.py::test_thickness_accuracy_over_random_shapes``: 300
  eccentric rings, lumen radius 4-9 voxels, thinnest wall 1-4 voxels, lumen shift 0-2 voxels, and
  300 curved caps 1-3 voxels thick, at random sub-voxel positions; 0.5 x 0.5, 0.4 x 0.7 and
  0.6 x 0.35 mm pixels), error in voxels (the larger pixel side), median [5 %, 95 %] (worst):
  mean wall thickness -0.10 [-0.18, +0.02] (-0.28..+0.10); max wall thickness +0.09 [-0.13, +0.51]
  (-0.32..+0.78); cap thickness -0.26 [-0.67, +0.03] (-0.84..+0.37). An extreme over a contour
  picks the spot where digitisation widens the wall (max) or thins the cap (min) most; where a
  contour runs along a grid axis the digitised edge is a flat run that hides up to a voxel.
* **Stenosis.** The most stenosed slice is the one with the smallest lumen area; the reference
  slice is ``reference_slice`` when given, otherwise the least diseased slice: the smallest NWI
  (ties: the lowest index). Area stenosis = 100 * (1 - A_min / A_ref); diameter stenosis =
  100 * (1 - D_min / D_ref) with D = 2 * sqrt(A / pi), the lumen's equivalent-circle diameter, so
  it equals 100 * (1 - sqrt(A_min / A_ref)). NaN when the reference slice has no lumen.

An empty label map (no vessel) gives ``n_slices == 0``, volumes 0, slice indices -1 and NaN
elsewhere; a malformed input raises ``ValueError`` naming the input and the problem.

Columns (``Measurements.to_dict()``)
-------------------------------------
See :data:`MEASUREMENTS` (column -> (unit, meaning)); the README and the report schema read it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from medhier.plaque.labels import BACKGROUND, COMPONENTS, LIPID, LUMEN, NAMES

__all__ = ["MEASUREMENTS", "Measurements", "SliceMeasurements", "measure"]

MEASUREMENTS: dict[str, tuple[str, str]] = {
    "n_vessels": ("count", "separate vessels found: 3-D connected components (26-connected) of labels > 0; the largest is measured"),
    "n_slices": ("count", "slices holding the measured vessel; 0 when there is none (volumes are then 0, indices -1, the rest NaN)"),
    "vessel_length_mm": ("mm", "n_slices * dz, the length of vessel measured"),
    "reference_slice": (
        "index",
        "0-based Z index stenosis is measured against: as given, else the slice with the smallest NWI (ties: lowest index); "
        "-1 without vessel",
    ),
    "most_stenosed_slice": ("index", "0-based Z index of the slice with the smallest lumen area (ties: lowest); -1 without vessel"),
    "lumen_volume_mm3": ("mm3", "lumen volume (label lumen)"),
    "vessel_volume_mm3": ("mm3", "volume inside the outer wall contour (labels > 0)"),
    "wall_volume_mm3": ("mm3", "vessel - lumen volume: the wall with all its plaque components"),
    "lipid_core_volume_mm3": ("mm3", "lipid-rich necrotic core volume (label lipid_core)"),
    "haemorrhage_volume_mm3": ("mm3", "intraplaque haemorrhage volume (label haemorrhage)"),
    "calcification_volume_mm3": ("mm3", "calcification volume (label calcification)"),
    "fibrous_cap_volume_mm3": ("mm3", "fibrous cap volume (label fibrous_cap)"),
    "reference_lumen_area_mm2": ("mm2", "lumen area of the reference slice"),
    "min_lumen_area_mm2": ("mm2", "lumen area of the most stenosed slice"),
    "stenosis_area_pct": ("%", "100 * (1 - min lumen area / reference lumen area)"),
    "stenosis_diameter_pct": ("%", "100 * (1 - D_min / D_ref), D = 2 * sqrt(lumen area / pi) the equivalent-circle diameter"),
    "mean_nwi": ("1", "mean over slices of the normalised wall index, wall area / outer-wall area"),
    "max_nwi": ("1", "largest per-slice normalised wall index"),
    "mean_wall_thickness_mm": ("mm", "mean over slices of each slice's mean in-plane wall thickness (outer contour to lumen)"),
    "max_wall_thickness_mm": ("mm", "largest in-plane wall thickness (outer contour to lumen) of any slice"),
    "min_cap_thickness_mm": ("mm", "smallest in-plane distance from lumen to lipid core of any slice; NaN without lipid core"),
}

# In-plane face neighbours: a contour voxel is one with a face neighbour on the other side.
_FACES = ndi.generate_binary_structure(2, 1)
# 26-connectivity in 3-D: a thin vessel stepping diagonally from slice to slice stays one vessel.
_VESSEL_CONNECTIVITY = ndi.generate_binary_structure(3, 3)


@dataclass(frozen=True, eq=False)
class SliceMeasurements:
    """Per-slice values, each an array of shape (Z,), NaN where the slice holds no measured vessel
    (the thicknesses also where they are undefined: no lumen, no lipid core)."""

    lumen_area_mm2: np.ndarray
    outer_area_mm2: np.ndarray  # the area inside the outer wall contour
    wall_area_mm2: np.ndarray
    nwi: np.ndarray
    max_wall_thickness_mm: np.ndarray
    mean_wall_thickness_mm: np.ndarray
    cap_thickness_mm: np.ndarray


@dataclass(frozen=True, eq=False)
class Measurements:
    """One vessel's measurements: the columns of :data:`MEASUREMENTS` plus per-slice arrays."""

    n_vessels: int
    n_slices: int
    vessel_length_mm: float
    reference_slice: int
    most_stenosed_slice: int
    lumen_volume_mm3: float
    vessel_volume_mm3: float
    wall_volume_mm3: float
    lipid_core_volume_mm3: float
    haemorrhage_volume_mm3: float
    calcification_volume_mm3: float
    fibrous_cap_volume_mm3: float
    reference_lumen_area_mm2: float
    min_lumen_area_mm2: float
    stenosis_area_pct: float
    stenosis_diameter_pct: float
    mean_nwi: float
    max_nwi: float
    mean_wall_thickness_mm: float
    max_wall_thickness_mm: float
    min_cap_thickness_mm: float
    slices: SliceMeasurements

    def to_dict(self) -> dict[str, float | int]:
        """The scalar columns, in :data:`MEASUREMENTS` order: one visit's Parquet row."""
        return {name: getattr(self, name) for name in MEASUREMENTS}


def measure(labels: np.ndarray, spacing: Sequence[float], *, reference_slice: int | None = None) -> Measurements:
    """Measure the largest vessel of an exclusive label map.

    ``labels``: integer array (Z, Y, X) with values 0..6 (:mod:`medhier.plaque.labels`);
    ``spacing``: (dz, dy, dx) in mm; ``reference_slice``: the Z index stenosis is measured against
    (default: the slice with the smallest NWI). Definitions in the module docstring.
    """
    labels, (dz, dy, dx) = _checked(labels, spacing)
    vessel, n_vessels = _largest_vessel(labels)
    slices = _per_slice(vessel, (dy, dx))
    present = ~np.isnan(slices.outer_area_mm2)
    reference = _reference(slices.nwi, present, reference_slice)
    volumes = _volumes(vessel, dz * dy * dx)
    return Measurements(
        n_vessels=n_vessels,
        n_slices=int(present.sum()),
        vessel_length_mm=float(present.sum() * dz),
        **_stenosis(slices.lumen_area_mm2, present, reference),
        **volumes,
        mean_nwi=_reduce(np.nanmean, slices.nwi),
        max_nwi=_reduce(np.nanmax, slices.nwi),
        mean_wall_thickness_mm=_reduce(np.nanmean, slices.mean_wall_thickness_mm),
        max_wall_thickness_mm=_reduce(np.nanmax, slices.max_wall_thickness_mm),
        min_cap_thickness_mm=_reduce(np.nanmin, slices.cap_thickness_mm),
        slices=slices,
    )


def _checked(labels: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The label map as an array and the spacing as 3 floats, or ValueError naming the problem."""
    arr = np.asarray(labels)
    if arr.ndim != 3:
        raise ValueError(f"labels: need a 3-D (Z, Y, X) label map, got shape {arr.shape} ({arr.ndim}-D)")
    if not np.issubdtype(arr.dtype, np.integer):
        known = f"values 0..{len(NAMES) - 1}, medhier.plaque.labels"
        raise ValueError(f"labels: need an integer label map ({known}), got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= len(NAMES)):
        bad = np.unique(arr[(arr < 0) | (arr >= len(NAMES))])
        known = ", ".join(f"{v} {name}" for v, name in enumerate(NAMES))
        raise ValueError(f"labels: values {bad[:5].tolist()} are outside the label set ({known})")
    try:
        sp = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing: need 3 numbers (dz, dy, dx) in mm, got {spacing!r}") from None
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing: need 3 positive finite numbers (dz, dy, dx) in mm, got {spacing!r}")
    return arr.astype(np.uint8, copy=False), sp


def _largest_vessel(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """The label map with every vessel but the largest set to background, and the vessel count."""
    components, count = ndi.label(labels > BACKGROUND, structure=_VESSEL_CONNECTIVITY)
    if count <= 1:
        return labels, count
    largest = 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
    return np.where(components == largest, labels, BACKGROUND), count


def _per_slice(labels: np.ndarray, sampling: tuple[float, float]) -> SliceMeasurements:
    """Areas, NWI and thicknesses of every slice of one vessel's label map (Z, Y, X)."""
    nz = labels.shape[0]
    counts = np.zeros((nz, len(NAMES)), dtype=np.int64)
    for z in range(nz):
        counts[z] = np.bincount(labels[z].ravel(), minlength=len(NAMES))
    pixel_mm2 = sampling[0] * sampling[1]
    outer = counts[:, BACKGROUND + 1 :].sum(axis=1).astype(float)
    present = outer > 0
    outer[~present] = np.nan
    lumen = np.where(present, counts[:, LUMEN], np.nan)
    thickness = np.full((nz, 3), np.nan)
    # Pad by one voxel so every contour voxel has an outside neighbour inside the array.
    section = np.pad(_crop_in_plane(labels), ((0, 0), (1, 1), (1, 1)))
    for z in np.flatnonzero(present):
        thickness[z] = _slice_thickness(section[z], sampling)
    arrays = dict(
        lumen_area_mm2=lumen * pixel_mm2,
        outer_area_mm2=outer * pixel_mm2,
        wall_area_mm2=(outer - lumen) * pixel_mm2,
        nwi=(outer - lumen) / outer,
        max_wall_thickness_mm=thickness[:, 0],
        mean_wall_thickness_mm=thickness[:, 1],
        cap_thickness_mm=thickness[:, 2],
    )
    for array in arrays.values():
        array.setflags(write=False)
    return SliceMeasurements(**arrays)


def _crop_in_plane(labels: np.ndarray) -> np.ndarray:
    """The (Y, X) bounding box of the vessel over all slices: distance transforms of a few hundred
    pixels instead of the whole field of view."""
    inside = labels > BACKGROUND
    ys, xs = np.flatnonzero(inside.any(axis=(0, 2))), np.flatnonzero(inside.any(axis=(0, 1)))
    if not ys.size:
        return labels[:, :0, :0]
    return labels[:, ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]


def _slice_thickness(section: np.ndarray, sampling: tuple[float, float]) -> tuple[float, float, float]:
    """(max wall, mean wall, cap) thickness in mm of one slice (Y, X) whose border is background;
    NaN where undefined. Both measure from the centres of the last voxels on one side to the
    nearest lumen voxel centre: see the module docstring for why that needs no half-voxel term."""
    lumen = section == LUMEN
    if not lumen.any():
        return math.nan, math.nan, math.nan
    to_lumen = ndi.distance_transform_edt(~lumen, sampling=sampling)
    inside = section > BACKGROUND
    wall = _along_contour(to_lumen, inside & ~ndi.binary_erosion(inside, _FACES))
    core = section == LIPID
    cap = _along_contour(to_lumen, ndi.binary_dilation(core, _FACES) & ~core).min() if core.any() else math.nan
    return float(wall.max()), float(wall.mean()), float(cap)


def _along_contour(distance: np.ndarray, contour: np.ndarray) -> np.ndarray:
    """``distance`` at each ``contour`` voxel, averaged with the contour voxels of its 3 x 3
    neighbourhood: a maximum or minimum over the contour is then not set by one staircase step of
    a digitised contour. Shape: (number of contour voxels,)."""
    total = ndi.uniform_filter(np.where(contour, distance, 0.0), size=3, mode="constant")
    weight = ndi.uniform_filter(contour.astype(float), size=3, mode="constant")
    return total[contour] / weight[contour]


def _reference(nwi: np.ndarray, present: np.ndarray, reference_slice: int | None) -> int:
    """The Z index stenosis is measured against; -1 when there is no vessel."""
    if reference_slice is None:
        return int(np.nanargmin(nwi)) if present.any() else -1
    if isinstance(reference_slice, bool) or not isinstance(reference_slice, (int, np.integer)):
        raise ValueError(f"reference_slice: need a slice index (int), got {reference_slice!r}")
    if not 0 <= reference_slice < len(nwi):
        raise ValueError(f"reference_slice: {reference_slice} is outside the volume's slices 0..{len(nwi) - 1}")
    if not present[reference_slice]:
        held = np.flatnonzero(present)
        where = f"slices {held[0]}..{held[-1]}" if held.size else "no slice"
        raise ValueError(f"reference_slice: slice {reference_slice} holds no measured vessel (it is in {where})")
    return int(reference_slice)


def _stenosis(lumen_mm2: np.ndarray, present: np.ndarray, reference: int) -> dict[str, float | int]:
    """Area- and diameter-based stenosis of the most stenosed slice against the reference slice."""
    if not present.any():
        nan = math.nan
        return dict(reference_slice=-1, most_stenosed_slice=-1, reference_lumen_area_mm2=nan,
                    min_lumen_area_mm2=nan, stenosis_area_pct=nan, stenosis_diameter_pct=nan)
    narrowest = int(np.nanargmin(lumen_mm2))
    a_min, a_ref = float(lumen_mm2[narrowest]), float(lumen_mm2[reference])
    # D = 2 sqrt(A / pi), so the diameter ratio is the square root of the area ratio.
    ratio = a_min / a_ref if a_ref > 0 else math.nan
    return dict(
        reference_slice=reference,
        most_stenosed_slice=narrowest,
        reference_lumen_area_mm2=a_ref,
        min_lumen_area_mm2=a_min,
        stenosis_area_pct=100.0 * (1.0 - ratio),
        stenosis_diameter_pct=100.0 * (1.0 - math.sqrt(ratio)),
    )


def _volumes(labels: np.ndarray, voxel_mm3: float) -> dict[str, float]:
    """Lumen, vessel, wall and component volumes in mm3."""
    counts = np.bincount(labels.ravel(), minlength=len(NAMES)) * voxel_mm3
    vessel = float(counts[BACKGROUND + 1 :].sum())
    volumes = dict(lumen_volume_mm3=float(counts[LUMEN]), vessel_volume_mm3=vessel, wall_volume_mm3=vessel - float(counts[LUMEN]))
    for component in COMPONENTS:
        volumes[f"{NAMES[component]}_volume_mm3"] = float(counts[component])
    return volumes


def _reduce(reduction, values: np.ndarray) -> float:
    """``reduction`` (np.nanmean, np.nanmax, np.nanmin) of the non-NaN values; NaN when there are none."""
    return float(reduction(values)) if np.isfinite(values).any() else math.nan
