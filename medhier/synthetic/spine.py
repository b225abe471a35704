"""Phantom CT archives with hierarchical labels, for the demo, the tests and the benchmarks.

No labelled medical data set can be downloaded where medhier is developed, so this module draws
its own: sagittal CT slices of a lumbar spine segment, one leaf class per image, written as
valid, realistic DICOM in a patient/study/series tree with a ``labels.csv`` manifest.  Everything
is deterministic by seed: the same arguments give byte-identical files.

Image geometry
--------------
A square field of view of 140 mm (``PixelSpacing`` = 140 / size mm).  **Anterior is the image's
left, posterior its right, superior its top** (ImageOrientationPatient 0\\1\\0\\0\\0\\-1, the usual
sagittal display).  From left to right: prevertebral soft tissue with fat, a column of vertebral
bodies separated by intervertebral discs (the middle body, centred at 28 mm left of the image
centre, is the *target*; its neighbours above and below are complete, the next ones are cut by
the field of view), the spinal canal (CSF), the posterior elements (lamina and spinous process of
each level), paraspinal soft tissue, a subcutaneous fat layer and air behind the back.

Findings (all on the target body)
---------------------------------
- ``normal/normal``: rectangular body, equal anterior and posterior heights.
- ``fracture/compression``: anterior wedge; the superior endplate sinks anteriorly, the posterior
  wall keeps its height, the compacted bone under the depressed endplate is denser, and the
  levels above tilt forward into part of the gap (kyphosis).
- ``fracture/burst``: the whole body loses height and spreads, low-HU fracture lines cross it, an
  anterior-superior fragment is displaced forward and a posterior-superior fragment is pushed
  back into the spinal canal (retropulsion).
- ``lesion/benign``: a round, sharply marginated, uniform lesion inside the body (a sclerotic bone
  island, or less often a lytic cyst-like lesion).
- ``lesion/malignant``: an irregular, ill-defined, heterogeneous lesion (usually lytic, sometimes
  blastic) that may breach the cortex with a soft-tissue component outside the body.

Every render returns a boolean ``finding`` mask (deformed body, fragments and the space they
left, or the lesion; all False for normal) for checking where an explanation map points.

Difficulty
----------
``difficulty`` d in [0, 1] interpolates every knob linearly between an easy (d = 0) and a hard
(d = 1) end; :func:`difficulty_knobs` returns the values, :data:`KNOBS` holds the end points:

=========================  ===========  ===========  =================================================
knob                       d = 0        d = 1        meaning
=========================  ===========  ===========  =================================================
noise_hu                   8            60           std of the image noise (HU, after the PSF)
psf_mm                     0.4          0.7          sigma of the Gaussian point spread (mm)
shift_mm                   3            15           max translation per axis (uniform +-, mm)
scale_jitter               0.03         0.15         max relative change of anatomy size (+-)
rotation_deg               2            20           max in-plane rotation (uniform +-, degrees)
compression_loss           0.25-0.60    0.20-0.30    anterior height loss, fraction of the height
burst_loss                 0.25-0.50    0.12-0.25    whole-body height loss, fraction
retropulsion               0.40-0.65    0.15-0.30    fragment intrusion, fraction of canal depth
fragment_shift_mm          2.0-4.0      0.8-1.5      anterior fragment displacement (mm)
fracture_line_mm           1.2          0.6          width of the low-HU fracture lines (mm)
lesion_radius_mm           5.5-9.0      3.0-5.0      lesion radius (mm)
lesion_contrast            1.0          0.4          multiplier of lesion-minus-bone HU differences
irregularity               0.25         0.10         malignant radial perturbation (fraction of r)
edge_mm                    2.5          1.0          malignant edge blur (mm); benign edges are sharp
lesion_texture_hu          90           40           malignant internal heterogeneity (HU)
normal_weight              1            13           sampling weight of normal leaves (others: 1)
=========================  ===========  ===========  =================================================

So at d = 0 the five leaves are equally likely; at d = 1 ``normal/normal`` is 13/17 = 76% of the
default taxonomy's images, roughly a clinical prevalence.

Archives and encoding
---------------------
:func:`generate_archive` writes ``P0001/ST01/SE01/IM0001.dcm``...: one study and series per
patient, one leaf per patient, 1-3 slices (each its own render), then ``labels.csv``
(path,main,sub,patient_key).  Stored value = HU + 1024 (RescaleIntercept -1024, 12 bits of
information).  Per image, from the seed: MONOCHROME1 with probability ``monochrome1_fraction``
(stored inverted about the bone window, see :func:`dicom_bytes`); otherwise one in three is stored
unsigned with 12 bits stored, the rest signed int16, and 30% carry a second (soft-tissue) window.
With probability ``compressed_fraction`` an image is RLE Lossless or JPEG 2000 Lossless, equally
often, among the syntaxes whose encoders are installed (:func:`compressed_syntaxes`).
:func:`add_broken_files` adds files medhier.dicom must reject, one per rejection reason.

Determinism
-----------
An image depends only on ``(seed, index)``: its pixels come from ``default_rng([seed, 1, index])``
and its encoding choices from ``default_rng([seed, 2, index])``, never from the order or the
process that renders it, so ``workers`` does not change a byte.  Inside :func:`render` the anatomy,
the finding and the noise use three generators derived from the caller's one, so renders of
different leaves from equally seeded generators show the *same* patient with the same noise and
differ only by the finding.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import multiprocessing
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_encoder
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)
from scipy import ndimage

from medhier.io import storage
from medhier.config import StorageConfig
from medhier.io.dicom import patient_key
from medhier.classify.taxonomy import Taxonomy
from medhier.synthetic import writing

__all__ = [
    "DEFAULT_CLASSES",
    "FOV_MM",
    "KNOBS",
    "LEAVES",
    "ImageSpec",
    "Phantom",
    "SynthSummary",
    "Uids",
    "add_broken_files",
    "compressed_syntaxes",
    "dicom_bytes",
    "difficulty_knobs",
    "generate_archive",
    "leaf_weights",
    "plan_archive",
    "render",
]

FOV_MM = 140.0  # field of view, square
HU_MIN, HU_MAX = -1024.0, 3071.0  # what 12 bits stored as HU + 1024 can hold
RESCALE_INTERCEPT = -1024.0
BONE_WINDOW = (400.0, 1800.0)  # (center, width), HU
SOFT_TISSUE_WINDOW = (40.0, 400.0)
DEFAULT_CLASSES: dict[str, list[str]] = {
    "normal": ["normal"],
    "fracture": ["compression", "burst"],
    "lesion": ["benign", "malignant"],
}

# Easy (difficulty 0) and hard (difficulty 1) ends of every knob; see the module docstring.
KNOBS: dict[str, tuple] = {
    "noise_hu": (8.0, 60.0),
    "psf_mm": (0.4, 0.7),
    "shift_mm": (3.0, 15.0),
    "scale_jitter": (0.03, 0.15),
    "rotation_deg": (2.0, 20.0),
    "compression_loss": ((0.25, 0.60), (0.20, 0.30)),
    "burst_loss": ((0.25, 0.50), (0.12, 0.25)),
    "retropulsion": ((0.40, 0.65), (0.15, 0.30)),
    "fragment_shift_mm": ((2.0, 4.0), (0.8, 1.5)),
    "fracture_line_mm": (1.2, 0.6),
    "lesion_radius_mm": ((5.5, 9.0), (3.0, 5.0)),
    "lesion_contrast": (1.0, 0.4),
    "irregularity": (0.25, 0.10),
    "edge_mm": (2.5, 1.0),
    "lesion_texture_hu": (90.0, 40.0),
    "normal_weight": (1.0, 13.0),
}

_AIR = -1000.0
_TARGET_X_MM = -0.2 * FOV_MM  # the target body sits left of centre so the back and air show
_LEVELS = np.arange(-3, 4)  # vertebral levels relative to the target; +-3 only peek in at zoom-out


@dataclass(frozen=True)
class Phantom:
    """One rendered slice: ``hu`` (size, size) float32 Hounsfield units in [-1024, 3071],
    ``finding`` (size, size) bool region of the finding (all False for normal), ``leaf`` "main/sub"."""

    hu: np.ndarray
    finding: np.ndarray
    leaf: str


def difficulty_knobs(difficulty: float) -> dict[str, float | tuple[float, float]]:
    """The knob values at ``difficulty`` in [0, 1]: each linearly between its :data:`KNOBS` ends.

    Ranges come back as (low, high) tuples, scalars as floats."""
    d = _check_difficulty(difficulty)
    out: dict[str, float | tuple[float, float]] = {}
    for name, (easy, hard) in KNOBS.items():
        if isinstance(easy, tuple):
            out[name] = tuple(float(e + (h - e) * d) for e, h in zip(easy, hard))
        else:
            out[name] = float(easy + (hard - easy) * d)
    return out


def leaf_weights(leaves: Iterable[str], difficulty: float) -> np.ndarray:
    """Sampling probabilities of ``leaves`` ("main/sub"): normal leaves weigh ``normal_weight``,
    every other leaf 1 (balanced at difficulty 0). -> (len(leaves),) float64 summing to 1."""
    normal_weight = difficulty_knobs(difficulty)["normal_weight"]
    w = np.array([normal_weight if leaf.split("/")[0] == "normal" else 1.0 for leaf in leaves])
    return w / w.sum()


# -- rendering -------------------------------------------------------------------------------


def render(leaf: str, rng: np.random.Generator, size: int = 256, difficulty: float = 0.3) -> Phantom:
    """Draw one sagittal lumbar CT slice showing ``leaf`` ("main/sub", see :data:`LEAVES`).

    ``rng`` is advanced by exactly one draw, so a loop over one generator gives new patients.
    ``size``: pixels per side (>= 32; the field of view is always :data:`FOV_MM`).
    Raises ValueError for a leaf it cannot draw.
    """
    finder = _FINDINGS.get(leaf)
    if finder is None:
        raise ValueError(f"cannot render leaf {leaf!r}; renderable leaves: {list(LEAVES)}")
    if int(size) != size or size < 32:
        raise ValueError(f"size must be an integer >= 32 pixels, got {size!r}")
    size = int(size)
    knobs = difficulty_knobs(difficulty)
    # Separate streams: the anatomy and the noise do not depend on which finding is drawn.
    anat_seed, finding_seed, noise_seed = rng.integers(0, 2**63, size=3)
    anat = _draw_anatomy(np.random.default_rng(anat_seed), knobs)
    canvas = _Canvas(size, anat)
    finding = finder(np.random.default_rng(finding_seed), anat, knobs)
    finding.move_neighbours(anat)
    mask = np.zeros((size, size), dtype=bool)
    _paint_anatomy(canvas, anat, finding, mask)
    finding.paint_overlay(canvas, anat, mask)
    hu = _acquire(canvas, knobs, np.random.default_rng(noise_seed))
    return Phantom(hu=hu, finding=mask, leaf=leaf)


@dataclass
class _Anatomy:
    """A patient's spine, in the anatomical frame: u (mm) towards posterior, v (mm) towards
    inferior, origin at the target body's centre. Frames are (cu, cv, angle in radians)."""

    scale: float
    angle: float  # in-plane rotation of the whole anatomy (radians)
    centre: tuple[float, float]  # where the target centre lands in the image (mm from centre)
    a: float  # half AP depth of a vertebral body
    b: float  # half height of a vertebral body
    radius: float  # corner radius of a body
    cortex: float  # cortical thickness
    canal: float  # AP depth of the spinal canal
    frames: np.ndarray  # (len(_LEVELS), 3) body frames
    pe: np.ndarray  # (len(_LEVELS), 5) posterior elements: offset p, q, length, half height, tilt
    skin: float  # u of the skin of the back
    skin_curve: float  # mm of skin offset per mm^2 of v
    fat: float  # subcutaneous fat thickness
    hu: dict[str, float]
    tex_offsets: np.ndarray  # (4, 2) texture tile offsets, fraction of the tile


