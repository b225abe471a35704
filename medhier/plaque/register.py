"""Rigid registration of the MR sequences of one visit onto its reference sequence (SimpleITK).

Each sequence of a visit (T2w, TOF, CE-T1w) is registered rigidly onto the reference sequence
(``PlaqueConfig.reference``, T1w by default) and resampled onto the reference's grid, so that one
segmentation and one set of measurements serve every sequence.  ``PlaqueConfig.register: false``
skips the optimisation for scans already registered: use :meth:`RigidTransform.identity`.

Volumes are ``highdicom.Volume`` objects: a 3-D array (axis 0 = slices, 1 = rows, 2 = columns for
volumes built from DICOM series) and a 4x4 affine from array indices to patient coordinates in
millimetres (DICOM LPS: +x to the patient's left, +y posterior, +z head).  highdicom's own
``to_simpleitk`` / ``from_simpleitk`` convert them: SimpleITK's index (i, j, k) is the array's
index [i, j, k] (the array is transposed, not reordered in space), its spacing, origin and
direction are the affine's column norms, translation and normalised columns.

The transform
-------------
:class:`RigidTransform` follows ITK: it maps a point **of the fixed (reference) image to the
moving image**, in patient coordinates (LPS, mm)::

    T(p) = R (p - centre) + centre + translation,      R = Rz(az) Rx(ax) Ry(ay)

``angles_deg`` = (ax, ay, az) are rotations in **degrees** about the patient x, y and z axes
(right-handed; R applied to a vector rotates it first about y, then x, then z, all fixed axes:
ITK's ``Euler3DTransform`` with ``ComputeZYX`` off), ``translation_mm`` and ``centre_mm`` are in
millimetres.  So a moving image whose anatomy sits 2 mm further along +x than in the fixed image
gives ``translation_mm`` = (2, 0, 0), and ``resample(moving, transform, onto=fixed)`` reads the
moving image at T(p) for every voxel centre p of the fixed grid, undoing the motion.

The method
----------
Mattes mutual information (multi-modal: T2w or TOF onto T1w), an ``Euler3DTransform`` started
from the scanner coordinates when both volumes share a frame of reference (sequences of one
session: the best first guess, whatever their coverage) or from their geometric centres
otherwise (``CenteredTransformInitializer``, GEOMETRY), one full-resolution level by default (a
pyramid is available: shrink factors ``shrink``, Gaussian sigmas ``sigmas_mm`` in millimetres;
sequences of one session start within a few millimetres, and on the phantoms a shrink-2 level let
Powell's line bracket carry the moving volume off the fixed one), and Powell's direction-set
search, which compares metric values only, over parameters scaled so that a unit step moves the
fixed volume's farthest corner by about a millimetre (1 mm of translation, 1 / radius radians of
rotation).  The metric reads every fixed voxel, each at a fixed-seed random offset within its
voxel (ITK's REGULAR sampling; a fixed-seed random subset of ``samples`` points in volumes larger
than that), among those that lie at least ``margin_mm`` inside the moving volume.  The
registration runs single-threaded by default, so the same inputs give the same transform, bit for
bit (ITK sums the joint histogram per thread: another thread count changes the last digits).

Why a gradient-free optimiser and dense sampling (measured on the carotid phantoms of
:mod:`medhier.synthetic.carotid`, 20 visits, seed 3; error = the largest displacement error over
the vessel's voxels, in voxels per axis, and the rotation error): with ITK's analytic Mattes
gradient and regular-step gradient descent over 20 000 random samples, 0 of 20 TOF, 11 of 20
T2w and 7 of 20 CE-T1w sequences came within 0.5 voxel and 1 degree; TOF landed a median 3.9 mm
(up to 15 mm and 25 degrees) off.  The metric itself was right: evaluated on every voxel, its
minimum lay at the true motion within 0.25 mm and 0.5 degree along every parameter.  The
gradient was not: ITK derives it from the smoothed gradient of the moving image, while the
metric of small, noisy volumes resampled with linear interpolation has cusps at grid alignment
(interpolation smooths the noise differently at every sub-voxel offset), so at the start the
descent's first step pointed against the finite-difference gradient (rotation about z, the
least constrained parameter when a bright TOF lumen sits at the rotation centre) and walked off.
Random subsets of a 40 000-voxel volume add sampling noise of the same order as the weak
TOF-to-T1w dependence.  Reading the voxels exactly on the grid brings the cusp back (a T1w
registered onto another noise draw of itself settled 1 degree off); the sub-voxel offsets of
REGULAR sampling average it out.  With Powell over every voxel, and the phantom's TOF given the
fat signal a TOF has (:mod:`medhier.synthetic.carotid`), all 60 sequences of those 20 visits came
within the bound: largest error over the vessel, median / worst, T2w 0.10 / 0.16 voxel and 0.18 /
0.30 degree, TOF 0.13 / 0.37 voxel and 0.24 / 0.78 degree, CE-T1w 0.12 / 0.40 voxel and 0.18 /
0.50 degree, about 1 s of CPU each (was 0.4 s); ``tests/plaque/test_register.py`` holds it.

Rejections (:class:`RegistrationError` ``reason``; a whole sequence is refused, never dropped):

=================  ========================================================================
reason             meaning
=================  ========================================================================
unsupported        not a 3-D single-channel volume in the PATIENT coordinate system
constant           no contrast (every voxel equal): mutual information is undefined
non_finite         NaN or infinity among the voxels
no_overlap         the two volumes share no voxel in space (under the transform)
failed             SimpleITK's optimiser raised (e.g. too few samples inside the moving image)
=================  ========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

import highdicom as hd
import numpy as np
import SimpleITK as sitk

from medhier.io.rejection import Rejection

__all__ = [
    "REASONS",
    "RegistrationError",
    "RigidTransform",
        "overlap_fraction",
    "register_rigid",
    "resample",
    "sitk_to_volume",
    "volume_to_sitk",
]

REASONS: dict[str, str] = {
    "unsupported": "not a 3-D single-channel volume in the PATIENT coordinate system",
    "constant": "the volume has no contrast (every voxel has the same value)",
    "non_finite": "the volume contains NaN or infinity",
    "no_overlap": "the two volumes share no voxel in space under the transform",
    "failed": "SimpleITK's registration raised an error",
}

Interpolation = Literal["linear", "nearest"]
_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}


class RegistrationError(Rejection, ValueError):
    """A volume pair that cannot be registered or resampled. ``reason`` is a code from :data:`REASONS`."""

    reasons = REASONS


@dataclass(frozen=True)
class RigidTransform:
    """A rigid transform from fixed-image points to moving-image points (LPS, mm; see the module).

    ``metric``: the final Mattes mutual-information value at the finest level (ITK reports minus
    the mutual information, so lower is better); ``None`` when nothing was optimised.
    ``iterations``: optimiser iterations summed over the pyramid levels. ``stop``: the optimiser's
    own stop reason at the finest level.
    """

    angles_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    centre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    metric: float | None = None
    iterations: int = 0
    stop: str = "not registered"

    def __post_init__(self):
        # Plain float triples whatever came in (ints, numpy scalars, lists from JSON), so equal
        # transforms compare equal and the manifest always holds the same types.
        for name in ("angles_deg", "translation_mm", "centre_mm"):
            object.__setattr__(self, name, _triple(getattr(self, name), name))
        if self.metric is not None:
            object.__setattr__(self, "metric", float(self.metric))
        object.__setattr__(self, "iterations", int(self.iterations))

    @classmethod
    def identity(cls, centre_mm: Sequence[float] = (0.0, 0.0, 0.0)) -> RigidTransform:
        """The transform of sequences that are already registered (``PlaqueConfig.register: false``)."""
        return cls((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), centre_mm, stop="identity")

    @classmethod
    def from_sitk(cls, transform: sitk.Euler3DTransform, *, metric: float | None = None,
                  iterations: int = 0, stop: str = "") -> RigidTransform:
        """Read a SimpleITK ``Euler3DTransform`` (angles in radians there, degrees here)."""
        if transform.GetComputeZYX():
            raise ValueError("RigidTransform.from_sitk: the Euler3DTransform computes ZYX; only ITK's default ZXY order is supported")
        angles = (transform.GetAngleX(), transform.GetAngleY(), transform.GetAngleZ())
        return cls(
            tuple(math.degrees(a) for a in angles),
            transform.GetTranslation(),
            transform.GetCenter(),
            metric=metric,
            iterations=iterations,
            stop=stop,
        )

    def to_sitk(self) -> sitk.Euler3DTransform:
        """This transform as a SimpleITK ``Euler3DTransform`` (fixed -> moving, as ITK resamples)."""
        transform = sitk.Euler3DTransform()
        transform.SetCenter(self.centre_mm)
        transform.SetRotation(*(math.radians(a) for a in self.angles_deg))
        transform.SetTranslation(self.translation_mm)
        return transform

    @property
    def matrix(self) -> np.ndarray:
        """The 4x4 homogeneous matrix taking fixed points (LPS, mm) to moving points."""
        transform = self.to_sitk()
        rotation = np.array(transform.GetMatrix()).reshape(3, 3)
        centre = np.asarray(self.centre_mm)
        out = np.eye(4)
        out[:3, :3] = rotation
        out[:3, 3] = centre + np.asarray(self.translation_mm) - rotation @ centre
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for the visit manifest (lists of floats, plain ints and strings)."""
        out = asdict(self)
        for key in ("angles_deg", "translation_mm", "centre_mm"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RigidTransform:
        """Inverse of :meth:`to_dict`; unknown or missing keys and wrong lengths fail by name."""
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - names)
        missing = sorted({"angles_deg", "translation_mm"} - set(data))
        if unknown or missing:
            raise ValueError(f"RigidTransform.from_dict: unknown keys {unknown}, missing keys {missing}")
        return cls(**data)


