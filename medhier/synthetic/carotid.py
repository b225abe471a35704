"""Phantom carotid vessel-wall MR archives for the longitudinal plaque job (seed 003).

No labelled multi-visit carotid MRI can be downloaded where medhier is developed, so this module
draws its own: patients with a structured record, two or three visits each, and at every visit
four axial MR sequences of the neck around one index carotid artery with a plaque whose
components grow between the visits at known rates. Everything is deterministic by seed: the same
arguments give byte-identical files.

Image geometry
--------------
Every series is ``SIZE`` x ``SIZE`` = 64 x 64 pixels of ``PIXEL_MM`` = 0.5 mm (a 32 mm field of
view) and ``SLICES`` = 10 axial slices of ``SLICE_MM`` = 2 mm (contiguous), in LPS patient
coordinates: ImageOrientationPatient 1\\0\\0\\0\\1\\0 (rows run to the patient's left, columns to
posterior), slices ordered from head to feet (InstanceNumber 1 is the highest: the order
:mod:`medhier.io.volume` gives, so index k of every array here is its slice k). All four
sequences of a visit share the grid and the FrameOfReferenceUID (one scanner session); the
patient lies elsewhere in the scanner at every visit (the whole anatomy is shifted by up to
+-4 mm per axis and the field of view by +-2 mm in-plane against the vessel), and the slab is
placed so that the plaque's centre falls on the centre of slice 5 or 6.

Anatomy (anatomy frame: origin at the lumen centre of the plaque's centre slice, z along the
vessel, lateral = the index side)
--------------------------------------------------------------------------------------------
- The index carotid (left or right, equally often) runs along z with a gentle curvature: its
  centre line is (a_x z + b_x z^2, a_y z + b_y z^2), |a| <= 0.08, |b| <= 0.004 /mm, so it drifts
  by up to ~1.2 mm over the slab. Cross-sections are drawn in the axial plane (the small
  obliquity is ignored, so the areas below are the axial areas the measurements see).
- Lumen: a circle of radius r(z) = r_ref sqrt(1 - S p(z)) around the centre line, r_ref in
  [2.5, 3.5] mm; S is the area stenosis at the plaque centre and p(z) = cos^2(pi z / 2 L_p) the
  plaque profile (0 beyond |z| = L_p, L_p in [4.5, 6.5] mm), so the end slices are normal.
- Outer wall: a circle of radius R(z) = r(z) + (T(z) + w0) / 2 whose centre sits delta(z) =
  (T(z) - w0) / 2 off the lumen centre towards the plaque direction (random in-plane angle): the
  wall is w0 in [0.8, 1.0] mm thick opposite the plaque and T(z) = w0 + (T - w0) p(z) thick at
  the plaque, T being the maximum wall thickness of the visit.
- Plaque components, in polar coordinates (theta from the plaque direction, depth rho from the
  lumen boundary), on slices where the core profile q(z) = cos^2(pi z / 2 L_q) > 0
  (L_q in [0.55, 0.8] L_p):

  * lipid-rich necrotic core: |theta| < alpha(z), c <= rho < c + H(z) sqrt(1 - (theta/alpha)^2),
    with H(z) = beta (T(z) - c - 0.2 mm), beta in [0.6, 0.8] per patient; its area
    H alpha ((r + c) pi / 2 + 2 H / 3) follows A q(z), and A is solved (bisection, alpha capped
    at ``CORE_MAX_ANGLE_DEG``) so that the core's volume is the visit's lipid + haemorrhage
    volume;
  * fibrous cap: |theta| < alpha(z), 0 <= rho < c: a band of the visit's cap thickness c between
    the lumen and the core (so the thinnest cap is c, on every core slice);
  * intraplaque haemorrhage (some patients): inside the core, |theta| < kappa alpha(z),
    rho - c - 0.2 H in [0, eta H sqrt(1 - (theta / kappa alpha)^2)), eta in [0.45, 0.6]; kappa
    (<= 0.7, which keeps it inside the core) is solved so that its volume is the visit's
    haemorrhage volume; the lipid core label is the core minus the haemorrhage;
  * calcification (about half the patients): an annular sector of the wall beside the core,
    |theta - theta_c| < gamma with |theta_c| >= the core's largest angle + gamma + 5 deg, at
    depths [f1, f2] of the local wall thickness, over |z - z_c| < L_c; the same angles and depth
    fractions at every visit (calcification has no rate: its volume follows the wall).

  Labels: the exact values of :mod:`medhier.plaque.labels`; a component always wins over the
  wall, haemorrhage over lipid core, the lumen over everything.
- Distractors: the internal jugular vein (an ellipse 11.5-13.5 mm lateral, often cut by the
  field of view), the sternocleidomastoid (anterolateral) and a prevertebral muscle
  (posteromedial), the vagus nerve between artery and vein, in half the patients a lymph node
  anteromedially, and fat everywhere else. They are label 0 (background).

Acquisition
-----------
Each voxel's signal is the mean over 3 x 3 x 3 sub-samples (in-plane thirds of a pixel, the
three thirds of the 2 mm slab) of the tissue intensities below: partial volume at every edge
and through the slab. The truth label of a voxel is the label most of its 27 sub-samples carry
(ties: the centre sub-sample's label), on the T1w grid. Then: a smooth multiplicative bias field
(exp of a quadratic in x, y plus a linear z term, with a fixed +-12 % gradient towards the
anterolateral surface coil, drawn per sequence), a gain (muscle at 350-500 stored units) and
Rician noise (magnitude of the signal plus complex Gaussian noise, muscle SNR 15-25). Stored as
unsigned 16-bit with 12 bits stored (clipped at 4095), MONOCHROME2, Explicit VR Little Endian.

Relative intensities (muscle = 1 on T1w, T2w and TOF; each patient scales every entry by
U(0.95, 1.05)), from the multi-contrast carotid plaque literature (Cai et al., Circulation 2002;
Saam et al., Radiology 2005; fat-suppressed black-blood TSE for T1w, T2w and CE-T1w, 3D TOF
without fat suppression):

==============  =====  =====  =====  ======  ===============================================
tissue          T1w    T2w    TOF    CE-T1w  why
==============  =====  =====  =====  ======  ===============================================
lumen           0.12   0.12   4.00   0.18    flowing blood: black blood; bright inflow on TOF
wall            1.25   1.45   1.15   1.90    fibrous tissue: iso T1, iso-bright T2, enhances
lipid_core      1.15   0.75   1.05   1.20    iso on T1w, dark on T2w, does not enhance
haemorrhage     2.40   1.60   2.30   2.50    methaemoglobin: bright on T1w and TOF
calcification   0.20   0.15   0.25   0.20    dark on every sequence
fibrous_cap     1.30   1.90   0.75   2.60    bright T2, dark juxtaluminal band on TOF,
                                             enhances most on CE-T1w
fat             0.35   0.45   2.20   0.40    fat-suppressed except on TOF (short T1)
muscle          1.00   1.00   1.00   1.10    the reference; barely enhances
jugular_vein    0.30   0.35   0.35   0.70    slow venous flow; saturated on TOF; enhances
nerve           1.10   1.30   0.90   1.20
lymph_node      1.20   1.90   0.95   1.80
==============  =====  =====  =====  ======  ===============================================

So in every patient: haemorrhage > wall on T1w and TOF; lumen is the brightest tissue on TOF
and darker than the wall on T1w, T2w and CE-T1w; lipid core < wall on T2w and on CE-T1w while
within 15 % of it on T1w; calcification < every plaque tissue everywhere; cap > wall on CE-T1w
and T2w, cap < wall on TOF (the margins exceed the +-5 % jitter).

The TOF column follows the spoiled gradient echo's steady state, S ~ PD sin(a) (1 - E1) /
(1 - cos(a) E1) with E1 = exp(-TR / T1), at the protocol's TR 23 ms and flip angle 25 degrees
(3 T): stationary tissue is partly saturated, the shorter its T1 the less, so fat (T1 ~ 380 ms)
gives about 2.7 times the signal of muscle (T1 ~ 1400 ms) before proton density and the
opposed-phase echo (TE 3.5 ms) take some back: 2.2; unsaturated inflowing blood gives about
six times muscle in theory, partial saturation along the slab leaves 4.  (Until this was
written TOF fat stood at 1.3 and the lumen at 3.2: a TOF whose whole field outside the lumen
differed from muscle by 30 %, under a bias field of +-25 %, left mutual information with T1w
almost nothing but the lumen, which sits at the rotation centre; registration of TOF onto T1w
then missed its rotation by up to 25 degrees, see :mod:`medhier.plaque.register`.)

Misregistration
---------------
T1w is the reference. Each other sequence sees the patient moved by a known rigid motion about
the vessel centre: a rotation of 1-3 degrees about an axis near z and a translation of 0.5-1.5
mm in a random 3-D direction. ``truth_motion.parquet`` records it as the 4 x 4 matrix (LPS, mm)
that maps a T1w world point to where the same anatomy lies in that sequence: the transform a
registration of the sequence (moving) onto T1w (fixed) should find, in SimpleITK's convention.

Patients, rates and visits
--------------------------
Covariates (``patients.csv``, one row per patient, keyed by ``patient_key``): sex (F/M),
age_years (at the first visit), weight_kg, smoking (never/former/current), drinking
(none/moderate/heavy), systolic_bp_mmhg, diastolic_bp_mmhg, glucose_mmol_l (fasting),
heart_rate_bpm, statin (0/1), antihypertensive (0/1).

The true change rates per year are :func:`rate_function` of the covariates and of whether the
first visit shows haemorrhage, plus independent Gaussian noise with the standard deviations of
:data:`RATE_NOISE`. With the risk score

    risk = 0.04 (age - 65) + 0.4 [male] + 0.3 [former smoker] + 0.8 [current smoker]
           + 0.1 [moderate drinking] + 0.4 [heavy drinking] + 0.025 (systolic - 130)
           + 0.01 (diastolic - 80) + 0.25 (glucose - 5.5) + 0.01 (heart rate - 70)
           + 0.015 (weight - 75) - 0.9 [statin] - 0.2 [antihypertensive]

==================================  ======  =====================================  =====
rate                                unit    noise-free value                       noise
==================================  ======  =====================================  =====
wall_thickening_mm_per_year         mm/y    0.08 + 0.06 risk + 0.05 [IPH]          0.03
stenosis_change_pct_per_year        pp/y    1.0 + 1.0 risk + 0.8 [IPH]             0.6
lipid_growth_mm3_per_year           mm3/y   2.0 + 2.0 risk - 1.5 [statin]          1.0
haemorrhage_change_mm3_per_year     mm3/y   [IPH] (1.0 + 1.0 risk                  0.5
                                            + 0.05 (systolic - 130))               [IPH]
cap_thickness_change_mm_per_year    mm/y    -0.04 - 0.04 risk + 0.05 [statin]      0.02
==================================  ======  =====================================  =====

([IPH]: haemorrhage at the first visit, in about a quarter of the patients: probability
0.2 + 0.1 risk within [0.2, 0.6]; without it the haemorrhage rate is exactly 0.) The quantities
they change, at each visit (a :class:`PlaqueState`): the maximum wall thickness T (mm), the area
stenosis S (% of the normal lumen area, at the plaque centre), the lipid-core volume (mm^3, label
lipid_core only), the haemorrhage volume (mm^3) and the cap thickness c (mm). Visit 1 draws
T - w0 in [1.2, 2.8] mm, S in [10, 45] %, lipid 8-30 mm^3, haemorrhage 15-35 % of the lipid
volume, c in [0.6, min(1.5, 0.45 (T - 0.2))] mm (a core that does not fit is shrunk by 10 %
steps until it does); visit v is visit 1 + rate x (years since visit 1), linearly. Each visit
comes 6-36 months (uniform, in days of 30.4375) after the previous one; a third visit for about
a third of the patients. Rates are clipped so that every visit stays in T - w0 in [0.6, 4.5] mm,
S in [5, 85] %, lipid >= 3 mm^3, haemorrhage >= 0.5 mm^3 (with IPH), c in [0.3, 2.2] mm, and
volume growth the core's geometry cannot hold is slowed (then the cap thinned, the wall
thickened) until it fits; such a patient has ``rates_clipped`` true (7-9 % of patients).

Measured truth and its noise
----------------------------
``truth.parquet`` holds, per visit, the geometric state above and
:func:`medhier.plaque.measure.measure` of the truth label map (what a perfect segmentation of
that visit gives). Sampling on the 0.5 mm grid makes the measured change between two visits
differ from rate x years by (120 patients, 280 visit pairs, seed 7: mean, sd, largest |error|;
the last column is the bound the tests hold, about 4 sd):

===============================  ====================  ======  =====  =======  =====
rate                             measure column        mean    sd     largest  bound
===============================  ====================  ======  =====  =======  =====
wall_thickening_mm_per_year      max_wall_thickness_mm  -0.02  0.14   0.50     0.6
stenosis_change_pct_per_year     stenosis_area_pct      -0.1   2.2    6.2      9
lipid_growth_mm3_per_year        lipid_core_volume_mm3  -0.0   1.4    4.7      6
haemorrhage_change_mm3_per_year  haemorrhage_volume_mm3 +0.08  0.47   2.4      3
cap_thickness_change_mm_per_year min_cap_thickness_mm   +0.01  0.12   0.56     0.6
===============================  ====================  ======  =====  =======  =====

(per visit, the measured values sit at: wall -0.02 +- 0.11 mm, stenosis +0.5 +- 1.7 pp, lipid
-0.9 +- 1.2 mm^3 (a thin core loses voxels to the majority vote), haemorrhage -0.06 +- 0.41
mm^3, cap -0.15 +- 0.10 mm from the geometric state). ``truth_rates.parquet`` carries, beside
the true rates, ``measured_<rate>``: the measured change per year from the first to the last
visit.

Archive layout
--------------
``P0001/V01/T1w/IM0001.dcm`` ... (one MR Image Storage file per slice, the folders T1w, T2w,
TOF and CE-T1w, SeriesDescriptions in :data:`SERIES_DESCRIPTIONS`, matched to the right
sequence by :class:`medhier.config.PlaqueConfig`'s default patterns), ``P0001/V01/SEG/seg.dcm``
(the truth label map as a BINARY DICOM SEG on the T1w series, written by
:func:`medhier.io.seg.write_seg`; its SegmentLabels in :data:`SEGMENTS` are claimed by
``PlaqueConfig.seg_labels``' default patterns, so :func:`medhier.io.seg.read_seg` gives back the
truth label map exactly), then ``patients.csv`` and the truth tables for evaluation only:
``truth.parquet`` (one row per visit), ``truth_rates.parquet`` (one row per patient: the true
rates) and ``truth_motion.parquet`` (one row per visit and non-reference sequence); columns in
:func:`truth_tables`. PatientID ``CAROTID-0001`` with IssuerOfPatientID
``MEDHIER-CAROTID-S<seed>``; ``patients.csv`` and the truth carry only
:func:`medhier.io.dicom.patient_key` of them. With ``broken=True``, :func:`add_broken_series`
adds ``broken/<kind>/`` series that :func:`medhier.io.volume.read_series` must reject, with
the reasons it must give.

A visit costs about 0.17 s of CPU to render (4 sequences x 10 x 64 x 64 voxels x 27
sub-samples) and 0.15 s to encode (40 images, the SEG): four patients (ten visits) take about
4.4 s of one core, imports included (measured on this project's shared 2-vCPU VM).

Determinism
-----------
Patient p's plan comes from ``default_rng([seed, 1, p])`` alone (so a larger archive starts with
the smaller one's patients), the noise of visit v and sequence s from
``default_rng([seed, 2, p, v, s])``; UIDs are ``generate_uid(entropy_srcs=...)`` of the seed,
the patient, the visit, the series and the instance.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import functools
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage
from scipy.optimize import brentq
from scipy.spatial.transform import Rotation

from medhier.config import StorageConfig
from medhier.io import storage
from medhier.io.dicom import patient_key
from medhier.io.seg import SegmentSpec, write_seg
from medhier.plaque import labels as L
from medhier.plaque.measure import measure
from medhier.synthetic import writing

__all__ = [
    "BROKEN_KINDS",
    "CORE_MAX_ANGLE_DEG",
    "INTENSITY",
    "PIXEL_MM",
    "RATE_MEASUREMENTS",
    "RATE_NOISE",
    "REFERENCE",
    "SEGMENTS",
    "SEG_SERIES_DESCRIPTION",
    "SEQUENCES",
    "SERIES_DESCRIPTIONS",
    "SIZE",
    "SLICES",
    "SLICE_MM",
    "Anatomy",
    "Covariates",
    "PatientPlan",
    "PlaqueArchiveSummary",
    "PlaqueGeometry",
    "PlaqueState",
    "Rates",
    "VisitImages",
    "VisitPlan",
    "add_broken_series",
    "generate_plaque_archive",
    "measure_truth",
    "plan_plaque_archive",
    "rate_function",
    "render_labels",
    "render_visit",
    "risk_score",
    "seg_bytes",
    "series_bytes",
    "truth_tables",
]

SEQUENCES = ("T1w", "T2w", "TOF", "CE-T1w")
REFERENCE = "T1w"  # the grid of the truth label map; never moved
SERIES_DESCRIPTIONS = {
    "T1w": "T1W_BB_TSE_AX",
    "T2w": "T2W_BB_TSE_AX",
    "TOF": "TOF_3D_AX",
    "CE-T1w": "T1W_BB_TSE_AX_POST",
}
SIZE = 64  # pixels per side
PIXEL_MM = 0.5
SLICES = 10
SLICE_MM = 2.0
CORE_MAX_ANGLE_DEG = 65.0  # the core's half-angle never exceeds this; calcification lies beyond

# Tissue codes: the label values first (0 is never painted), then the distractors (label 0).
_TISSUES = L.NAMES + ("fat", "muscle", "jugular_vein", "nerve", "lymph_node")
_T = {name: code for code, name in enumerate(_TISSUES)}
_LABEL_OF = np.array([code if code < len(L.NAMES) else L.BACKGROUND for code in range(len(_TISSUES))], np.uint8)

# Relative intensities per tissue: (T1w, T2w, TOF, CE-T1w); see the module docstring.
INTENSITY: dict[str, tuple[float, float, float, float]] = {
    "lumen": (0.12, 0.12, 4.00, 0.18),
    "wall": (1.25, 1.45, 1.15, 1.90),
    "lipid_core": (1.15, 0.75, 1.05, 1.20),
    "haemorrhage": (2.40, 1.60, 2.30, 2.50),
    "calcification": (0.20, 0.15, 0.25, 0.20),
    "fibrous_cap": (1.30, 1.90, 0.75, 2.60),
    "fat": (0.35, 0.45, 2.20, 0.40),
    "muscle": (1.00, 1.00, 1.00, 1.10),
    "jugular_vein": (0.30, 0.35, 0.35, 0.70),
    "nerve": (1.10, 1.30, 0.90, 1.20),
    "lymph_node": (1.20, 1.90, 0.95, 1.80),
}
_INTENSITY_TABLE = np.array([INTENSITY.get(name, (0.0,) * 4) for name in _TISSUES], np.float64)  # (tissues, 4)

_STORED_MAX = 4095  # 12 bits stored
_CAP_MARGIN_MM = 0.2  # the core stays this far inside the outer wall at the plaque's thickest
_MIN_CORE_DEPTH_MM = 0.1  # thinner than this, a slice has no core
_IPH_GAP = 0.2  # haemorrhage starts this fraction of the core depth behind the cap
_IPH_MAX_KAPPA = 0.7  # haemorrhage's angular share of the core; <= 0.7 keeps it inside
_SUB = 3  # sub-samples per axis for partial volume
_DAYS_PER_MONTH = 30.4375
_DAYS_PER_YEAR = 365.25


# -- patients and rates -------------------------------------------------------------------------


@dataclass(frozen=True)
class Covariates:
    """A patient's structured record (``patients.csv``), constant over the visits."""

    sex: str  # "F" or "M"
    age_years: int  # at the first visit
    weight_kg: float
    smoking: str  # never | former | current
    drinking: str  # none | moderate | heavy
    systolic_bp_mmhg: int
    diastolic_bp_mmhg: int
    glucose_mmol_l: float  # fasting
    heart_rate_bpm: int
    statin: bool
    antihypertensive: bool