def _draw_anatomy(rng: np.random.Generator, knobs: dict) -> _Anatomy:
    u = rng.uniform
    scale = 1.0 + u(-1, 1) * knobs["scale_jitter"]
    angle = np.deg2rad(u(-1, 1) * knobs["rotation_deg"])
    centre = (_TARGET_X_MM + u(-1, 1) * knobs["shift_mm"], u(-1, 1) * knobs["shift_mm"])
    a, b = u(16.0, 19.0), u(12.5, 14.5)
    disc = u(8.0, 11.0)
    pitch = 2 * b + disc
    lordosis = u(0.0, 0.002)  # mm of posterior offset per mm^2 of distance from the target
    frames = np.zeros((len(_LEVELS), 3))
    for i, k in enumerate(_LEVELS):
        cv = k * pitch + u(-0.5, 0.5)
        frames[i] = (lordosis * cv * cv + u(-0.7, 0.7), cv, -np.arctan(2 * lordosis * cv) + u(-0.03, 0.03))
    canal = u(14.0, 18.0)
    pe = np.column_stack(
        [
            np.full(len(_LEVELS), a + canal),  # lamina starts behind the canal
            u(0.1, 0.35, len(_LEVELS)) * b,  # spinous processes sit low on their level
            u(28.0, 34.0, len(_LEVELS)),
            u(6.0, 8.0, len(_LEVELS)),
            np.deg2rad(u(10.0, 25.0, len(_LEVELS))),  # and point down and back
        ]
    )
    hu = {
        "soft": u(35.0, 50.0),
        "fat": u(-110.0, -85.0),
        "disc": u(70.0, 95.0),
        "csf": u(4.0, 15.0),
        "cortical": u(750.0, 1000.0),
        "cancellous": u(200.0, 300.0),
        "trabecular": u(35.0, 60.0),
        "posterior": u(280.0, 380.0),
    }
    return _Anatomy(
        scale=scale,
        angle=angle,
        centre=centre,
        a=a,
        b=b,
        radius=u(2.5, 4.0),
        cortex=u(1.0, 1.6),
        canal=canal,
        frames=frames,
        pe=pe,
        skin=a + canal + u(48.0, 58.0),
        skin_curve=u(-0.002, 0.002),
        fat=u(6.0, 14.0),
        hu=hu,
        tex_offsets=rng.uniform(0, 1, (4, 2)),
    )


class _Canvas:
    """The image being painted: HU values plus, per pixel, its anatomical coordinates (mm)."""

    def __init__(self, size: int, anat: _Anatomy):
        self.size = size
        self.px = FOV_MM / size  # mm per pixel
        self.hu = np.full((size, size), _AIR, dtype=np.float32)
        self._angle = anat.angle
        self._cos, self._sin = math.cos(anat.angle), math.sin(anat.angle)
        self._scale = anat.scale
        self._centre = anat.centre
        mm = ((np.arange(size, dtype=np.float32) + 0.5) - size / 2) * np.float32(self.px)
        dx = (mm - np.float32(anat.centre[0]))[None, :]
        dy = (mm - np.float32(anat.centre[1]))[:, None]
        c, s, k = np.float32(self._cos), np.float32(self._sin), np.float32(1 / anat.scale)
        self.u = (c * k) * dx + (s * k) * dy
        self.v = (c * k) * dy - (s * k) * dx
        tiles = _texture_tiles(size)
        self._tex = [(tiles[i % 2], (anat.tex_offsets[i] * size).astype(int)) for i in range(4)]

    def window(self, frame, half_p: float, half_q: float) -> tuple[slice, slice] | None:
        """Pixel slices covering the rectangle |p| <= half_p, |q| <= half_q (mm) of ``frame``
        (cu, cv, angle); None when it lies outside the image. Plain floats: this runs ~30 times
        per image, and numpy's per-call overhead would dominate."""
        cu, cv, phi = frame
        k = self._scale / self.px
        j = (self._centre[0] / self.px + self.size / 2 - 0.5) + k * (self._cos * cu - self._sin * cv)
        i = (self._centre[1] / self.px + self.size / 2 - 0.5) + k * (self._sin * cu + self._cos * cv)
        c, s = abs(math.cos(self._angle + phi)), abs(math.sin(self._angle + phi))
        ej, ei = k * (c * half_p + s * half_q), k * (s * half_p + c * half_q)
        i0, i1 = max(math.floor(i - ei) - 1, 0), min(math.ceil(i + ei) + 2, self.size)
        j0, j1 = max(math.floor(j - ej) - 1, 0), min(math.ceil(j + ej) + 2, self.size)
        if i0 >= i1 or j0 >= j1:
            return None
        return slice(i0, i1), slice(j0, j1)

    def texture(self, which: int, win: tuple[slice, slice]) -> np.ndarray:
        """Zero-mean unit-std texture crop for ``win``: 0, 2 fine (trabecular), 1, 3 coarse."""
        tile, (oy, ox) = self._tex[which]
        return tile[oy + win[0].start : oy + win[0].stop, ox + win[1].start : ox + win[1].stop]