def _triple(values: Sequence[float], name: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"RigidTransform.{name}: need 3 finite numbers, got {values!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"RigidTransform.{name}: need 3 finite numbers, got {values!r}")
    return values


def _check(volume: hd.Volume, name: str) -> None:
    if not isinstance(volume, hd.Volume):
        raise RegistrationError("unsupported", f"{name}: expected a highdicom.Volume, got {type(volume).__name__}")
    if volume.array.ndim != 3:
        raise RegistrationError("unsupported", f"{name}: a single-channel 3-D volume is needed, got array shape {volume.shape}")
    if volume.coordinate_system != hd.CoordinateSystemNames.PATIENT:
        raise RegistrationError("unsupported", f"{name}: volumes must be in the PATIENT coordinate system, got {volume.coordinate_system.name}")


def volume_to_sitk(volume: hd.Volume, name: str = "volume") -> sitk.Image:
    """A 3-D ``highdicom.Volume`` as a ``SimpleITK.Image`` with the same voxels in the same places.

    SimpleITK index (i, j, k) holds ``volume.array[i, j, k]``; spacing (mm), origin (mm, LPS) and
    direction come from the affine. Booleans become uint8 (highdicom's rule).
    """
    _check(volume, name)
    return volume.to_simpleitk()


def sitk_to_volume(image: sitk.Image, frame_of_reference_uid: str | None = None) -> hd.Volume:
    """A 3-D ``SimpleITK.Image`` as a ``highdicom.Volume`` (PATIENT coordinates), inverse of :func:`volume_to_sitk`."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise RegistrationError(
            "unsupported",
            f"sitk_to_volume: a 3-D scalar image is needed, got {image.GetDimension()}-D with {image.GetNumberOfComponentsPerPixel()} components",
        )
    return hd.Volume.from_simpleitk(image, frame_of_reference_uid=frame_of_reference_uid)


def _resampler(onto: hd.Volume | hd.VolumeGeometry, transform: RigidTransform, interpolator: int,
               fill: float, threads: int) -> sitk.ResampleImageFilter:
    # The output grid through highdicom's own conversion of a zero volume on onto's affine, so the
    # index order and direction convention live in one place (highdicom), not here.
    grid = hd.Volume(np.zeros(onto.spatial_shape, np.uint8), onto.affine, "PATIENT").to_simpleitk()
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(grid)
    resampler.SetTransform(transform.to_sitk())
    resampler.SetInterpolator(interpolator)
    resampler.SetDefaultPixelValue(fill)
    resampler.SetNumberOfThreads(threads)
    return resampler


def _inside(moving: hd.Volume, transform: RigidTransform, onto: hd.Volume | hd.VolumeGeometry,
            margin_mm: float, threads: int) -> sitk.Image:
    """uint8 mask on ``onto``'s grid: 1 where T(p) falls inside ``moving`` less ``margin_mm`` at each face."""
    crop = []
    for size, spacing in zip(moving.spatial_shape, moving.spacing):
        cut = min(math.ceil(margin_mm / spacing), (size - 1) // 2)  # keep at least one voxel
        crop.append(slice(cut, size - cut))
    ones = hd.Volume(np.ones(moving.spatial_shape, np.uint8), moving.affine, "PATIENT")[tuple(crop)]
    return _resampler(onto, transform, sitk.sitkNearestNeighbor, 0.0, threads).Execute(ones.to_simpleitk())


def overlap_fraction(moving: hd.Volume, transform: RigidTransform, onto: hd.Volume | hd.VolumeGeometry,
                     *, threads: int = 1) -> float:
    """The fraction (0..1) of ``onto``'s voxel centres p whose T(p) falls inside ``moving``'s voxels."""
    _check(moving, "moving")
    inside = _inside(moving, transform, onto, 0.0, threads)  # held: the view below does not keep it alive
    return float(sitk.GetArrayViewFromImage(inside).mean())


def _require_overlap(moving: hd.Volume, transform: RigidTransform, onto: hd.Volume | hd.VolumeGeometry,
                     threads: int, what: str) -> None:
    if overlap_fraction(moving, transform, onto, threads=threads) == 0.0:
        raise RegistrationError(
            "no_overlap",
            f"{what}: the moving volume (centre {_fmt(moving.center_position)} mm LPS, size "
            f"{_fmt(moving.physical_extent)} mm along its array axes) does not cover any voxel of the "
            f"fixed grid (centre {_fmt(onto.center_position)} mm, size {_fmt(onto.physical_extent)} mm) under the "
            f"transform (translation {_fmt(transform.translation_mm)} mm, angles {_fmt(transform.angles_deg)} deg); "
            "check that both series belong to the same patient and visit, or register them first",
        )


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in values) + ")"


def resample(moving: hd.Volume, transform: RigidTransform, onto: hd.Volume | hd.VolumeGeometry, *,
             interpolation: Interpolation = "linear", fill: float = 0.0, threads: int = 1) -> hd.Volume:
    """``moving`` read at T(p) for every voxel centre p of ``onto``'s grid: a volume on ``onto``'s grid.

    ``interpolation="linear"`` for images (float32 out), ``"nearest"`` for label maps (the input
    dtype and its values are kept). Voxels that map outside ``moving`` get ``fill``. The result
    carries ``onto``'s affine and frame of reference. Raises :class:`RegistrationError`
    ``no_overlap`` when no voxel of ``onto`` maps inside ``moving``.
    """
    if interpolation not in _INTERPOLATORS:
        raise ValueError(f"resample: interpolation must be one of {sorted(_INTERPOLATORS)}, got {interpolation!r}")
    _check(moving, "moving")
    _require_overlap(moving, transform, onto, threads, "resample")
    source = moving
    if interpolation == "linear":
        source = moving.astype(np.float32)
    out = _resampler(onto, transform, _INTERPOLATORS[interpolation], fill, threads).Execute(volume_to_sitk(source, "moving"))
    array = sitk.GetArrayFromImage(out).transpose(2, 1, 0)
    if moving.dtype == np.bool_:
        array = array.astype(bool)
    return hd.Volume(np.ascontiguousarray(array), onto.affine, "PATIENT", frame_of_reference_uid=onto.frame_of_reference_uid)


def _initial(fixed: sitk.Image, moving: sitk.Image, same_frame: bool) -> sitk.Euler3DTransform:
    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    initial = sitk.Euler3DTransform(initial)
    if same_frame:
        # One session, one frame of reference: the scanner's coordinates already align the
        # sequences up to patient motion, whatever their coverage (a TOF slab is often longer than
        # the T1w's); centring would shift them by half the difference. Keep only the centre.
        initial.SetTranslation((0.0, 0.0, 0.0))
    return initial


@contextmanager
def _itk_threads(threads: int) -> Iterator[None]:
    # The registration method's own thread count does not reach every filter and metric it builds
    # (the joint histogram then sums in a thread-dependent order: the last digits of the result
    # change from run to run). ITK's global default does; it is restored afterwards. Global state:
    # one registration per process at a time (Ray tasks are processes).
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def register_rigid(
    fixed: hd.Volume,
    moving: hd.Volume,
    *,
    initial: Literal["auto", "scanner", "geometry"] = "auto",
    bins: int = 32,
    samples: int = 100_000,
    seed: int = 1,
    shrink: Sequence[int] = (1,),
    sigmas_mm: Sequence[float] = (0.0,),
    step_mm: float = 0.5,
    min_step_mm: float = 0.01,
    max_iterations: int = 100,
    margin_mm: float = 2.0,
    threads: int = 1,
) -> RigidTransform:
    """The rigid transform that maps ``fixed`` points onto the same anatomy in ``moving``.

    ``fixed``, ``moving``: 3-D single-channel ``highdicom.Volume`` objects of any grids, contrasts
    and dtypes. ``initial``: ``"scanner"`` starts from the identity (the volumes' own patient
    coordinates), ``"geometry"`` from the translation between their geometric centres, ``"auto"``
    picks ``"scanner"`` when both carry the same frame of reference UID. ``bins``: Mattes histogram
    bins; ``samples``: the most fixed-image points the metric reads at each level: every voxel of
    a smaller level, else that many drawn at random (``seed`` >= 1: SimpleITK reads 0 as "seed
    from the clock"), so the cost does not grow with the matrix beyond it; ``shrink`` and
    ``sigmas_mm``: one entry per pyramid level, coarse to fine (ITK shrinks every axis alike:
    factor 4 leaves a slab of 14 slices of 2 mm with 3, whose level drove the phantom's
    through-plane shift the wrong way; for near-isotropic 3-D sequences ``(4, 2, 1)`` and
    ``(2.0, 1.0, 0.0)`` reach further); ``step_mm``: Powell's first bracket along each direction,
    in millimetres of shift of the fixed volume's farthest corner; ``min_step_mm``: a level stops
    when a sweep moves the parameters by less than this (same unit); ``max_iterations``: Powell
    sweeps per level; ``margin_mm``: the metric counts only the fixed voxels that start at least this far
    inside the moving volume (all overlapping ones if none do); ``threads``: ITK threads while
    registering (1: bit-identical results on any machine; the pipeline runs visits in parallel).
    The rotation centre is the fixed volume's centre. Raises :class:`RegistrationError`.
    """
    if len(shrink) != len(sigmas_mm) or not shrink:
        raise ValueError(f"register_rigid: shrink {list(shrink)} and sigmas_mm {list(sigmas_mm)} need one entry per level")
    if initial not in ("auto", "scanner", "geometry"):
        raise ValueError(f"register_rigid: initial must be 'auto', 'scanner' or 'geometry', got {initial!r}")
    if seed < 1:
        raise ValueError(f"register_rigid: seed must be >= 1 (SimpleITK seeds 0 from the wall clock), got {seed}")
    if samples < 1000:
        raise ValueError(f"register_rigid: samples must be at least 1000 for a joint histogram of {bins} x {bins} bins, got {samples}")
    fixed_image, moving_image = _registrable(fixed, "fixed"), _registrable(moving, "moving")
    transform = _initial(fixed_image, moving_image, _starts_from_scanner(initial, fixed, moving))
    start = RigidTransform.from_sitk(transform)
    _require_overlap(moving, start, fixed, threads, "register_rigid")

    method = sitk.ImageRegistrationMethod()
    fractions = _sampling_fractions(fixed.spatial_shape, shrink, samples)
    _set_metric(method, bins, fractions, seed, _metric_region(moving, start, fixed, margin_mm, threads))
    method.SetInterpolator(sitk.sitkLinear)
    _set_optimizer(method, step_mm, min_step_mm, max_iterations, _radius_mm(fixed))
    method.SetShrinkFactorsPerLevel([int(s) for s in shrink])
    method.SetSmoothingSigmasPerLevel([float(s) for s in sigmas_mm])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=True)
    method.SetNumberOfThreads(threads)
    return _execute(method, fixed_image, moving_image, transform, threads)