@dataclass(frozen=True)
class Rates:
    """True change rates per year (see the module docstring for units and the function)."""

    wall_thickening_mm_per_year: float
    stenosis_change_pct_per_year: float
    lipid_growth_mm3_per_year: float
    haemorrhage_change_mm3_per_year: float
    cap_thickness_change_mm_per_year: float

    def as_array(self) -> np.ndarray:
        """(5,) float64 in field order."""
        return np.array([getattr(self, f.name) for f in fields(self)])


# Standard deviation of the Gaussian noise added to each noise-free rate (haemorrhage: only for
# patients with haemorrhage at the first visit).
RATE_NOISE = Rates(0.03, 0.6, 1.0, 0.5, 0.02)

_SMOKING = {"never": 0.0, "former": 0.3, "current": 0.8}
_DRINKING = {"none": 0.0, "moderate": 0.1, "heavy": 0.4}


def risk_score(cov: Covariates) -> float:
    """The dimensionless risk score that drives every rate (formula in the module docstring)."""
    return (
        0.04 * (cov.age_years - 65)
        + 0.4 * (cov.sex == "M")
        + _SMOKING[cov.smoking]
        + _DRINKING[cov.drinking]
        + 0.025 * (cov.systolic_bp_mmhg - 130)
        + 0.01 * (cov.diastolic_bp_mmhg - 80)
        + 0.25 * (cov.glucose_mmol_l - 5.5)
        + 0.01 * (cov.heart_rate_bpm - 70)
        + 0.015 * (cov.weight_kg - 75)
        - 0.9 * cov.statin
        - 0.2 * cov.antihypertensive
    )