@functools.lru_cache(maxsize=4)
def _texture_tiles(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(fine, coarse) band-pass noise tiles of (2 size, 2 size), zero mean and unit std.

    Built once per size and process from a fixed seed; images take crops at random offsets,
    which costs nothing per image and stays deterministic."""
    px = FOV_MM / size
    rng = np.random.default_rng(20240917 + size)
    tiles = []
    for lo_mm, hi_mm in ((0.45, 1.4), (2.0, 6.0)):  # trabecular spacing ~1 mm; blotches ~5 mm
        white = rng.standard_normal((2 * size, 2 * size)).astype(np.float32)
        band = ndimage.gaussian_filter(white, lo_mm / px, mode="wrap") - ndimage.gaussian_filter(
            white, hi_mm / px, mode="wrap"
        )
        if lo_mm < 1.0:
            band = np.tanh(1.5 * band / band.std())  # sharper plates and holes, like trabeculae
        band -= band.mean()
        tiles.append((band / band.std()).astype(np.float32))
    return tiles[0], tiles[1]


def _local(canvas: _Canvas, win, frame) -> tuple[np.ndarray, np.ndarray]:
    """Anatomical coordinates of the pixels in ``win`` expressed in ``frame`` (cu, cv, angle)."""
    cu, cv, phi = frame
    du, dv = canvas.u[win] - np.float32(cu), canvas.v[win] - np.float32(cv)
    c, s = np.float32(np.cos(phi)), np.float32(np.sin(phi))
    return c * du + s * dv, c * dv - s * du


def _frame_point(frame, p: float, q: float) -> tuple[float, float]:
    """A frame-local point (p, q) -> anatomical (u, v), mm."""
    cu, cv, phi = frame
    c, s = math.cos(phi), math.sin(phi)
    return cu + c * p - s * q, cv + s * p + c * q


def _frame_window(canvas: _Canvas, frame, half_p: float, half_q: float, margin: float = 1.0):
    return canvas.window(frame, half_p + margin, half_q + margin)


def _round_box_sdf(p: np.ndarray, q: np.ndarray, hp: float, hq: float, r: float) -> np.ndarray:
    """Signed distance (mm, < 0 inside) to a box of half sizes hp x hq with corner radius r."""
    r = min(r, hp, hq)
    x = np.abs(p) - np.float32(hp - r)
    y = np.abs(q) - np.float32(hq - r)
    xo, yo = np.maximum(x, 0), np.maximum(y, 0)
    outside = np.sqrt(xo * xo + yo * yo)
    return outside + np.minimum(np.maximum(x, y), 0) - np.float32(r)


def _fill(dst: np.ndarray, mask: np.ndarray, value) -> None:
    """dst[mask] = value, in place, as a multiply-add: masked np.where/copyto cost ~30x more."""
    dst += mask.astype(np.float32) * (np.float32(value) - dst if np.isscalar(value) else value - dst)


def _bone(sdf: np.ndarray, cortex: float, cortical_hu: float, interior: np.ndarray | float) -> np.ndarray:
    """Bone values where sdf < 0: a cortical shell of thickness ``cortex`` around ``interior``."""
    shell = (sdf > np.float32(-cortex)).astype(np.float32)
    return interior + shell * (np.float32(cortical_hu) - interior)


@dataclass
class _Finding:
    """What a leaf changes, in three hooks called in order by :func:`render`: rigid moves of the
    spine above/below the target (before painting), the target body's own drawing (in place of
    a normal one), and an overlay painted over the finished anatomy. Each hook marks the pixels
    it changes in ``mask``. The base class draws a normal target and no finding."""

    # Rigid moves (pivot u, v, angle, du, dv) applied to the levels above / below the target.
    above: tuple[float, float, float, float, float] | None = None
    below: tuple[float, float, float, float, float] | None = None

    def move_neighbours(self, anat: _Anatomy) -> None:
        """Apply :attr:`above` and :attr:`below` to ``anat.frames``, in place."""
        for move, levels in ((self.above, _LEVELS < 0), (self.below, _LEVELS > 0)):
            if move is None:
                continue
            pu, pv, ang, du, dv = move
            c, s = np.cos(ang), np.sin(ang)
            f = anat.frames[levels]
            ru, rv = f[:, 0] - pu, f[:, 1] - pv
            f[:, 0], f[:, 1] = pu + c * ru - s * rv + du, pv + s * ru + c * rv + dv
            f[:, 2] += ang
            anat.frames[levels] = f

    def paint_target(self, canvas: _Canvas, anat: _Anatomy, mask: np.ndarray) -> None:
        _paint_body(canvas, anat, anat.frames[_target()])

    def paint_overlay(self, canvas: _Canvas, anat: _Anatomy, mask: np.ndarray) -> None:
        pass


def _target() -> int:
    return int(np.flatnonzero(_LEVELS == 0)[0])


def _paint_anatomy(canvas: _Canvas, anat: _Anatomy, finding: _Finding, mask: np.ndarray) -> None:
    """Paint the patient from the skin inwards, deepest structures last; the target body is the
    finding's to draw (and to mark in ``mask``)."""
    hu, u, v = canvas.hu, canvas.u, canvas.v
    full = (slice(0, canvas.size), slice(0, canvas.size))
    # Body outline: everything anterior of the back's skin is the patient; the abdomen extends
    # beyond the left edge. Soft tissue is mottled a little, and fat lobules sit anteriorly.
    depth = np.float32(anat.skin) + np.float32(anat.skin_curve) * v * v - u  # mm inside the skin
    soft = np.float32(anat.hu["soft"]) + np.float32(6.0) * canvas.texture(1, full)
    lobules = (canvas.texture(3, full) > 0.9) & (u < np.float32(-anat.a - 6.0))
    fat = (lobules | (depth < np.float32(anat.fat))).astype(np.float32)
    soft += fat * (np.float32(anat.hu["fat"]) - soft)
    _fill(hu, depth > 0, soft)

    canal = anat.canal
    for frame in anat.frames:  # spinal canal, a band behind the bodies and discs
        pitch_half = anat.b + 8.0
        cframe = _shift(frame, anat.a + canal / 2, 0.0)
        win = _frame_window(canvas, cframe, canal / 2, pitch_half)
        if win is None:
            continue
        p, q = _local(canvas, win, cframe)
        inside = (np.abs(p) < canal / 2) & (np.abs(q) < pitch_half)
        _fill(hu[win], inside, anat.hu["csf"])

    for frame, (po, qo, length, half_h, tilt) in zip(anat.frames, anat.pe):  # posterior elements
        pframe = _shift(frame, po + length / 2, qo)
        pframe = (pframe[0], pframe[1], pframe[2] + tilt)
        win = _frame_window(canvas, pframe, length / 2, half_h)
        if win is None:
            continue
        p, q = _local(canvas, win, pframe)
        # Tapers towards the tip of the spinous process.
        taper = np.float32(1.0) - np.float32(0.35) * (p / np.float32(length) + np.float32(0.5))
        sdf = _round_box_sdf(p, q / taper, length / 2, half_h, 3.0)
        trabecular = np.float32(anat.hu["trabecular"]) * canvas.texture(0, win)
        interior = np.float32(anat.hu["posterior"]) + trabecular
        _fill(hu[win], sdf < 0, _bone(sdf, anat.cortex * 0.8, anat.hu["cortical"], interior))

    for upper, lower in zip(anat.frames[:-1], anat.frames[1:]):  # discs between the bodies
        frame = tuple((np.asarray(upper) + np.asarray(lower)) / 2)
        half_q = (lower[1] - upper[1]) / 2 - anat.b + anat.radius + 1.5
        win = _frame_window(canvas, frame, anat.a + 1.0, half_q)
        if win is None:
            continue
        p, q = _local(canvas, win, frame)
        sdf = _round_box_sdf(p, q, anat.a + 0.8, half_q, 2.5)
        _fill(hu[win], sdf < 0, anat.hu["disc"])

    for i, frame in enumerate(anat.frames):
        if i == _target():
            finding.paint_target(canvas, anat, mask)
        else:
            _paint_body(canvas, anat, frame)