def _registrable(volume: hd.Volume, name: str) -> sitk.Image:
    """``volume`` checked for what mutual information needs (finite voxels, contrast) -> float32 SimpleITK image."""
    _check(volume, name)
    if not np.isfinite(volume.array).all():
        raise RegistrationError("non_finite", f"{name}: {np.count_nonzero(~np.isfinite(volume.array))} voxels are NaN or infinite")
    if not np.ptp(volume.array) > 0:
        raise RegistrationError("constant", f"{name}: every voxel is {volume.array.flat[0]}; mutual information needs contrast")
    return volume_to_sitk(volume.astype(np.float32), name)


def _starts_from_scanner(initial: str, fixed: hd.Volume, moving: hd.Volume) -> bool:
    """Whether to start from the scanner coordinates: ``initial`` "scanner", or "auto" with one
    frame of reference for both volumes."""
    if initial == "auto":
        return fixed.frame_of_reference_uid is not None and fixed.frame_of_reference_uid == moving.frame_of_reference_uid
    return initial == "scanner"


def _metric_region(moving: hd.Volume, start: RigidTransform, fixed: hd.Volume, margin_mm: float, threads: int) -> sitk.Image:
    """The fixed voxels the metric counts: those at least ``margin_mm`` inside the moving volume
    under ``start``, or every overlapping one when none is that far inside."""
    # Mutual information changes in jumps whenever a motion moves fixed samples across the moving
    # volume's faces (a thin slab gains or loses a layer of samples for a fraction of a degree of
    # tilt). Counting only the fixed voxels that start at least margin_mm inside the moving volume
    # keeps the sample set the same for any motion smaller than the margin.
    region = _inside(moving, start, fixed, margin_mm, threads)
    if not np.any(sitk.GetArrayViewFromImage(region)):
        region = _inside(moving, start, fixed, 0.0, threads)
    return region