def rate_function(cov: Covariates, haemorrhage: bool) -> Rates:
    """The noise-free true rates of a patient with covariates ``cov`` and, at the first visit,
    intraplaque haemorrhage or not (table in the module docstring)."""
    risk = risk_score(cov)
    iph = float(haemorrhage)
    return Rates(
        wall_thickening_mm_per_year=0.08 + 0.06 * risk + 0.05 * iph,
        stenosis_change_pct_per_year=1.0 + 1.0 * risk + 0.8 * iph,
        lipid_growth_mm3_per_year=2.0 + 2.0 * risk - 1.5 * cov.statin,
        haemorrhage_change_mm3_per_year=iph * (1.0 + 1.0 * risk + 0.05 * (cov.systolic_bp_mmhg - 130)),
        cap_thickness_change_mm_per_year=-0.04 - 0.04 * risk + 0.05 * cov.statin,
    )


def _draw_covariates(rng: np.random.Generator) -> Covariates:
    male = rng.random() < 0.6
    age = int(rng.integers(45, 86))
    weight = rng.normal(82.0, 12.0) if male else rng.normal(68.0, 11.0)
    antihypertensive = bool(rng.random() < 0.35)
    systolic = 115 + 0.5 * (age - 45) + rng.normal(0.0, 14.0) - 6.0 * antihypertensive
    diastolic = 0.45 * systolic + 20 + rng.normal(0.0, 7.0)
    diabetic = rng.random() < 0.2
    glucose = rng.lognormal(math.log(8.5 if diabetic else 5.3), 0.12)
    return Covariates(
        sex="M" if male else "F",
        age_years=age,
        weight_kg=round(float(np.clip(weight, 45.0, 130.0)), 1),
        smoking=str(rng.choice(list(_SMOKING), p=[0.45, 0.35, 0.2])),
        drinking=str(rng.choice(list(_DRINKING), p=[0.4, 0.45, 0.15])),
        systolic_bp_mmhg=int(np.clip(round(systolic), 95, 200)),
        diastolic_bp_mmhg=int(np.clip(round(diastolic), 55, 115)),
        glucose_mmol_l=round(float(np.clip(glucose, 3.8, 15.0)), 1),
        heart_rate_bpm=int(np.clip(round(rng.normal(72.0, 10.0)), 48, 110)),
        statin=bool(rng.random() < 0.3 + 0.005 * (age - 45)),
        antihypertensive=antihypertensive,
    )


# -- plaque state and geometry --------------------------------------------------------------------


@dataclass(frozen=True)
class PlaqueState:
    """The quantities the rates change, at one visit (the geometric truth, before sampling)."""

    max_wall_mm: float  # T: maximum wall thickness, at the plaque centre
    stenosis_pct: float  # S: area stenosis at the plaque centre, % of the normal lumen area
    lipid_mm3: float  # lipid-core volume (label lipid_core, haemorrhage excluded)
    haemorrhage_mm3: float
    cap_mm: float  # c: fibrous-cap thickness between the lumen and the core

    def advanced(self, rates: Rates, years: float) -> PlaqueState:
        """This state ``years`` later under ``rates`` (linear)."""
        return PlaqueState(
            max_wall_mm=self.max_wall_mm + rates.wall_thickening_mm_per_year * years,
            stenosis_pct=self.stenosis_pct + rates.stenosis_change_pct_per_year * years,
            lipid_mm3=self.lipid_mm3 + rates.lipid_growth_mm3_per_year * years,
            haemorrhage_mm3=self.haemorrhage_mm3 + rates.haemorrhage_change_mm3_per_year * years,
            cap_mm=self.cap_mm + rates.cap_thickness_change_mm_per_year * years,
        )


Ellipse = tuple[float, float, float, float, float]  # centre x, y (mm), semi-axes a, b (mm), angle (rad)