def _shift(frame, dp: float, dq: float):
    """The frame moved by (dp, dq) along its own axes."""
    return (*_frame_point(frame, dp, dq), frame[2])


def _paint_body(canvas: _Canvas, anat: _Anatomy, frame) -> None:
    win = _frame_window(canvas, frame, anat.a, anat.b)
    if win is None:
        return
    p, q = _local(canvas, win, frame)
    sdf = _round_box_sdf(p, q, anat.a, anat.b, anat.radius)
    _fill(canvas.hu[win], sdf < 0, _body_values(canvas, anat, win, sdf))


def _body_values(canvas: _Canvas, anat: _Anatomy, win, sdf: np.ndarray, density=1.0) -> np.ndarray:
    """Vertebral body HU for pixels with signed distance ``sdf``: cortical rim, trabecular core.
    ``density`` scales the cancellous bone (compacted bone after a compression is denser)."""
    trabecular = np.float32(anat.hu["trabecular"]) * canvas.texture(0, win)
    core = np.float32(anat.hu["cancellous"]) * density + trabecular
    return _bone(sdf, anat.cortex, anat.hu["cortical"], core)


def _acquire(canvas: _Canvas, knobs: dict, rng: np.random.Generator) -> np.ndarray:
    """Point spread + correlated noise, as a reconstruction kernel shapes both, then the 12-bit
    range. -> (size, size) float32 HU."""
    sigma = knobs["psf_mm"] / canvas.px
    gain = knobs["noise_hu"] / _blurred_noise_std(round(sigma, 4))
    if sigma >= 1.0:
        # The PSF sums >= 4 pi sigma^2 ~ 13 independent samples into each pixel, so uniform
        # samples come out Gaussian (excess kurtosis > -0.1) at a quarter of the cost of normal
        # ones, the largest single saving at 512 px.
        noise = rng.random(canvas.hu.shape, dtype=np.float32)
        noise -= np.float32(0.5)
        gain *= math.sqrt(12.0)  # unit variance
    else:
        noise = rng.standard_normal(canvas.hu.shape, dtype=np.float32)
    noise *= np.float32(gain)
    noise += canvas.hu
    out = ndimage.gaussian_filter(noise, sigma, truncate=3.0, mode="nearest")
    return np.clip(out, HU_MIN, HU_MAX, out=out)


@functools.lru_cache(maxsize=64)
def _blurred_noise_std(sigma: float) -> float:
    """Std of unit white noise after the same 2-D Gaussian filter as :func:`_acquire`."""
    half = math.ceil(3.0 * sigma) + 1
    delta = np.zeros(2 * half + 1, dtype=np.float64)
    delta[half] = 1.0
    k = ndimage.gaussian_filter1d(delta, sigma, truncate=3.0)
    return float((k**2).sum())  # separable: the 2-D kernel's squared norm is this squared


# -- findings ---------------------------------------------------------------------------------


def _no_finding(rng: np.random.Generator, anat: _Anatomy, knobs: dict) -> _Finding:
    return _Finding()


@dataclass
class _Deformed(_Finding):
    """A fractured target: the body's (p, q) box is remapped, pieces of it may move, and the
    space it lost is filled (by disc tissue at the endplates, haematoma between fragments)."""

    top: Callable[[np.ndarray], np.ndarray] | None = None  # new superior endplate q(p)
    bottom: float = 0.0  # new inferior endplate q
    spread: float = 1.0  # AP widening factor
    density_gain: float = 0.0  # extra cancellous density at full compaction
    lines: list[tuple[float, float, float]] = field(default_factory=list)  # (p0, q0, angle)
    line_width: float = 1.0
    # Fragments: (cut point 1, cut point 2 (p, q), displacement (dp, dq), rotation radians);
    # the fragment is the part of the body on the outer side of the cut line 1 -> 2.
    pieces: list[tuple[tuple[float, float], tuple[float, float], tuple[float, float], float]] = field(
        default_factory=list
    )
    haematoma_hu: float = 55.0

    def paint_target(self, canvas, anat, mask):
        frame = anat.frames[_target()]
        reach = max((abs(d[0]) + abs(d[1]) for _, _, d, _ in self.pieces), default=0.0)
        win = _frame_window(canvas, frame, anat.a * self.spread + reach, anat.b + reach)
        if win is None:
            return
        hu = canvas.hu[win]
        p, q = _local(canvas, win, frame)
        original = _round_box_sdf(p, q, anat.a, anat.b, anat.radius) < 0
        _fill(hu, original, anat.hu["disc"])  # lost height: the discs bulge in

        body_sdf, density = self._sdf(p, q, anat)
        body = body_sdf < 0
        _fill(hu, body, self.haematoma_hu)
        main = body.copy()
        for a1, a2, _, _ in self.pieces:
            main &= ~_outer_side(p, q, a1, a2)
        values = _body_values(canvas, anat, win, body_sdf, density)
        for p0, q0, ang in self.lines:  # fracture lines split the main piece
            c, s = np.float32(math.cos(ang)), np.float32(math.sin(ang))
            across = (p - np.float32(p0)) * c + (q - np.float32(q0)) * s
            main &= np.abs(across) > np.float32(self.line_width / 2)
        _fill(hu, main, values)
        found = original | body  # the deformed body and the height it lost
        for a1, a2, (dp, dq), rot in self.pieces:
            # Inverse-map each pixel to where it came from: rotate about the cut's midpoint.
            mp, mq = (a1[0] + a2[0]) / 2, (a1[1] + a2[1]) / 2
            c, s = np.float32(np.cos(-rot)), np.float32(np.sin(-rot))
            rp, rq = p - np.float32(mp + dp), q - np.float32(mq + dq)
            sp, sq = mp + c * rp - s * rq, mq + s * rp + c * rq
            src_sdf, src_density = self._sdf(sp, sq, anat)
            piece = (src_sdf < 0) & _outer_side(sp, sq, a1, a2)
            _fill(hu, piece, _body_values(canvas, anat, win, src_sdf, src_density))
            found |= piece
        mask[win] |= found

    def _sdf(self, p, q, anat):
        """Signed distance to the deformed body, and the cancellous density factor there."""
        b = anat.b
        top = self.top(p) if self.top is not None else np.float32(-b)
        height = np.float32(self.bottom) - top
        # Map the deformed span [top, bottom] back onto the original [-b, b].
        qn = (q - top) * (np.float32(2 * b) / height) - np.float32(b)
        sdf = _round_box_sdf(p / np.float32(self.spread), qn, anat.a, b, anat.radius)
        compaction = np.float32(1.0) - height / np.float32(2 * b)
        return sdf, np.float32(1.0) + np.float32(self.density_gain) * compaction


def _outer_side(p, q, a1, a2) -> np.ndarray:
    """Pixels on the fragment's side of the cut a1 -> a2: the side the body's outline lies on
    when the cut runs clockwise around the fragment (as seen on screen, q pointing down)."""
    ex, ey = a2[0] - a1[0], a2[1] - a1[1]
    return (p - np.float32(a1[0])) * np.float32(ey) - (q - np.float32(a1[1])) * np.float32(ex) < 0


def _compression(rng, anat, knobs) -> _Finding:
    lo, hi = knobs["compression_loss"]
    loss = rng.uniform(lo, hi)
    a, b = anat.a, anat.b
    drop = 2 * b * loss
    curve = rng.uniform(0.7, 1.2)

    def top(p):  # 0 at the posterior wall, ``drop`` at the anterior wall
        t = np.clip((np.float32(a) - p) / np.float32(2 * a), 0, 1)
        return np.float32(-b) + np.float32(drop) * t ** np.float32(curve)

    # The spine above tilts forward into part of the gap, about the target's posterior-superior
    # corner (kyphotic angulation); the rest of the gap is disc tissue.
    tilt = -rng.uniform(0.3, 0.6) * np.arctan(drop / (2 * a))
    pu, pv = _frame_point(anat.frames[_target()], a, -b)
    return _Deformed(
        above=(pu, pv, tilt, 0.0, 0.0), top=top, bottom=b, density_gain=rng.uniform(0.6, 1.0)
    )