def _sampling_fractions(shape: Sequence[int], shrink: Sequence[int], samples: int) -> list[float]:
    """Per pyramid level, the fraction of the fixed voxels that gives ``samples`` points (at most all)."""
    # ITK takes a fraction of each level's voxels (its shrink keeps floor(size / factor) a side).
    voxels = [math.prod(max(1, n // int(f)) for n in shape) for f in shrink]
    return [min(1.0, samples / n) for n in voxels]


def _set_metric(method: sitk.ImageRegistrationMethod, bins: int, fractions: Sequence[float], seed: int,
                region: sitk.Image) -> None:
    """Mattes mutual information over the fixed voxels in ``region``: all of them when every level
    has at most ``samples`` voxels (``fractions`` all 1), else a random ``fractions[level]``."""
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    method.SetMetricSamplingStrategy(method.REGULAR if all(f >= 1.0 for f in fractions) else method.RANDOM)
    method.SetMetricSamplingPercentagePerLevel(list(fractions), seed)
    method.SetMetricFixedMask(region)


def _radius_mm(fixed: hd.Volume) -> float:
    """Distance (mm) from the fixed volume's centre to its farthest voxel centre: the lever of a rotation."""
    return max(1.0, 0.5 * float(np.linalg.norm(np.asarray(fixed.spacing) * (np.asarray(fixed.spatial_shape) - 1))))


def _set_optimizer(method: sitk.ImageRegistrationMethod, step_mm: float, min_step_mm: float, max_iterations: int,
                   radius_mm: float) -> None:
    """Powell's direction-set search, parameters scaled so that a unit moves the farthest voxel ~1 mm."""
    # Powell compares metric values only: the analytic Mattes gradient disagrees with the metric
    # on small noisy volumes (module docstring). ITK's Powell divides each step by the parameter's
    # scale: rotations (radians) by the radius, translations (mm) by 1.
    method.SetOptimizerAsPowell(
        numberOfIterations=max_iterations,
        maximumLineIterations=20,
        stepLength=step_mm,
        stepTolerance=min_step_mm,
        valueTolerance=1e-6,
    )
    method.SetOptimizerScales([radius_mm] * 3 + [1.0] * 3)


def _execute(method: sitk.ImageRegistrationMethod, fixed: sitk.Image, moving: sitk.Image,
             transform: sitk.Euler3DTransform, threads: int) -> RigidTransform:
    """Run ``method`` (optimising ``transform`` in place) -> the result, with its metric, summed
    iterations and stop reason. Raises :class:`RegistrationError` ``failed``."""
    iterations = [0]
    method.AddCommand(sitk.sitkIterationEvent, lambda: iterations.__setitem__(0, iterations[0] + 1))
    try:
        with _itk_threads(threads):
            method.Execute(fixed, moving)
    except RuntimeError as error:
        raise RegistrationError("failed", f"register_rigid: SimpleITK stopped: {str(error).strip().splitlines()[-1]}") from error
    return RigidTransform.from_sitk(
        transform,
        metric=float(method.GetMetricValue()),
        iterations=iterations[0],
        stop=method.GetOptimizerStopConditionDescription(),
    )