@dataclass(frozen=True)
class Anatomy:
    """What stays the same in a patient across visits (anatomy frame, mm; see the docstring)."""

    side: int  # +1: left carotid (+x in LPS), -1: right
    lumen_radius_mm: float  # r_ref, the normal lumen
    normal_wall_mm: float  # w0
    plaque_angle: float  # in-plane direction of the plaque (radians, from +x)
    plaque_half_length_mm: float  # L_p
    core_half_length_mm: float  # L_q
    slope: tuple[float, float]  # centre line: (a_x, a_y) mm/mm
    curvature: tuple[float, float]  # (b_x, b_y) 1/mm
    core_depth: float  # beta
    haemorrhage_depth: float  # eta
    calcification: tuple[float, float, float, float, float, float] | None  # theta_c, gamma (rad), f1, f2, z_c, L_c (mm)
    ellipses: tuple[tuple[str, Ellipse], ...]  # distractor tissues, painted in order
    intensity_scale: tuple[tuple[float, ...], ...]  # (tissues, 4) per-patient jitter

    def centre(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Centre-line (x, y) at anatomy-frame heights ``z`` (mm)."""
        return self.slope[0] * z + self.curvature[0] * z * z, self.slope[1] * z + self.curvature[1] * z * z


@dataclass(frozen=True)
class PlaqueGeometry:
    """One visit's vessel, everything a render needs: the state, the patient's anatomy, and the
    solved core area ``core_area_mm2`` (A) and haemorrhage share ``kappa``."""

    anatomy: Anatomy
    state: PlaqueState
    core_area_mm2: float
    kappa: float

    def profiles(self, z: np.ndarray) -> dict[str, np.ndarray]:
        """Per-height quantities at anatomy-frame heights ``z`` (mm): plaque profile p, lumen
        radius r, thickness T(z), outer-circle offset delta and radius R, core depth H and
        half-angle alpha (0: no core), all (len(z),) arrays."""
        a, s = self.anatomy, self.state
        z = np.asarray(z, dtype=np.float64)
        p = _cos2(z, a.plaque_half_length_mm)
        q = _cos2(z, a.core_half_length_mm)
        r = a.lumen_radius_mm * np.sqrt(1.0 - s.stenosis_pct / 100.0 * p)
        thick = a.normal_wall_mm + (s.max_wall_mm - a.normal_wall_mm) * p
        delta = (thick - a.normal_wall_mm) / 2
        outer = r + (thick + a.normal_wall_mm) / 2
        depth = a.core_depth * (thick - s.cap_mm - _CAP_MARGIN_MM)
        alpha = _core_angle(self.core_area_mm2 * q, depth, r, s.cap_mm)
        return dict(p=p, r=r, thickness=thick, delta=delta, outer=outer, depth=depth, alpha=alpha)

    @classmethod
    def solve(cls, anatomy: Anatomy, state: PlaqueState) -> PlaqueGeometry | None:
        """The geometry whose core holds ``state``'s lipid + haemorrhage and whose haemorrhage
        holds its haemorrhage volume; None when the core's angle limit or kappa's cannot."""
        z = np.linspace(-anatomy.core_half_length_mm, anatomy.core_half_length_mm, 801)
        probe = cls(anatomy, state, 1.0, 0.0)
        prof = probe.profiles(z)
        q = _cos2(z, anatomy.core_half_length_mm)
        target = state.lipid_mm3 + state.haemorrhage_mm3

        def core_volume(area: float) -> float:
            alpha = _core_angle(area * q, prof["depth"], prof["r"], state.cap_mm)
            return float(np.trapezoid(_core_area(prof["depth"], alpha, prof["r"] + state.cap_mm), z))

        # The volume grows monotonically with A until the angle limit caps every slice.
        hi = 1.0
        while core_volume(hi) < target:
            hi *= 2
            if hi > 1e4:
                return None  # the angle limit holds less than the target
        area = brentq(lambda a: core_volume(a) - target, 0.0, hi, xtol=1e-9, rtol=1e-12)
        if state.haemorrhage_mm3 <= 0:
            return cls(anatomy, state, area, 0.0)
        alpha = _core_angle(area * q, prof["depth"], prof["r"], state.cap_mm)
        h_depth = anatomy.haemorrhage_depth * prof["depth"]
        per_kappa = float(
            np.trapezoid(_core_area(h_depth, alpha, prof["r"] + state.cap_mm + _IPH_GAP * prof["depth"]), z)
        )
        kappa = state.haemorrhage_mm3 / per_kappa if per_kappa > 0 else math.inf
        if kappa > _IPH_MAX_KAPPA:
            return None
        return cls(anatomy, state, area, kappa)


def _cos2(z: np.ndarray, half_length: float) -> np.ndarray:
    """cos^2(pi z / 2 L) inside |z| < L, 0 outside: a smooth bump of integral L."""
    u = np.clip(np.abs(z) / half_length, 0.0, 1.0)
    return np.cos(0.5 * np.pi * u) ** 2


def _core_area(depth: np.ndarray, alpha: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """Area (mm^2) of {|theta| < alpha, inner <= rho < inner + depth sqrt(1 - (theta/alpha)^2)}
    in polar coordinates rho, theta: the integral of rho over it."""
    return depth * alpha * (inner * np.pi / 2 + 2 * depth / 3)


def _core_angle(area: np.ndarray, depth: np.ndarray, r: np.ndarray, cap: float) -> np.ndarray:
    """The half-angle (radians) that gives a core of ``depth`` behind a cap ``cap`` on a lumen of
    radius ``r`` the ``area``; 0 where the slice has no room (depth < 0.1 mm) or no area."""
    ok = depth >= _MIN_CORE_DEPTH_MM
    safe = np.where(ok, depth, 1.0)
    alpha = area / (safe * ((r + cap) * np.pi / 2 + 2 * safe / 3))
    return np.where(ok & (area > 0), np.minimum(alpha, math.radians(CORE_MAX_ANGLE_DEG)), 0.0)


# -- the plan ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisitPlan:
    """One visit: when, the plaque then, where the patient lay, and each sequence's motion."""

    index: int  # 1-based
    date: dt.date
    time: str  # StudyTime, HHMMSS
    days: int  # since the first visit
    geometry: PlaqueGeometry
    offset_mm: tuple[float, float, float]  # the anatomy origin in this visit's world (LPS) coordinates
    fov_shift_mm: tuple[float, float]  # field-of-view centre minus the anatomy origin, in-plane
    centre_slice: int  # 0-based slice whose centre is the plaque centre
    motion: dict[str, np.ndarray]  # sequence -> (4, 4) T1w world -> sequence world (identity for T1w)
    render_seed: tuple[int, ...]

    @property
    def state(self) -> PlaqueState:
        return self.geometry.state

    @property
    def years(self) -> float:
        """Years since the first visit (days / 365.25)."""
        return self.days / _DAYS_PER_YEAR

    def positions(self) -> np.ndarray:
        """(SLICES, 3) float64 ImagePositionPatient (centre of the first pixel) of each slice, mm."""
        ox, oy, oz = self.offset_mm
        half = (SIZE - 1) / 2 * PIXEL_MM
        z = oz - (np.arange(SLICES) - self.centre_slice) * SLICE_MM  # head to feet
        x = np.full(SLICES, ox + self.fov_shift_mm[0] - half)
        y = np.full(SLICES, oy + self.fov_shift_mm[1] - half)
        return np.round(np.column_stack([x, y, z]), 6)


@dataclass(frozen=True)
class PatientPlan:
    """One patient: identity, record, anatomy, true rates and visits."""

    index: int  # 1-based
    patient_id: str
    issuer: str
    patient_name: str
    birth_date: dt.date
    covariates: Covariates
    anatomy: Anatomy
    rates: Rates
    rates_clipped: bool
    visits: tuple[VisitPlan, ...]
    namespace: str  # names the UIDs: seed and format

    @property
    def folder(self) -> str:
        return f"P{self.index:04d}"

    def key(self, salt: str = "") -> str:
        """:func:`medhier.io.dicom.patient_key` of this patient with ``salt``."""
        return patient_key(self.patient_id, self.issuer, salt)

    def age_at(self, date: dt.date) -> int:
        """Whole years of age on ``date``."""
        b = self.birth_date
        return date.year - b.year - ((date.month, date.day) < (b.month, b.day))


def plan_plaque_archive(patients: int, seed: int = 0) -> list[PatientPlan]:
    """The patients :func:`generate_plaque_archive` writes with the same arguments, without
    rendering anything. Patient p depends only on (seed, p)."""
    if int(patients) != patients or patients < 0:
        raise ValueError(f"patients must be an integer >= 0, got {patients!r}")
    seed = writing.check_seed(seed)
    namespace = f"medhier-carotid|seed={seed}|format=1"
    return [_plan_patient(seed, p, namespace) for p in range(1, int(patients) + 1)]


def _plan_patient(seed: int, index: int, namespace: str) -> PatientPlan:
    rng = np.random.default_rng([seed, 1, index])
    cov = _draw_covariates(rng)
    anatomy = _draw_anatomy(rng)
    first = _draw_first_state(rng, cov, anatomy)
    n_visits = 3 if rng.random() < 1 / 3 else 2
    gaps = [int(round(rng.uniform(6.0, 36.0) * _DAYS_PER_MONTH)) for _ in range(n_visits - 1)]
    days = np.concatenate([[0], np.cumsum(gaps)]).astype(int)
    rates, clipped, geometries = _draw_rates(rng, cov, anatomy, first, days / _DAYS_PER_YEAR)

    date1 = dt.date(2016, 1, 1) + dt.timedelta(days=int(rng.integers(0, 5 * 365)))
    anniversary = dt.date(date1.year - cov.age_years, date1.month, min(date1.day, 28))
    birth = anniversary - dt.timedelta(days=int(rng.integers(0, 365)))
    visits = []
    for v, (day, geometry) in enumerate(zip(days, geometries), start=1):
        origin = (anatomy.side * 22.0, -5.0, -40.0) + rng.uniform(-4.0, 4.0, 3)
        visits.append(
            VisitPlan(
                index=v,
                date=date1 + dt.timedelta(days=int(day)),
                time=f"{int(rng.integers(8, 17)):02d}{int(rng.integers(0, 60)):02d}00",
                days=int(day),
                geometry=geometry,
                offset_mm=tuple(float(x) for x in np.round(origin, 2)),
                fov_shift_mm=tuple(float(x) for x in np.round(rng.uniform(-2.0, 2.0, 2), 2)),
                centre_slice=SLICES // 2 - 1 + int(rng.integers(0, 2)),
                motion=_draw_motion(rng, np.round(origin, 2)),
                render_seed=(seed, 2, index, v),
            )
        )
    return PatientPlan(
        index=index,
        patient_id=f"CAROTID-{index:04d}",
        issuer=f"MEDHIER-CAROTID-S{seed}",
        patient_name=f"PHANTOM^C{index:04d}",
        birth_date=birth,
        covariates=cov,
        anatomy=anatomy,
        rates=rates,
        rates_clipped=clipped,
        visits=tuple(visits),
        namespace=namespace,
    )


def _draw_anatomy(rng: np.random.Generator) -> Anatomy:
    u = rng.uniform
    side = 1 if rng.random() < 0.5 else -1
    lateral, anterior = np.array([side, 0.0]), np.array([0.0, -1.0])

    def at(lat: float, ant: float) -> tuple[float, float]:
        x, y = lateral * lat + anterior * ant
        return float(x), float(y)

    def towards(lat: float, ant: float) -> float:
        d = lateral * lat + anterior * ant
        return float(math.atan2(d[1], d[0]))

    ellipses: list[tuple[str, Ellipse]] = [
        # sternocleidomastoid: a long band, pointing 20-40 degrees from lateral towards anterior
        ("muscle", (*at(u(7.0, 10.0), u(9.5, 12.0)), u(11.0, 15.0), u(3.0, 4.2), towards(1.0, math.tan(u(0.35, 0.7))))),
        ("muscle", (*at(-u(4.0, 7.0), -u(9.0, 11.0)), u(5.0, 7.0), u(3.0, 4.0), u(-0.25, 0.25))),
        ("jugular_vein", (*at(u(11.5, 13.5), u(-1.0, 2.5)), u(3.2, 4.5), u(2.2, 3.5), u(-0.35, 0.35))),
        ("nerve", (*at(u(5.0, 6.5), -u(4.5, 6.0)), *(2 * [u(0.8, 1.2)]), 0.0)),
    ]
    if rng.random() < 0.5:
        ellipses.append(("lymph_node", (*at(-u(5.0, 9.0), u(4.0, 8.0)), u(2.0, 3.0), u(1.3, 2.0), u(0, math.pi))))
    plaque_half = u(4.5, 6.5)
    calcification = None
    if rng.random() < 0.5:
        gamma = math.radians(u(12.0, 25.0))
        theta = math.radians(CORE_MAX_ANGLE_DEG + 5.0 + u(0.0, 15.0)) + gamma
        f1 = u(0.2, 0.3)
        calcification = (
            theta if rng.random() < 0.5 else -theta,
            gamma,
            f1,
            f1 + u(0.45, 0.55),
            u(-0.4, 0.4) * plaque_half,
            u(1.0, 2.0),
        )
    return Anatomy(
        side=side,
        lumen_radius_mm=u(2.5, 3.5),
        normal_wall_mm=u(0.8, 1.0),
        plaque_angle=u(-math.pi, math.pi),
        plaque_half_length_mm=plaque_half,
        core_half_length_mm=u(0.55, 0.8) * plaque_half,
        slope=(u(-0.08, 0.08), u(-0.08, 0.08)),
        curvature=(u(-0.004, 0.004), u(-0.004, 0.004)),
        core_depth=u(0.6, 0.8),
        haemorrhage_depth=u(0.45, 0.6),
        calcification=calcification,
        ellipses=tuple(ellipses),
        intensity_scale=tuple(map(tuple, rng.uniform(0.95, 1.05, (len(_TISSUES), len(SEQUENCES))))),
    )


def _draw_first_state(rng: np.random.Generator, cov: Covariates, anatomy: Anatomy) -> PlaqueState:
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    haemorrhage = rng.random() < float(np.clip(0.2 + 0.1 * risk_score(cov), 0.2, 0.6))
    lipid = u(8.0, 30.0)
    thickness = anatomy.normal_wall_mm + u(1.2, 2.8)
    state = PlaqueState(
        max_wall_mm=thickness,
        stenosis_pct=u(10.0, 45.0),
        lipid_mm3=lipid,
        haemorrhage_mm3=lipid * u(0.15, 0.35) if haemorrhage else 0.0,
        # leave the core at least half the plaque's depth
        cap_mm=u(0.6, min(1.5, 0.45 * (thickness - _CAP_MARGIN_MM))),
    )
    # A large core in a thin plaque may not fit: shrink it until it does.
    for _ in range(50):
        if PlaqueGeometry.solve(anatomy, state) is not None:
            return state
        state = dataclasses.replace(state, lipid_mm3=0.9 * state.lipid_mm3, haemorrhage_mm3=0.9 * state.haemorrhage_mm3)
    raise RuntimeError(f"carotid phantom: no core fits the first state {state} of anatomy {anatomy}")


# The PlaqueState field each Rates field moves, in field order.
_STATE_FIELDS = ("max_wall_mm", "stenosis_pct", "lipid_mm3", "haemorrhage_mm3", "cap_mm")


def _bounds(anatomy: Anatomy, first: PlaqueState) -> np.ndarray:
    """(5, 2): the (low, high) every visit's :data:`_STATE_FIELDS` value stays in."""
    w0 = anatomy.normal_wall_mm
    iph = first.haemorrhage_mm3 > 0
    return np.array(
        [
            (w0 + 0.6, w0 + 4.5),
            (5.0, 85.0),
            (3.0, math.inf),
            (0.5 if iph else 0.0, math.inf if iph else 0.0),
            (0.3, 2.2),
        ]
    )


def _draw_rates(
    rng: np.random.Generator, cov: Covariates, anatomy: Anatomy, first: PlaqueState, years: np.ndarray
) -> tuple[Rates, bool, list[PlaqueGeometry]]:
    """The patient's true rates (function + noise, clipped to the bounds) and each visit's solved
    geometry."""
    iph = first.haemorrhage_mm3 > 0
    noise = rng.standard_normal(5) * RATE_NOISE.as_array()
    if not iph:
        noise[3] = 0.0
    raw = rate_function(cov, iph).as_array() + noise
    x1 = np.array([getattr(first, name) for name in _STATE_FIELDS])
    bounds = _bounds(anatomy, first)
    last = float(years[-1])
    lo, hi = (bounds[:, 0] - x1) / last, (bounds[:, 1] - x1) / last
    rates = np.clip(raw, np.minimum(lo, 0.0), np.maximum(hi, 0.0))
    floor = np.minimum(lo, 0.0)
    for _ in range(400):
        geometries = [PlaqueGeometry.solve(anatomy, first.advanced(Rates(*rates), float(y))) for y in years]
        if all(g is not None for g in geometries):
            break
        # The core cannot hold the visit's volumes (its angle limit, or haemorrhage outgrowing
        # it): slow the volumes' growth first; at their floor, give the core room (a thinner cap,
        # a thicker wall).
        if rates[2] > floor[2] or (iph and rates[3] > floor[3]):
            rates[2] = max(rates[2] - 0.25, floor[2])
            if iph:
                rates[3] = max(rates[3] - 0.25, floor[3])
        else:
            rates[4] = max(rates[4] - 0.02, floor[4])
            rates[0] = min(rates[0] + 0.02, max(hi[0], 0.0))
    else:
        raise RuntimeError(f"carotid phantom: no feasible growth for first state {first} and rates {raw}")
    return Rates(*map(float, rates)), bool(np.any(rates != raw)), geometries


def _draw_motion(rng: np.random.Generator, origin: np.ndarray) -> dict[str, np.ndarray]:
    """Per sequence, the rigid motion about the vessel centre ``origin`` (world mm) as a (4, 4)
    matrix from T1w world coordinates to that sequence's."""
    motion = {REFERENCE: np.eye(4)}
    for seq in SEQUENCES:
        if seq == REFERENCE:
            continue
        axis = np.array([rng.normal(0, 0.3), rng.normal(0, 0.3), 1.0])
        angle = math.radians(rng.uniform(1.0, 3.0)) * (1 if rng.random() < 0.5 else -1)
        rot = Rotation.from_rotvec(axis / np.linalg.norm(axis) * angle).as_matrix()
        direction = rng.standard_normal(3)
        shift = direction / np.linalg.norm(direction) * rng.uniform(0.5, 1.5)
        m = np.eye(4)
        m[:3, :3] = rot
        m[:3, 3] = origin + shift - rot @ origin
        motion[seq] = m
    return motion


# -- rendering --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisitImages:
    """One rendered visit. ``images``: sequence -> (SLICES, SIZE, SIZE) uint16 stored values (what
    the DICOM files hold); ``labels``: (SLICES, SIZE, SIZE) uint8 truth label map on the T1w grid
    (:mod:`medhier.plaque.labels` values); ``purity``: float32, the share of each voxel's 27
    sub-samples that carry its label (1: no partial volume); ``positions``: (SLICES, 3)
    ImagePositionPatient, mm."""

    images: dict[str, np.ndarray]
    labels: np.ndarray
    purity: np.ndarray
    positions: np.ndarray


def render_visit(patient: PatientPlan, visit: VisitPlan, *, noise: bool = True, motion: bool = True) -> VisitImages:
    """Render ``visit`` of ``patient``: the four sequences and the truth label map.

    ``noise=False`` leaves out the Rician noise (the bias field and partial volume stay);
    ``motion=False`` renders every sequence on the T1w anatomy (no misregistration). The result
    depends only on the plans, never on what was rendered before."""
    positions = visit.positions()
    origin = np.asarray(visit.offset_mm)
    images: dict[str, np.ndarray] = {}
    labels = purity = None
    scale = np.asarray(patient.anatomy.intensity_scale)
    bias_basis = _bias_basis(patient.anatomy.side)
    for s, seq in enumerate(SEQUENCES):
        m = visit.motion[seq] if motion else np.eye(4)
        codes = _tissue_codes(visit.geometry, _anatomy_points(positions, origin, m))
        if seq == REFERENCE:
            labels, purity = _majority(_LABEL_OF[codes])
        lut = (_INTENSITY_TABLE[:, s] * scale[:, s]).astype(np.float32)
        mean = lut[codes].mean(axis=(1, 3, 5), dtype=np.float64)
        rng = np.random.default_rng([*visit.render_seed, s])
        gain, snr = rng.uniform(350.0, 500.0), rng.uniform(15.0, 25.0)
        coefs = rng.normal(0.0, [0.1, 0.1, 0.05, 0.05, 0.05, 0.05])
        bias = np.exp(np.tensordot(coefs, bias_basis[:6], axes=1) + 0.12 * bias_basis[6])
        signal = gain * bias * mean
        if noise:
            sigma = gain / snr
            real = signal + sigma * rng.standard_normal(signal.shape)
            signal = np.hypot(real, sigma * rng.standard_normal(signal.shape))
        images[seq] = np.clip(np.rint(signal), 0, _STORED_MAX).astype(np.uint16)
    return VisitImages(images=images, labels=labels, purity=purity, positions=positions)


def render_labels(visit: VisitPlan) -> tuple[np.ndarray, np.ndarray]:
    """Only the truth of ``visit``: (labels, purity) as :func:`render_visit` returns them, at a
    quarter of its cost."""
    codes = _tissue_codes(visit.geometry, _anatomy_points(visit.positions(), np.asarray(visit.offset_mm), np.eye(4)))
    return _majority(_LABEL_OF[codes])


_GRID = (SLICES, _SUB, SIZE, _SUB, SIZE, _SUB)  # sub-samples: (slice, z-third, row, y-third, column, x-third)


def _anatomy_points(positions: np.ndarray, origin: np.ndarray, motion: np.ndarray) -> np.ndarray:
    """Anatomy-frame coordinates (*_GRID, 3) float32 of every sub-sample of the grid at
    ``positions``, seen by a sequence with ``motion`` (4, 4): at world point P it sees the anatomy
    that T1w sees at M^-1 P = R^T (P - t), i.e. R^T (P - origin) + R^T (origin - t) - origin."""
    off = (np.arange(_SUB) - (_SUB - 1) / 2) / _SUB
    # Per axis, relative to the origin: small numbers, exact enough in float32.
    xs = positions[0, 0] - origin[0] + (np.arange(SIZE)[:, None] + off) * PIXEL_MM  # (columns, 3)
    ys = positions[0, 1] - origin[1] + (np.arange(SIZE)[:, None] + off) * PIXEL_MM  # (rows, 3)
    zs = positions[:, 2][:, None] - origin[2] + off * SLICE_MM  # (slices, 3)
    rot = motion[:3, :3]
    shift = (origin - motion[:3, 3]) @ rot - origin
    out = np.empty((*_GRID, 3), np.float32)
    for c in range(3):  # the grid is a tensor product: R^T P is a sum of three broadcasts
        out[..., c] = (
            (xs * rot[0, c]).astype(np.float32)[None, None, None, None]
            + (ys * rot[1, c] + shift[c]).astype(np.float32)[None, None, :, :, None, None]
        ) + (zs * rot[2, c]).astype(np.float32)[:, :, None, None, None, None]
    return out


def _bias_basis(side: int) -> np.ndarray:
    """(7, SLICES, SIZE, SIZE): x, y, x^2, y^2, xy, z over the field of view in [-1, 1], and the
    surface coil's gradient (towards lateral-anterior)."""
    half = (SIZE - 1) / 2
    t = (np.arange(SIZE) - half) / half
    zn = (np.arange(SLICES) - (SLICES - 1) / 2) / ((SLICES - 1) / 2)
    x = np.broadcast_to(t[None, None, :], (SLICES, SIZE, SIZE))
    y = np.broadcast_to(t[None, :, None], (SLICES, SIZE, SIZE))
    z = np.broadcast_to(zn[:, None, None], (SLICES, SIZE, SIZE))
    coil = (side * x - y) / math.sqrt(2)
    return np.stack([x, y, x * x - 1 / 3, y * y - 1 / 3, x * y, z, coil])


def _majority(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per voxel, the label most of its 27 sub-samples carry (ties: the centre one's) and the
    share that carry it. ``labels``: (SLICES, 3, SIZE, 3, SIZE, 3) uint8."""
    votes = labels.transpose(0, 2, 4, 1, 3, 5).reshape(SLICES, SIZE, SIZE, _SUB**3)
    counts = np.stack([(votes == value).sum(axis=-1) for value in range(len(L.NAMES))], axis=-1)
    centre = votes[..., (_SUB**3) // 2]
    best = counts.argmax(axis=-1)
    centre_count = np.take_along_axis(counts, centre[..., None].astype(np.intp), axis=-1)[..., 0]
    winner = np.where(centre_count == counts.max(axis=-1), centre, best).astype(np.uint8)
    share = np.take_along_axis(counts, winner[..., None].astype(np.intp), axis=-1)[..., 0] / _SUB**3
    return winner, share.astype(np.float32)


def _tissue_codes(geometry: PlaqueGeometry, pts: np.ndarray) -> np.ndarray:
    """Tissue code (*_GRID) uint8 of every sub-sample at anatomy-frame points ``pts`` (*_GRID, 3)."""
    anat = geometry.anatomy
    # The distractors run straight along z: their in-plane test on the middle z-third holds for
    # the whole slab (a 3 degree tilt moves them by < 0.04 mm over it), a third of the work.
    middle = pts[:, _SUB // 2]
    x, y = middle[..., 0], middle[..., 1]
    base = np.full(x.shape, _T["fat"], np.uint8)
    for name, ellipse in anat.ellipses:
        base[_in_ellipse(x, y, ellipse)] = _T[name]
    codes = np.repeat(base[:, None], _SUB, axis=1)
    # The vessel's geometry changes along z: evaluate it on every sub-sample near its centre line.
    cx, cy = anat.centre(middle[..., 2])
    # The outer wall reaches at most r_ref + T from the centre line; the margin covers the
    # centre line's drift between the middle z-third and the others.
    reach = anat.lumen_radius_mm + geometry.state.max_wall_mm + 0.3
    near2d = (x - cx) ** 2 + (y - cy) ** 2 < reach * reach
    near = np.flatnonzero(np.repeat(near2d[:, None], _SUB, axis=1))
    flat_pts = pts.reshape(-1, 3)[near].astype(np.float64)
    z = flat_pts[:, 2]
    cx, cy = anat.centre(z)
    flat = codes.reshape(-1)
    flat[near] = _vessel_codes(geometry, flat_pts[:, 0] - cx, flat_pts[:, 1] - cy, z, flat[near])
    return codes


def _in_ellipse(x: np.ndarray, y: np.ndarray, e: Ellipse) -> np.ndarray:
    cx, cy, a, b, angle = e
    c, s = math.cos(angle), math.sin(angle)
    u = (x - cx) * c + (y - cy) * s
    v = -(x - cx) * s + (y - cy) * c
    return (u / a) ** 2 + (v / b) ** 2 < 1.0


def _vessel_codes(
    geometry: PlaqueGeometry, dx: np.ndarray, dy: np.ndarray, z: np.ndarray, codes: np.ndarray
) -> np.ndarray:
    """Codes of points near the vessel: offsets (dx, dy) from the centre line at heights z."""
    anat, state = geometry.anatomy, geometry.state
    prof = geometry.profiles(z)
    ca, sa = math.cos(anat.plaque_angle), math.sin(anat.plaque_angle)
    u, v = dx * ca + dy * sa, dy * ca - dx * sa  # u points to the plaque
    out = codes.copy()
    inside = (u - prof["delta"]) ** 2 + v**2 < prof["outer"] ** 2
    out[inside] = L.WALL
    # Everything below lies inside the outer wall: work on those points only.
    idx = np.flatnonzero(inside)
    u, v, z = u[idx], v[idx], z[idx]
    r, delta, outer, alpha, core_depth = (prof[k][idx] for k in ("r", "delta", "outer", "alpha", "depth"))
    sub = out[idx]
    radius = np.hypot(u, v)
    theta = np.arctan2(v, u)
    depth = radius - r
    wall = depth >= 0
    cap = state.cap_mm
    has_core = alpha > 0
    frac = np.where(has_core, np.abs(theta) / np.where(has_core, alpha, 1.0), 2.0)  # >= 1: outside
    in_angle = wall & (frac < 1)
    sub[in_angle & (depth < cap)] = L.CAP
    top = cap + core_depth * np.sqrt(np.clip(1 - frac**2, 0.0, None))
    core = in_angle & (depth >= cap) & (depth < top)
    sub[core] = L.LIPID
    if geometry.kappa > 0:
        kfrac = frac / geometry.kappa
        d = depth - cap - _IPH_GAP * core_depth
        height = anat.haemorrhage_depth * core_depth * np.sqrt(np.clip(1 - kfrac**2, 0.0, None))
        sub[core & (kfrac < 1) & (d >= 0) & (d < height)] = L.HAEMORRHAGE
    if anat.calcification is not None:
        theta_c, gamma, f1, f2, z_c, half = anat.calcification
        local = delta * np.cos(theta) + np.sqrt(outer**2 - (delta * np.sin(theta)) ** 2) - r
        dtheta = (theta - theta_c + math.pi) % (2 * math.pi) - math.pi
        calc = wall & (np.abs(dtheta) < gamma) & (depth >= f1 * local) & (depth < f2 * local) & (np.abs(z - z_c) < half)
        sub[calc] = L.CALCIFICATION
    sub[radius < r] = L.LUMEN
    out[idx] = sub
    return out


# -- DICOM ------------------------------------------------------------------------------------------

# Acquisition parameters per sequence (typical 3 T carotid vessel-wall protocol values).
_PROTOCOL = {
    # SeriesNumber, minutes after the study start, ScanningSequence, SequenceVariant, ScanOptions,
    # MRAcquisitionType, TR (ms), TE (ms), EchoTrainLength, FlipAngle (degrees)
    "TOF": (1, 0, "GR", "SP", "", "3D", 23.0, 3.5, 1, 25.0),
    "T1w": (2, 5, "SE", "SK", "FS", "2D", 800.0, 10.0, 10, 90.0),
    "T2w": (3, 10, "SE", "SK", "FS", "2D", 3000.0, 50.0, 12, 90.0),
    "CE-T1w": (4, 18, "SE", "SK", "FS", "2D", 800.0, 10.0, 10, 90.0),
}


def series_bytes(patient: PatientPlan, visit: VisitPlan, sequence: str, pixels: np.ndarray) -> list[bytes]:
    """The MR Image Storage files of one series, one per slice in InstanceNumber order.

    ``pixels``: (SLICES, SIZE, SIZE) uint16 stored values (e.g. ``render_visit(...).images[seq]``);
    the geometry is the visit's (:meth:`VisitPlan.positions`)."""
    if sequence not in SEQUENCES:
        raise ValueError(f"sequence {sequence!r} is not one of {SEQUENCES}")
    pixels = np.asarray(pixels)
    if pixels.shape != (SLICES, SIZE, SIZE) or pixels.dtype != np.uint16:
        raise ValueError(f"pixels must be ({SLICES}, {SIZE}, {SIZE}) uint16, got {pixels.shape} {pixels.dtype}")
    template = Dataset(dict(_sequence_elements(sequence)))
    for keyword, value in _series_values(patient, visit, sequence, pixels).items():
        setattr(template, keyword, value)
    out = []
    for k, position in enumerate(visit.positions()):
        ds = Dataset(template)  # a shallow copy: the slice's own elements replace, never modify
        sop = writing.derived_uid(patient.namespace, patient.patient_id, visit.index, sequence, "sop", k + 1)
        ds.file_meta = writing.file_meta(MRImageStorage, sop)
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [writing.decimal_string(x) for x in position]
        ds.SliceLocation = writing.decimal_string(position[2])
        ds.PixelData = pixels[k].astype("<u2", copy=False).tobytes()
        ds["PixelData"].VR = "OW"
        out.append(writing.part10_bytes(ds))
    return out


def _series_values(patient: PatientPlan, visit: VisitPlan, sequence: str, pixels: np.ndarray) -> dict:
    """Keyword -> value of what one series' files share beyond its sequence's elements: UIDs,
    dates and times, the patient, and a window over the 1st-99.5th percentile of ``pixels``."""
    ns, pid, v = patient.namespace, patient.patient_id, visit.index
    series_number, minutes = _PROTOCOL[sequence][:2]
    start = dt.datetime.combine(visit.date, dt.time(int(visit.time[:2]), int(visit.time[2:4])))
    series_time = (start + dt.timedelta(minutes=minutes)).strftime("%H%M%S")
    date = visit.date.strftime("%Y%m%d")
    low, high = np.percentile(pixels, [1.0, 99.5])
    cov = patient.covariates
    return {
        "SeriesInstanceUID": writing.derived_uid(ns, pid, v, sequence, "series"),
        "StudyInstanceUID": writing.derived_uid(ns, pid, v, "study"),
        "FrameOfReferenceUID": writing.derived_uid(ns, pid, v, "frame-of-reference"),
        "SeriesNumber": series_number,
        "StudyDate": date,
        "StudyTime": visit.time,
        "SeriesDate": date,
        "SeriesTime": series_time,
        "AcquisitionDate": date,
        "AcquisitionTime": series_time,
        "ContentDate": date,
        "ContentTime": series_time,
        "AccessionNumber": f"C{patient.index:05d}V{v:02d}",
        "StudyID": f"V{v:02d}",
        "PatientName": patient.patient_name,
        "PatientID": pid,
        "IssuerOfPatientID": patient.issuer,
        "PatientBirthDate": patient.birth_date.strftime("%Y%m%d"),
        "PatientSex": cov.sex,
        "PatientAge": f"{patient.age_at(visit.date):03d}Y",
        "PatientWeight": f"{cov.weight_kg:g}",
        "WindowCenter": writing.decimal_string((low + high) / 2),
        "WindowWidth": writing.decimal_string(max(high - low, 1.0)),
    }


@functools.lru_cache(maxsize=None)
def _sequence_elements(sequence: str) -> dict:
    """The elements every file of ``sequence`` shares, built once (setting them one by one through
    pydicom costs about as much as writing the file)."""
    _, _, scanning, variant, options, acquisition, tr, te, train, flip = _PROTOCOL[sequence]
    ds = writing.image_elements()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.SOPClassUID = MRImageStorage
    ds.Modality = "MR"
    ds.ManufacturerModelName = "phantom-mr"
    ds.StudyDescription = "MR CAROTID VESSEL WALL"
    ds.SeriesDescription = SERIES_DESCRIPTIONS[sequence]
    ds.ProtocolName = SERIES_DESCRIPTIONS[sequence]
    ds.BodyPartExamined = "NECK"
    ds.ScanningSequence = scanning
    ds.SequenceVariant = variant
    ds.ScanOptions = options
    ds.MRAcquisitionType = acquisition
    ds.SequenceName = f"*{scanning.lower()}{acquisition.lower()}"
    ds.RepetitionTime = writing.decimal_string(tr)
    ds.EchoTime = writing.decimal_string(te)
    ds.EchoTrainLength = train
    ds.FlipAngle = writing.decimal_string(flip)
    ds.MagneticFieldStrength = "3"
    ds.ImagingFrequency = "127.7"
    ds.ImagedNucleus = "1H"
    ds.SliceThickness = writing.decimal_string(SLICE_MM)
    ds.SpacingBetweenSlices = writing.decimal_string(SLICE_MM)
    if sequence == "CE-T1w":
        ds.ContrastBolusAgent = "GADOTERATE MEGLUMINE"
        ds.ContrastBolusRoute = "IV"
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = SIZE
    ds.PixelSpacing = [writing.decimal_string(PIXEL_MM), writing.decimal_string(PIXEL_MM)]
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    return {elem.tag: elem for elem in ds}


# The truth SEG's segments: label value -> SegmentLabel, each claimed by its label under
# PlaqueConfig.seg_labels' default patterns (the wall as "outer_wall", painted with the wall value).
SEGMENTS = {
    L.LUMEN: SegmentSpec("Lumen"),
    L.WALL: SegmentSpec("Vessel wall"),
    L.LIPID: SegmentSpec("Lipid-rich necrotic core"),
    L.HAEMORRHAGE: SegmentSpec("Intraplaque haemorrhage"),
    L.CALCIFICATION: SegmentSpec("Calcification"),
    L.CAP: SegmentSpec("Fibrous cap"),
}
SEG_SERIES_DESCRIPTION = "PLAQUE TRUTH SEG"  # matched by no sequence pattern


def seg_bytes(patient: PatientPlan, visit: VisitPlan, labels: np.ndarray, reference: list[bytes]) -> bytes:
    """The visit's truth label map ``labels`` (SLICES, SIZE, SIZE) as a DICOM SEG on its T1w
    series (``reference``: that series' files, e.g. from :func:`series_bytes`), through
    :func:`medhier.io.seg.write_seg`: one BINARY segment per label present (:data:`SEGMENTS`).

    highdicom stamps the clock (InstanceCreation, Content and ContributionDateTime) and a random
    DimensionOrganizationUID into every SEG; they are set here to the visit's date and time and
    to a UID derived like every other, so the archive stays byte-identical."""
    headers = [pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True) for data in reference]
    ns, pid, v = patient.namespace, patient.patient_id, visit.index
    data = write_seg(
        labels,
        headers,
        SEGMENTS,
        entropy=f"{ns}|{pid}|{v}|seg",
        series_number=99,
        series_description=SEG_SERIES_DESCRIPTION,
        algorithm_name="medhier-carotid-phantom",
        algorithm_version="1",
        manufacturer=writing.MANUFACTURER,
    )
    ds = pydicom.dcmread(io.BytesIO(data))
    date, time = visit.date.strftime("%Y%m%d"), visit.time
    replacements = {
        "InstanceCreationDate": date,
        "InstanceCreationTime": time,
        "ContentDate": date,
        "ContentTime": time,
        "ContributionDateTime": date + time,
        "DimensionOrganizationUID": writing.derived_uid(ns, pid, v, "seg-dimension-organization"),
    }

    def restamp(dataset: Dataset, elem) -> None:
        if elem.keyword in replacements:
            elem.value = replacements[elem.keyword]

    ds.walk(restamp)
    return writing.part10_bytes(ds)


# -- truth ---------------------------------------------------------------------------------------------


# Each rate and the measurement (medhier.plaque.measure column) whose change per year it is.
RATE_MEASUREMENTS = {
    "wall_thickening_mm_per_year": "max_wall_thickness_mm",
    "stenosis_change_pct_per_year": "stenosis_area_pct",
    "lipid_growth_mm3_per_year": "lipid_core_volume_mm3",
    "haemorrhage_change_mm3_per_year": "haemorrhage_volume_mm3",
    "cap_thickness_change_mm_per_year": "min_cap_thickness_mm",
}


def measure_truth(labels: np.ndarray) -> dict[str, float | int]:
    """:func:`medhier.plaque.measure.measure` of a visit's truth label map ``labels`` (SLICES,
    SIZE, SIZE): the measurements a perfect segmentation gives (one ``truth.parquet`` row's
    measurement columns)."""
    return measure(labels, (SLICE_MM, PIXEL_MM, PIXEL_MM)).to_dict()


def truth_tables(
    plans: list[PatientPlan], measured: dict[tuple[int, int], dict[str, float | int]], patient_salt: str = ""
) -> dict[str, pa.Table]:
    """The evaluation truth of ``plans``: {"truth.parquet", "truth_rates.parquet",
    "truth_motion.parquet"} -> table. ``measured``: (patient index, visit index) ->
    :func:`measure_truth` of that visit.

    - ``truth.parquet``, one row per visit: patient_key, visit (1-based), study_date,
      study_instance_uid, days_since_first, years_since_first; the visit's geometric state
      before sampling on the image grid (``geometry_max_wall_mm``, ``geometry_stenosis_pct``,
      ``geometry_lipid_mm3``, ``geometry_haemorrhage_mm3``, ``geometry_cap_mm``: the
      :class:`PlaqueState` the rates move); then every :data:`medhier.plaque.measure.MEASUREMENTS`
      column measured on the truth label map.
    - ``truth_rates.parquet``, one row per patient: patient_key, visits, the five true rates
      (:class:`Rates` field names), rates_clipped, and ``measured_<rate>``: the change per year
      of the rate's :data:`RATE_MEASUREMENTS` column between the first and the last visit's
      truth label maps (what a perfect segmentation would give).
    - ``truth_motion.parquet``, one row per visit and non-reference sequence: patient_key,
      visit, sequence, series_instance_uid, matrix (16 floats, row-major (4, 4), T1w world ->
      sequence world, LPS mm), rotation_deg and translation_mm (of the vessel centre).
    """
    visit_rows: dict[str, list] = {}
    rate_rows: dict[str, list] = {}
    motion_rows: dict[str, list] = {}
    for patient in plans:
        key = patient.key(patient_salt)
        for visit in patient.visits:
            _append(visit_rows, patient_key=key, **_visit_truth(patient, visit), **measured[patient.index, visit.index])
            for row in _motion_truth(patient, visit):
                _append(motion_rows, patient_key=key, **row)
        first, last = measured[patient.index, 1], measured[patient.index, patient.visits[-1].index]
        _append(rate_rows, patient_key=key, **_rate_truth(patient, first, last))
    return {
        "truth.parquet": pa.table(visit_rows),
        "truth_rates.parquet": pa.table(rate_rows),
        "truth_motion.parquet": pa.table(motion_rows),
    }


def _append(columns: dict[str, list], **values) -> None:
    """Append one row (column name -> value) to ``columns`` (column name -> values)."""
    for name, value in values.items():
        columns.setdefault(name, []).append(value)


def _visit_truth(patient: PatientPlan, visit: VisitPlan) -> dict:
    """A truth.parquet row's visit columns, before the measurements (:func:`truth_tables`)."""
    return dict(
        visit=visit.index,
        study_date=visit.date,
        study_instance_uid=writing.derived_uid(patient.namespace, patient.patient_id, visit.index, "study"),
        days_since_first=visit.days,
        years_since_first=visit.years,
        **{f"geometry_{name}": float(getattr(visit.state, name)) for name in _STATE_FIELDS},
    )


def _motion_truth(patient: PatientPlan, visit: VisitPlan) -> Iterator[dict]:
    """The visit's truth_motion.parquet rows, one per non-reference sequence (:func:`truth_tables`)."""
    origin = np.asarray(visit.offset_mm)
    for seq in SEQUENCES:
        if seq == REFERENCE:
            continue
        m = visit.motion[seq]
        yield dict(
            visit=visit.index,
            sequence=seq,
            series_instance_uid=writing.derived_uid(patient.namespace, patient.patient_id, visit.index, seq, "series"),
            matrix=[float(x) for x in m.ravel()],
            rotation_deg=float(np.degrees(Rotation.from_matrix(m[:3, :3]).magnitude())),
            translation_mm=float(np.linalg.norm(m[:3, :3] @ origin + m[:3, 3] - origin)),
        )


def _rate_truth(patient: PatientPlan, first: dict[str, float | int], last: dict[str, float | int]) -> dict:
    """A truth_rates.parquet row: the true rates, and the measured change per year between the
    ``first`` and the ``last`` visit's truth measurements (:func:`truth_tables`)."""
    years = patient.visits[-1].years
    return dict(
        visits=len(patient.visits),
        **{f.name: getattr(patient.rates, f.name) for f in fields(Rates)},
        rates_clipped=patient.rates_clipped,
        **{f"measured_{rate}": (last[col] - first[col]) / years for rate, col in RATE_MEASUREMENTS.items()},
    )


_PATIENT_COLUMNS = (
    "patient_key", "sex", "age_years", "weight_kg", "smoking", "drinking", "systolic_bp_mmhg",
    "diastolic_bp_mmhg", "glucose_mmol_l", "heart_rate_bpm", "statin", "antihypertensive",
)


def _patients_csv(plans: list[PatientPlan], patient_salt: str) -> bytes:
    text = io.StringIO()
    rows = csv.writer(text, lineterminator="\n")
    rows.writerow(_PATIENT_COLUMNS)
    for patient in plans:
        cov = patient.covariates
        values = {f.name: getattr(cov, f.name) for f in fields(cov)}
        values = {k: int(v) if isinstance(v, bool) else v for k, v in values.items()}
        rows.writerow([patient.key(patient_salt), *(values[c] for c in _PATIENT_COLUMNS[1:])])
    return text.getvalue().encode("utf-8")


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


# -- the archive -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlaqueArchiveSummary:
    """What :func:`generate_plaque_archive` wrote. ``files``/``bytes`` count the DICOM files
    (images and SEGs), not the tables or the broken series."""

    out: str
    patients: int
    visits: int
    series: int  # image series
    segs: int  # truth SEGs, one per visit
    files: int
    bytes: int
    broken: dict[str, str]  # path relative to ``out`` -> expected reason

    def table(self) -> str:
        """A short printable summary."""
        lines = [
            f"{self.out}: {self.patients} patients, {self.visits} visits, {self.series} image series, "
            f"{self.segs} SEGs, {self.files} DICOM files, {self.bytes / 1e6:.1f} MB",
        ]
        if self.broken:
            width = max(map(len, self.broken))
            lines.append(f"  {'broken':<{width}}  expected")
            lines += [f"  {path:<{width}}  {reason}" for path, reason in self.broken.items()]
        return "\n".join(lines)


def generate_plaque_archive(
    out: str,
    patients: int,
    *,
    seed: int = 0,
    storage_cfg: StorageConfig | None = None,
    patient_salt: str = "",
    broken: bool = False,
) -> PlaqueArchiveSummary:
    """Write ``patients`` phantom patients under ``out`` (a folder or ``s3://bucket/prefix``):
    ``P0001/V01/<sequence>/IM0001.dcm``..., then ``patients.csv`` and the truth tables (module
    docstring). Keys are :func:`medhier.io.dicom.patient_key` with ``patient_salt``. The same
    arguments write byte-identical files."""
    plans = plan_plaque_archive(patients, seed)
    root = storage.normalize(out)
    cfg = storage_cfg or StorageConfig()
    measured: dict[tuple[int, int], dict[str, float | int]] = {}

    def files() -> Iterator[tuple[str, bytes]]:
        # Visit by visit as the writers drain them; each visit's truth measured on the way.
        for patient in plans:
            for visit in patient.visits:
                visit_files, measured[patient.index, visit.index] = _visit_files(patient, visit)
                yield from visit_files

    sizes = writing.write_files(root, files(), cfg, "carotid-write")

    expected = add_broken_series(root, cfg, seed=seed) if broken else {}
    # The tables go last: whoever sees patients.csv and the truth sees a complete archive.
    storage.write_bytes(storage.join(root, "patients.csv"), _patients_csv(plans, patient_salt), cfg)
    for name, table in truth_tables(plans, measured, patient_salt).items():
        storage.write_bytes(storage.join(root, name), _parquet_bytes(table), cfg)
    visits = sum(len(p.visits) for p in plans)
    return PlaqueArchiveSummary(
        out=root,
        patients=len(plans),
        visits=visits,
        series=visits * len(SEQUENCES),
        segs=visits,
        files=len(sizes),
        bytes=sum(sizes),
        broken=expected,
    )


def _visit_files(patient: PatientPlan, visit: VisitPlan) -> tuple[list[tuple[str, bytes]], dict[str, float | int]]:
    """One visit's DICOM files as (path relative to the archive, bytes): its four series and the
    truth SEG; and :func:`measure_truth` of its truth label map."""
    rendered = render_visit(patient, visit)
    folder = f"{patient.folder}/V{visit.index:02d}"
    files = []
    for seq in SEQUENCES:
        series = series_bytes(patient, visit, seq, rendered.images[seq])
        files += [(f"{folder}/{seq}/IM{k:04d}.dcm", data) for k, data in enumerate(series, start=1)]
        if seq == REFERENCE:
            files.append((f"{folder}/SEG/seg.dcm", seg_bytes(patient, visit, rendered.labels, series)))
    return files, measure_truth(rendered.labels)


# -- broken series ---------------------------------------------------------------------------------

# Kind -> what is wrong with the series, each a T1w series of one extra patient (CAROTID-BROKEN).
BROKEN_KINDS = {
    "gap": "slice 5 of 10 is missing",
    "duplicate_position": "an 11th instance repeats slice 4's position",
    "mixed_orientation": "slice 6 is rotated 10 degrees in-plane (another ImageOrientationPatient)",
    "unequal_slice_size": "slice 6 is 48 x 48 pixels, the others 64 x 64",
    "truncated_pixels": "slice 6's file ends half-way through its pixel data",
    "non_dicom_file": "a complete series plus notes.txt, a text file, in its folder",
}


def add_broken_series(out: str, storage_cfg: StorageConfig | None = None, *, seed: int = 0) -> dict[str, str]:
    """Write the series of :data:`BROKEN_KINDS` under ``out``/broken/<kind>/ and return what a
    volume assembly (:func:`medhier.io.volume.read_series`) must make of them: {path relative to
    ``out`` -> :data:`medhier.io.volume.REASONS` code}. A key ending in "/" is a series folder
    (the series is rejected), any other a single file (rejected on its own):

    - ``broken/gap/`` -> missing_positions
    - ``broken/duplicate_position/`` -> duplicate_positions
    - ``broken/mixed_orientation/`` -> mixed_orientation
    - ``broken/unequal_slice_size/`` -> unequal_slice_size
    - ``broken/truncated_pixels/IM0006.dcm`` -> unreadable_instance (the file), and
      ``broken/truncated_pixels/`` -> missing_positions (the nine slices left have a gap)
    - ``broken/non_dicom_file/notes.txt`` -> unreadable_instance (its series is complete)

    They belong to patient CAROTID-BROKEN, who is in neither ``patients.csv`` nor the truth.
    """
    seed = writing.check_seed(seed)
    root = storage.normalize(out)
    patient = dataclasses.replace(
        _plan_patient(seed, 1, f"medhier-carotid-broken|seed={seed}|format=1"),
        patient_id="CAROTID-BROKEN",
        patient_name="PHANTOM^BROKEN",
    )
    visit = patient.visits[0]
    base = series_bytes(patient, visit, REFERENCE, render_visit(patient, visit).images[REFERENCE])
    files: dict[str, bytes] = {}
    expected: dict[str, str] = {}
    for kind in BROKEN_KINDS:
        folder = f"broken/{kind}/"
        kind_files, kind_expected = _broken_series(kind, base, patient)
        files.update({folder + name: data for name, data in kind_files.items()})
        expected.update({folder + name: reason for name, reason in kind_expected.items()})
    for rel, data in files.items():
        storage.write_bytes(storage.join(root, rel), data, storage_cfg)
    return dict(sorted(expected.items()))


def _broken_series(kind: str, base: list[bytes], patient: PatientPlan) -> tuple[dict[str, bytes], dict[str, str]]:
    """The ``base`` series' files copied into a series of their own and damaged as ``kind`` says
    (:data:`BROKEN_KINDS`) -> (file name -> bytes, name -> expected reason), names inside the
    kind's folder; the name "" stands for the folder itself (the whole series)."""
    datasets = [_relabel(pydicom.dcmread(io.BytesIO(data)), kind, patient, k + 1) for k, data in enumerate(base)]
    files: dict[str, bytes] = {}
    expected: dict[str, str] = {}
    if kind == "gap":
        del datasets[4]
        expected[""] = "missing_positions"
    elif kind == "duplicate_position":
        extra = _relabel(pydicom.dcmread(io.BytesIO(base[3])), kind, patient, len(datasets) + 1)
        extra.InstanceNumber = len(datasets) + 1
        datasets.append(extra)
        expected[""] = "duplicate_positions"
    elif kind == "mixed_orientation":
        c, s = math.cos(math.radians(10.0)), math.sin(math.radians(10.0))
        datasets[5].ImageOrientationPatient = [writing.decimal_string(x) for x in (c, s, 0.0, -s, c, 0.0)]
        expected[""] = "mixed_orientation"
    elif kind == "unequal_slice_size":
        ds = datasets[5]
        ds.PixelData = ds.pixel_array[8:56, 8:56].astype("<u2").tobytes()
        ds.Rows = ds.Columns = 48
        expected[""] = "unequal_slice_size"
    elif kind == "non_dicom_file":
        files["notes.txt"] = b"Carotid MR, visit 1: patient swallowed during T2w; repeated.\n"
        expected["notes.txt"] = "unreadable_instance"
    files.update({f"IM{int(ds.InstanceNumber):04d}.dcm": writing.part10_bytes(ds) for ds in datasets})
    if kind == "truncated_pixels":
        files["IM0006.dcm"] = files["IM0006.dcm"][: -SIZE * SIZE]  # half of the 2-byte pixels gone
        expected["IM0006.dcm"] = "unreadable_instance"
        expected[""] = "missing_positions"
    return files, expected


def _relabel(ds: Dataset, kind: str, patient: PatientPlan, instance: int) -> Dataset:
    """``ds`` moved into the broken series of ``kind`` as its instance ``instance`` (1-based):
    series UID, number and description, and the SOP instance UID."""
    ds.SeriesInstanceUID = writing.derived_uid(patient.namespace, patient.patient_id, "broken", kind, "series")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = writing.derived_uid(
        patient.namespace, patient.patient_id, "broken", kind, "sop", instance
    )
    ds.SeriesDescription = f"{SERIES_DESCRIPTIONS[REFERENCE]} BROKEN {kind.upper()}"
    ds.SeriesNumber = 100 + list(BROKEN_KINDS).index(kind)
    return ds