def _burst(rng, anat, knobs) -> _Finding:
    lo, hi = knobs["burst_loss"]
    loss = rng.uniform(lo, hi)
    a, b = anat.a, anat.b
    share = rng.uniform(0.55, 0.8)  # the superior endplate usually gives more
    top_q, bottom_q = -b + 2 * b * loss * share, b - 2 * b * loss * (1 - share)
    spread = 1.0 + rng.uniform(0.04, 0.10)
    ap, height = a * spread, bottom_q - top_q
    dip = rng.uniform(0.0, 0.15) * height  # central endplate depression

    def top(p):  # deepest in the middle of the endplate
        return np.float32(top_q) + np.float32(dip) * np.clip(1 - (p / np.float32(ap)) ** 2, 0, 1)

    follow = rng.uniform(0.4, 0.7)  # how far the neighbours settle into the lost height
    middle = (top_q + bottom_q) / 2
    lines = [  # (p0, q0, angle of the line's normal): mostly vertical, through the middle
        (rng.uniform(-0.5, 0.4) * ap, middle + rng.uniform(-0.3, 0.3) * height, rng.uniform(-0.6, 0.6))
        for _ in range(rng.integers(2, 4))
    ]
    f_lo, f_hi = knobs["fragment_shift_mm"]
    anterior = (
        (-ap + rng.uniform(0.3, 0.45) * 2 * ap, top_q),
        (-ap - 1.0, top_q + rng.uniform(0.45, 0.7) * height),
        (-rng.uniform(f_lo, f_hi), -rng.uniform(0.0, 0.5) * f_lo),
        np.deg2rad(rng.uniform(-8, 8)),
    )
    r_lo, r_hi = knobs["retropulsion"]
    intrusion = rng.uniform(r_lo, r_hi) * anat.canal + anat.cortex
    # Wider than its displacement: the fragment stays hinged on the body, as in real bursts.
    depth = max(rng.uniform(0.2, 0.3) * 2 * ap, intrusion + rng.uniform(2.0, 4.0))
    posterior = (
        (ap + 1.0, top_q + rng.uniform(0.4, 0.6) * height),
        (ap - depth, top_q),
        (intrusion, rng.uniform(-0.5, 1.5)),
        np.deg2rad(rng.uniform(-10, 5)),
    )
    return _Deformed(
        above=(0.0, 0.0, 0.0, 0.0, follow * (top_q + b)),
        below=(0.0, 0.0, 0.0, 0.0, -follow * (b - bottom_q)),
        top=top,
        bottom=bottom_q,
        spread=spread,
        density_gain=rng.uniform(0.2, 0.5),
        lines=lines,
        line_width=knobs["fracture_line_mm"],
        pieces=[anterior, posterior],
        haematoma_hu=rng.uniform(45, 65),
    )


@dataclass
class _Lesion(_Finding):
    """A lesion inside the target body, in the body's frame."""

    centre: tuple[float, float] = (0.0, 0.0)
    radius: float = 5.0
    aspect: float = 1.0
    angle: float = 0.0
    harmonics: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # (k, amplitude, phase)
    edge: float = 0.0  # 0 = sharp
    lesion_hu: float = 0.0
    texture_hu: float = 0.0
    breach_hu: float = 50.0  # soft-tissue component outside the body

    def paint_overlay(self, canvas, anat, mask):
        frame = anat.frames[_target()]
        reach = self.radius * (1 + np.abs(self.harmonics[:, 1]).sum()) + 2 * self.edge + 1
        lframe = _shift(frame, *self.centre)
        lframe = (lframe[0], lframe[1], lframe[2] + self.angle)
        win = _frame_window(canvas, lframe, reach, reach)
        if win is None:
            return
        p, q = _local(canvas, win, lframe)
        qa = q / np.float32(self.aspect)
        rho = np.sqrt(p * p + qa * qa)
        if len(self.harmonics):
            theta = np.arctan2(q, p)
            bound = np.full_like(rho, np.float32(1.0))
            for k, amp, phase in self.harmonics:
                bound += np.float32(amp) * np.cos(np.float32(k) * theta + np.float32(phase))
            bound *= np.float32(self.radius)
        else:
            bound = np.float32(self.radius)
        if self.edge > 0:  # ill-defined: a smooth ramp across the margin
            w = np.clip(np.float32(0.5) - (rho - bound) / np.float32(2 * self.edge), 0, 1)
            w = w * w * (np.float32(3) - np.float32(2) * w)
        else:
            w = (rho <= bound).astype(np.float32)
        bp, bq = _local(canvas, win, frame)
        in_body = _round_box_sdf(bp, bq, anat.a, anat.b, anat.radius) < 0
        hu = canvas.hu[win]
        value = np.float32(self.lesion_hu)
        outside = np.float32(self.breach_hu)
        if self.texture_hu:
            tex = canvas.texture(1, win) * np.float32(0.8) + canvas.texture(2, win) * np.float32(0.6)
            value = value + np.float32(self.texture_hu) * tex
            outside = outside + np.float32(0.3 * self.texture_hu) * tex
        target = outside + in_body.astype(np.float32) * (value - outside)
        hu += w * (target - hu)
        mask[win] |= w >= 0.5


def _lesion_centre(rng, anat, reach: float, margin: float) -> tuple[float, float]:
    hp, hq = max(anat.a - reach - margin, 0.5), max(anat.b - reach - margin, 0.5)
    return rng.uniform(-hp, hp), rng.uniform(-hq, hq)


def _benign(rng, anat, knobs) -> _Finding:
    lo, hi = knobs["lesion_radius_mm"]
    radius = min(rng.uniform(lo, hi), anat.b - anat.cortex - 2.0)
    contrast = knobs["lesion_contrast"]
    sclerotic = rng.uniform() < 0.7  # bone islands are the commonest incidental benign lesion
    delta = rng.uniform(550, 800) if sclerotic else -rng.uniform(170, 220)
    return _Lesion(
        centre=_lesion_centre(rng, anat, radius, anat.cortex + 1.5),
        radius=radius,
        aspect=rng.uniform(0.85, 1.0),
        angle=rng.uniform(0, np.pi),
        lesion_hu=anat.hu["cancellous"] + contrast * delta,
    )


def _malignant(rng, anat, knobs) -> _Finding:
    lo, hi = knobs["lesion_radius_mm"]
    radius = min(rng.uniform(lo * 1.1, hi * 1.1), anat.b - 1.0)
    contrast = knobs["lesion_contrast"]
    ks = np.arange(2, 6)
    amps = knobs["irregularity"] * rng.uniform(0.3, 1.0, len(ks)) / np.sqrt(ks - 1)
    harmonics = np.column_stack([ks, amps, rng.uniform(0, 2 * np.pi, len(ks))])
    blastic = rng.uniform() < 0.25
    delta = rng.uniform(300, 500) if blastic else -rng.uniform(150, 220)
    if rng.uniform() < 0.5:  # centred near the anterior or posterior cortex, breaching it
        side = rng.choice([-1.0, 1.0])
        centre = (side * (anat.a - radius * rng.uniform(0.3, 0.8)), rng.uniform(-0.4, 0.4) * anat.b)
    else:
        centre = _lesion_centre(rng, anat, radius, 1.0)
    return _Lesion(
        centre=centre,
        radius=radius,
        aspect=rng.uniform(0.75, 1.0),
        angle=rng.uniform(0, np.pi),
        harmonics=harmonics,
        edge=knobs["edge_mm"],
        lesion_hu=anat.hu["cancellous"] + contrast * delta,
        texture_hu=knobs["lesion_texture_hu"],
        breach_hu=anat.hu["soft"] + 10.0,
    )


_FINDINGS: dict[str, Callable[[np.random.Generator, _Anatomy, dict], _Finding]] = {
    "normal/normal": _no_finding,
    "fracture/compression": _compression,
    "fracture/burst": _burst,
    "lesion/benign": _benign,
    "lesion/malignant": _malignant,
}
LEAVES: tuple[str, ...] = tuple(_FINDINGS)


def _check_difficulty(difficulty: float) -> float:
    if not 0.0 <= float(difficulty) <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty!r}")
    return float(difficulty)


# -- DICOM encoding ---------------------------------------------------------------------------

_STUDY_DATE, _STUDY_TIME = "20240115", "093000"  # fixed: files must not depend on the clock
_SLICE_THICKNESS_MM = 2.0


@dataclass(frozen=True)
class Uids:
    """The UIDs of one image: study and series (shared by a patient's slices), frame of
    reference, and the SOP instance. Derived from names, never random: see :meth:`derive`."""

    study: str
    series: str
    frame_of_reference: str
    sop: str

    @classmethod
    def derive(cls, namespace: str, patient_id: str, instance: int) -> Uids:
        """Deterministic UIDs for ``instance`` (1-based) of ``patient_id``'s single series,
        unique per ``namespace`` (which should name everything that changes the pixels)."""

        def uid(*parts: object) -> str:
            return writing.derived_uid(namespace, patient_id, *parts)

        return cls(uid("study"), uid("series"), uid("frame-of-reference"), uid("sop", instance))


def dicom_bytes(
    hu: np.ndarray,
    *,
    uids: Uids,
    patient_id: str,
    issuer: str = "",
    patient_name: str = "",
    birth_date: str = "",
    sex: str = "O",
    accession: str = "",
    study_id: str = "1",
    series_number: int = 1,
    instance_number: int = 1,
    slice_location_mm: float = 0.0,
    pixel_spacing_mm: float | None = None,
    photometric: str = "MONOCHROME2",
    transfer_syntax: str = ExplicitVRLittleEndian,
    signed: bool = True,
    multi_window: bool = False,
) -> bytes:
    """One sagittal CT image as a DICOM Part 10 file (preamble, file meta, dataset).

    ``hu``: (rows, columns) Hounsfield units, rounded to integers and clipped to [-1024, 3071].
    Stored value = HU + 1024 (RescaleIntercept -1024): ``signed`` stores int16 with 16 bits
    stored, otherwise unsigned with 12 bits stored. ``photometric`` "MONOCHROME1" stores the
    image inverted about the bone window (HU' = 2 * 400 - 1 - HU), so that a reader applying the
    modality LUT, pydicom's LINEAR window (400, 1800) and the MONOCHROME1 inversion displays
    exactly the MONOCHROME2 image; it needs ``signed`` and a single window. ``multi_window`` adds
    the soft-tissue window after the bone window. ``transfer_syntax``: Explicit VR Little Endian
    or a lossless syntax from :func:`compressed_syntaxes`. ``pixel_spacing_mm`` defaults to
    :data:`FOV_MM` / columns; ``slice_location_mm``: the slice's left-right position.
    """
    hu = np.asarray(hu)
    transfer_syntax = _check_encoding(hu, photometric, transfer_syntax, signed, multi_window)
    stored = _stored_values(hu, inverted=photometric == "MONOCHROME1", signed=signed)
    spacing = FOV_MM / stored.shape[1] if pixel_spacing_mm is None else float(pixel_spacing_mm)

    ds = Dataset(dict(_constant_elements()))  # shared elements, never modified
    ds.file_meta = writing.file_meta(CTImageStorage, uids.sop)
    ds.SOPInstanceUID = uids.sop
    ds.AccessionNumber = accession
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    if issuer:
        ds.IssuerOfPatientID = issuer
    ds.PatientBirthDate = birth_date
    ds.PatientSex = sex
    ds.StudyInstanceUID = uids.study
    ds.SeriesInstanceUID = uids.series
    ds.FrameOfReferenceUID = uids.frame_of_reference
    ds.StudyID = study_id
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    _set_geometry(ds, stored.shape, spacing, slice_location_mm)
    _set_display(ds, photometric, signed, multi_window)
    _set_pixels(ds, stored, transfer_syntax)
    return writing.part10_bytes(ds)


def _check_encoding(hu: np.ndarray, photometric: str, transfer_syntax: str, signed: bool, multi_window: bool) -> UID:
    """:func:`dicom_bytes`' arguments checked -> the transfer syntax as a UID."""
    if hu.ndim != 2:
        raise ValueError(f"hu must be a 2-D image, got shape {hu.shape}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if photometric == "MONOCHROME1" and (not signed or multi_window):
        raise ValueError(
            "MONOCHROME1 phantoms store inverted values below zero and define a single window: "
            "use signed=True, multi_window=False"
        )
    transfer_syntax = UID(transfer_syntax)
    if transfer_syntax != ExplicitVRLittleEndian and transfer_syntax not in compressed_syntaxes():
        raise ValueError(
            f"transfer syntax {transfer_syntax} ({transfer_syntax.name}) is not available here; "
            f"use Explicit VR Little Endian or one of {[str(u) for u in compressed_syntaxes()]}"
        )
    return transfer_syntax


def _stored_values(hu: np.ndarray, *, inverted: bool, signed: bool) -> np.ndarray:
    """HU (rows, columns) -> stored values HU + 1024: int16, or uint16 (12 bits) unless ``signed``;
    reflected about the bone window first when ``inverted`` (MONOCHROME1, see :func:`dicom_bytes`)."""
    values = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)
    if inverted:
        # pydicom's LINEAR window maps x to (x - (c - 0.5)) / (w - 1) + 0.5, so reflecting about
        # c - 0.5, i.e. x' = 2c - 1 - x, gives exactly 1 - y: the inversion undoes it.
        values = np.int16(2 * BONE_WINDOW[0] - 1) - values
    stored = values - np.int16(RESCALE_INTERCEPT)  # HU + 1024
    if not signed:
        stored = stored.astype(np.uint16)  # 0..4095 already: HU was clipped to 12 bits
    return stored


def _set_geometry(ds: Dataset, shape: tuple[int, int], spacing: float, slice_location_mm: float) -> None:
    """Sagittal geometry of a (rows, columns) image of ``spacing`` mm pixels."""
    rows, cols = shape
    ds.ReconstructionDiameter = writing.decimal_string(spacing * cols)
    # Sagittal: rows run anterior -> posterior (+y in LPS), columns superior -> inferior (-z);
    # the position is the centre of the top-left pixel.
    ds.ImagePositionPatient = [
        writing.decimal_string(slice_location_mm),
        writing.decimal_string(-spacing * (cols - 1) / 2),
        writing.decimal_string(spacing * (rows - 1) / 2),
    ]
    ds.SliceLocation = writing.decimal_string(slice_location_mm)
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [writing.decimal_string(spacing), writing.decimal_string(spacing)]


def _set_display(ds: Dataset, photometric: str, signed: bool, multi_window: bool) -> None:
    """Photometric interpretation, the stored value's bits and sign, and the window(s)."""
    ds.PhotometricInterpretation = photometric
    ds.BitsStored = 16 if signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if multi_window:
        ds.WindowCenter = [writing.decimal_string(BONE_WINDOW[0]), writing.decimal_string(SOFT_TISSUE_WINDOW[0])]
        ds.WindowWidth = [writing.decimal_string(BONE_WINDOW[1]), writing.decimal_string(SOFT_TISSUE_WINDOW[1])]
        ds.WindowCenterWidthExplanation = ["BONE", "SOFT TISSUE"]
    else:
        ds.WindowCenter, ds.WindowWidth = writing.decimal_string(BONE_WINDOW[0]), writing.decimal_string(BONE_WINDOW[1])
        ds.WindowCenterWidthExplanation = "BONE"


def _set_pixels(ds: Dataset, stored: np.ndarray, transfer_syntax: UID) -> None:
    """The stored values as native OW pixel data, or encoded in a lossless ``transfer_syntax``."""
    if transfer_syntax == ExplicitVRLittleEndian:
        ds.PixelData = stored.astype(stored.dtype.newbyteorder("<"), copy=False).tobytes()
        ds["PixelData"].VR = "OW"
        return
    encoder = get_encoder(transfer_syntax)
    # pylibjpeg's RLE encoder is compiled; pydicom's own is pure numpy and ~10x slower.
    plugin = "pylibjpeg" if "pylibjpeg" in encoder.available_plugins else ""
    ds.compress(transfer_syntax, stored, encoding_plugin=plugin, generate_instance_uid=False)


@functools.lru_cache(maxsize=1)
def _constant_elements() -> dict:
    """The data elements every phantom shares, built once: setting them one by one through
    pydicom costs about as much as writing the whole file."""
    ds = writing.image_elements()
    # A sagittal slice is a multiplanar reformat of an axial acquisition.
    ds.ImageType = ["DERIVED", "SECONDARY", "REFORMATTED"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = _STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = _STUDY_TIME
    ds.Modality = "CT"
    ds.StudyDescription = "CT LUMBAR SPINE"
    ds.SeriesDescription = "SAG BONE"
    ds.ManufacturerModelName = "phantom-ct"
    ds.BodyPartExamined = "LSPINE"
    ds.SliceThickness = writing.decimal_string(_SLICE_THICKNESS_MM)
    ds.KVP = "120"
    ds.XRayTubeCurrent = 200
    ds.ConvolutionKernel = "BONE"
    ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]
    ds.RescaleIntercept = writing.decimal_string(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return {elem.tag: elem for elem in ds}


@functools.lru_cache(maxsize=1)
def compressed_syntaxes() -> tuple[UID, ...]:
    """The lossless compressed transfer syntaxes pydicom can encode here (RLE Lossless, JPEG
    2000 Lossless), in that order; the plugins for each may be missing on a given machine."""
    return tuple(uid for uid in (RLELossless, JPEG2000Lossless) if get_encoder(uid).is_available)


# -- archives ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSpec:
    """Everything that decides one archive image, drawn up front by :func:`plan_archive`.

    ``path`` is relative to the archive root; ``render_seed`` seeds the pixels
    (``np.random.default_rng(render_seed)``), the rest decides the encoding."""

    index: int  # 0-based position in the archive and in labels.csv
    path: str
    leaf: str
    patient: int  # 1-based
    instance: int  # 1-based within the patient's series
    instances: int  # slices in the series
    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    sex: str
    accession: str
    uids: Uids
    photometric: str
    transfer_syntax: str
    signed: bool
    multi_window: bool
    render_seed: tuple[int, ...]

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(list(self.render_seed))

    def render(self, size: int, difficulty: float) -> Phantom:
        """The phantom this image shows (the archive must use the same size and difficulty)."""
        return render(self.leaf, self.rng(), size=size, difficulty=difficulty)

    def encode(self, size: int, difficulty: float) -> bytes:
        """The file's bytes, exactly as :func:`generate_archive` writes them."""
        return self.encode_phantom(self.render(size, difficulty))

    def encode_phantom(self, phantom: Phantom, **overrides) -> bytes:
        """``phantom`` encoded with this image's tags; ``overrides`` replace
        :func:`dicom_bytes` arguments (e.g. photometric="MONOCHROME2")."""
        slice_mm = (self.instance - (self.instances + 1) / 2) * _SLICE_THICKNESS_MM
        kwargs = dict(
            uids=self.uids,
            patient_id=self.patient_id,
            issuer=self.issuer,
            patient_name=self.patient_name,
            birth_date=self.birth_date,
            sex=self.sex,
            accession=self.accession,
            instance_number=self.instance,
            slice_location_mm=slice_mm,
            photometric=self.photometric,
            transfer_syntax=self.transfer_syntax,
            signed=self.signed,
            multi_window=self.multi_window,
        )
        kwargs.update(overrides)
        return dicom_bytes(phantom.hu, **kwargs)


def plan_archive(
    n: int,
    seed: int = 0,
    size: int = 256,
    *,
    difficulty: float = 0.3,
    taxonomy: Taxonomy | None = None,
    monochrome1_fraction: float = 0.1,
    compressed_fraction: float = 0.2,
) -> list[ImageSpec]:
    """The ``n`` images :func:`generate_archive` writes with the same arguments, in labels.csv
    order, without rendering anything. Patients come one after another, each with one leaf
    (drawn with :func:`leaf_weights`) and 1-3 slices; the last one may be cut short by ``n``."""
    taxonomy = _taxonomy(taxonomy)
    _check_archive_args(n, seed, size, difficulty, monochrome1_fraction, compressed_fraction)
    leaves = list(taxonomy.leaf_names)
    weights = leaf_weights(leaves, difficulty)
    # Everything that changes pixels or labels names the UIDs, so two archives never share one.
    namespace = f"medhier-phantom|{seed}|{int(size)}|{float(difficulty)!r}|{','.join(leaves)}"
    plan_rng = np.random.default_rng([seed, 0])
    width = max(4, len(str(n)))  # P0001...; wider only past 9999 patients
    specs: list[ImageSpec] = []
    patient = 0
    while len(specs) < n:
        patient += 1
        leaf = leaves[plan_rng.choice(len(leaves), p=weights)]
        count = min(int(plan_rng.integers(1, 4)), n - len(specs))
        year, month, day = (int(plan_rng.integers(lo, hi)) for lo, hi in ((1935, 2000), (1, 13), (1, 29)))
        sex = "MF"[int(plan_rng.integers(0, 2))]
        patient_id = f"PHANTOM-{patient:0{width}d}"
        for instance in range(1, count + 1):
            index = len(specs)
            specs.append(
                ImageSpec(
                    index=index,
                    path=f"P{patient:0{width}d}/ST01/SE01/IM{instance:04d}.dcm",
                    leaf=leaf,
                    patient=patient,
                    instance=instance,
                    instances=count,
                    patient_id=patient_id,
                    issuer=f"MEDHIER-PHANTOM-S{seed}",
                    patient_name=f"PHANTOM^P{patient:0{width}d}",
                    birth_date=f"{year}{month:02d}{day:02d}",
                    sex=sex,
                    accession=f"A{seed % 10000:04d}{patient:07d}",
                    uids=Uids.derive(namespace, patient_id, instance),
                    render_seed=(seed, 1, index),
                    **_draw_encoding(seed, index, monochrome1_fraction, compressed_fraction),
                )
            )
    return specs


def _draw_encoding(seed: int, index: int, monochrome1_fraction: float, compressed_fraction: float) -> dict:
    """Image ``index``'s encoding choices (:class:`ImageSpec` fields photometric, transfer_syntax,
    signed, multi_window), from ``default_rng([seed, 2, index])`` alone (the module docstring)."""
    draws = np.random.default_rng([seed, 2, index]).random(5)
    syntaxes = compressed_syntaxes()
    mono1 = bool(draws[0] < monochrome1_fraction)
    compressed = bool(draws[1] < compressed_fraction) and bool(syntaxes)
    return dict(
        photometric="MONOCHROME1" if mono1 else "MONOCHROME2",
        transfer_syntax=syntaxes[int(draws[2] * len(syntaxes))] if compressed else ExplicitVRLittleEndian,
        signed=mono1 or bool(draws[3] >= 1 / 3),
        multi_window=not mono1 and bool(draws[4] < 0.3),
    )


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate_archive` wrote. ``files``/``bytes`` count the DICOM files only."""

    out: str
    files: int
    bytes: int
    patients: int
    leaves: dict[str, int]
    transfer_syntaxes: dict[str, int]  # by name, e.g. "RLE Lossless"
    photometrics: dict[str, int]

    def table(self) -> str:
        """A short printable summary."""
        lines = [f"{self.out}: {self.files} DICOM files, {self.bytes / 1e6:.1f} MB, {self.patients} patients"]
        for title, counts in (
            ("leaf", self.leaves),
            ("transfer syntax", self.transfer_syntaxes),
            ("photometric", self.photometrics),
        ):
            width = max([len(title), *map(len, counts)])
            lines.append(f"  {title:<{width}}  files")
            lines += [f"  {name:<{width}}  {count:5d}" for name, count in counts.items()]
        return "\n".join(lines)


def generate_archive(
    out: str,
    n: int,
    seed: int = 0,
    size: int = 256,
    *,
    difficulty: float = 0.3,
    taxonomy: Taxonomy | None = None,
    storage_cfg: StorageConfig | None = None,
    monochrome1_fraction: float = 0.1,
    compressed_fraction: float = 0.2,
    patient_salt: str = "",
    workers: int = 1,
) -> SynthSummary:
    """Write ``n`` phantom DICOM files of ``size`` x ``size`` pixels under ``out`` (a folder or
    ``s3://bucket/prefix``) as ``P0001/ST01/SE01/IM0001.dcm``..., then ``labels.csv`` with
    columns path,main,sub,patient_key (the key as medhier.dicom computes it with
    ``patient_salt``). ``workers`` > 1 renders in that many processes; the bytes do not change.
    Raises ValueError naming any ``taxonomy`` leaf that cannot be rendered.
    """
    if int(workers) != workers or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    specs = plan_archive(
        n,
        seed,
        size,
        difficulty=difficulty,
        taxonomy=taxonomy,
        monochrome1_fraction=monochrome1_fraction,
        compressed_fraction=compressed_fraction,
    )
    root = storage.normalize(out)
    cfg = storage_cfg or StorageConfig()
    encoded = _encoded(specs, size, difficulty, int(workers))
    sizes = writing.write_files(root, ((spec.path, data) for spec, data in zip(specs, encoded)), cfg, "synth-write")
    # The manifest goes last: whoever sees labels.csv sees a complete archive.
    storage.write_bytes(storage.join(root, "labels.csv"), _labels_csv(specs, patient_salt), cfg)
    leaf_counts = Counter(s.leaf for s in specs)
    return SynthSummary(
        out=root,
        files=len(specs),
        bytes=sum(sizes),
        patients=len({s.patient for s in specs}),
        leaves={leaf: leaf_counts[leaf] for leaf in _taxonomy(taxonomy).leaf_names},  # zeros too
        transfer_syntaxes=dict(sorted(Counter(UID(s.transfer_syntax).name for s in specs).items())),
        photometrics=dict(sorted(Counter(s.photometric for s in specs).items())),
    )


def _labels_csv(specs: list[ImageSpec], patient_salt: str) -> bytes:
    """labels.csv: path,main,sub,patient_key, one row per image in archive order."""
    text = io.StringIO()
    rows = csv.writer(text, lineterminator="\n")
    rows.writerow(["path", "main", "sub", "patient_key"])
    for spec in specs:
        main, sub = spec.leaf.split("/")
        rows.writerow([spec.path, main, sub, patient_key(spec.patient_id, spec.issuer, patient_salt)])
    return text.getvalue().encode("utf-8")


def _encoded(specs: list[ImageSpec], size: int, difficulty: float, workers: int) -> Iterator[bytes]:
    """Each spec's file bytes, in order; rendered in ``workers`` processes when > 1."""
    if workers == 1 or len(specs) < 2:
        for spec in specs:
            yield spec.encode(size, difficulty)
        return
    chunk = max(1, min(32, -(-len(specs) // (4 * workers))))
    chunks = [specs[i : i + chunk] for i in range(0, len(specs), chunk)]
    # forkserver, not fork: the caller may run threads (writers, S3 clients, a test's moto
    # server) that a forked child would inherit mid-lock.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method)) as pool:
        queue: list[Future] = []
        todo = iter(chunks)
        for part in todo:  # keep 2 chunks per worker in flight, not the whole archive
            queue.append(pool.submit(_encode_chunk, part, size, difficulty))
            if len(queue) >= 2 * workers:
                break
        while queue:
            results = queue.pop(0).result()
            part = next(todo, None)
            if part is not None:
                queue.append(pool.submit(_encode_chunk, part, size, difficulty))
            yield from results


def _encode_chunk(specs: list[ImageSpec], size: int, difficulty: float) -> list[bytes]:
    return [spec.encode(size, difficulty) for spec in specs]


def _taxonomy(taxonomy: Taxonomy | None) -> Taxonomy:
    taxonomy = taxonomy or Taxonomy.from_dict(DEFAULT_CLASSES)
    unknown = [leaf for leaf in taxonomy.leaf_names if leaf not in _FINDINGS]
    if unknown:
        raise ValueError(
            f"the phantom generator cannot render taxonomy leaves {unknown}; it renders {list(LEAVES)}"
        )
    return taxonomy


def _check_archive_args(n, seed, size, difficulty, monochrome1_fraction, compressed_fraction) -> None:
    if int(n) != n or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    writing.check_seed(seed)
    if int(size) != size or size < 32:
        raise ValueError(f"size must be an integer >= 32 pixels, got {size!r}")
    _check_difficulty(difficulty)
    fractions = {"monochrome1_fraction": monochrome1_fraction, "compressed_fraction": compressed_fraction}
    for name, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")


# -- broken files -----------------------------------------------------------------------------


def add_broken_files(out: str, storage_cfg: StorageConfig | None = None, seed: int = 0) -> dict[str, str]:
    """Write files under ``out``/broken/ that medhier.dicom must reject, one per kind of damage
    seen in real archives. -> {path relative to ``out`` (with "broken/"): expected
    :data:`medhier.dicom.REASONS` code}. They are not listed in labels.csv."""
    writing.check_seed(seed)
    root = storage.normalize(out)
    phantom = render("normal/normal", np.random.default_rng([seed, 3]), size=64, difficulty=0.0)
    namespace = f"medhier-phantom-broken|seed={seed}"
    uids = Uids.derive(namespace, "BROKEN-0001", 1)
    tags = dict(uids=uids, patient_id="BROKEN-0001", patient_name="BROKEN^P0001", accession="BROKEN1")
    valid = dicom_bytes(phantom.hu, **tags)
    pixel_bytes = phantom.hu.size * 2
    garbage = np.random.default_rng([seed, 4]).integers(0, 256, 512, dtype=np.uint8).tobytes()

    meta_tsuid = valid.index(b"\x02\x00\x10\x00UI")  # (0002,0010) Transfer Syntax UID, explicit VR
    files: dict[str, tuple[bytes, str]] = {
        # A transfer cut short: the header is intact, half the pixel data is missing.
        "truncated.dcm": (valid[: len(valid) - pixel_bytes // 2], "corrupt_pixels"),
        "notes.txt": (b"Radiology department notes: not an image.\n", "not_dicom"),
        "empty.dcm": (b"", "not_dicom"),
        "report_sr.dcm": (_text_report(Uids.derive(namespace, "BROKEN-0001", 2)), "no_pixels"),
        # A flipped byte in the file meta: its VR no longer names a known representation.
        "bad_header.dcm": (valid[: meta_tsuid + 4] + b"ZZ" + valid[meta_tsuid + 6 :], "corrupt_header"),
        "mpeg2.dcm": (_encapsulated(phantom.hu, tags, pydicom.uid.MPEG2MPML, garbage), "unsupported_syntax"),
    }
    j2k_decodable = pydicom.pixels.get_decoder(JPEG2000Lossless).is_available
    files["j2k_garbage.dcm"] = (
        _encapsulated(phantom.hu, tags, JPEG2000Lossless, garbage),
        "corrupt_pixels" if j2k_decodable else "unsupported_syntax",
    )
    expected = {}
    for name, (data, reason) in files.items():
        rel = f"broken/{name}"
        storage.write_bytes(storage.join(root, rel), data, storage_cfg)
        expected[rel] = reason
    return expected


def _encapsulated(hu: np.ndarray, tags: dict, syntax: str, fragment: bytes) -> bytes:
    """A phantom's header declaring ``syntax``, with ``fragment`` as its only encapsulated frame."""
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(hu, **tags)))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([fragment])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return writing.part10_bytes(ds)


def _text_report(uids: Uids) -> bytes:
    """A Basic Text SR: a valid DICOM object that carries no image."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.BasicTextSRStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uids.sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = pydicom.uid.BasicTextSRStorage
    ds.SOPInstanceUID = uids.sop
    ds.StudyDate = ds.ContentDate = _STUDY_DATE
    ds.StudyTime = ds.ContentTime = _STUDY_TIME
    ds.Modality = "SR"
    ds.Manufacturer = writing.MANUFACTURER
    ds.PatientName, ds.PatientID = "BROKEN^P0001", "BROKEN-0001"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids.study, uids.series
    ds.SeriesNumber, ds.InstanceNumber = 2, 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator = "18748-4", "LN"
    title.CodeMeaning = "Diagnostic imaging report"
    ds.ConceptNameCodeSequence = [title]
    finding = Dataset()
    finding.RelationshipType, finding.ValueType = "CONTAINS", "TEXT"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "121071", "DCM", "Finding"
    finding.ConceptNameCodeSequence = [concept]
    finding.TextValue = "No acute fracture of the lumbar spine."
    ds.ContentSequence = [finding]
    return writing.part10_bytes(ds)
