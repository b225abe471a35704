"""The segmentation model's samples: a visit with its truth label map -> one cache row per slice
(the platform's :mod:`medhier.data.study_cache` runs this per study and writes the cache).

    study ──assemble and register (plaque.study)──▶ reference + registered sequences
          ──truth: the study's own DICOM SEG on the reference (ArchiveSegmentations' rule)──▶
          ──model inputs and labels on the model grid (plaque.seg_inputs)──▶ one row per slice

Columns (besides the platform's ``status``, ``reason``, ``error`` and ``split``)
==================  =========  ==================================================================
column              type       meaning
==================  =========  ==================================================================
study_instance_uid  string     the visit
patient_key         string     the patient (the split's key)
reference_series    string     the reference series the truth lies on
slice               int32      0-based slice of the reference grid (io.volume's order); -1 on
                               error rows
slices              int32      the visit's slices
slice_mm            float64    the reference's slice spacing dz (mm)
inputs              binary     float16 (C, S, S): C = len(seg.sequences) x (2 seg.context + 1)
                               channels (plaque.seg_inputs), S = seg.image_size
label_map           binary     uint8 (S, S): the plaque label values (plaque.labels)
voxels_<label>      int64      voxels of each label in the slice (class weights, counts)
==================  =========  ==================================================================

A visit without samples is one error row with a visit reason of :data:`medhier.plaque.report.REASONS`
(``no_segmentation``: no truth SEG on the reference; ``missing_sequence``; a volume rejection of
the reference; ``internal_error``). Every slice of a usable visit is a sample, with or without
vessel: the model must learn where there is none.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from medhier import columns as C
from medhier.config import Config, PlaqueConfig, SegConfig
from medhier.data.series import Study
from medhier.data.study_cache import StudySampler
from medhier.plaque import labels as L
from medhier.plaque.seg_inputs import ModelGrid, check_sequences, input_channels, model_inputs
from medhier.plaque.report import VisitRejected
from medhier.plaque.segmentations import ArchiveSegmentations
from medhier.plaque.study import VisitSettings, assemble_visit, measure_version
from medhier.plaque.visits import plan_study

__all__ = ["INPUTS", "LABEL_MAP", "SAMPLE_SCHEMA", "SLICE", "VOXELS", "sampler", "visit_samples"]

INPUTS, LABEL_MAP = "inputs", "label_map"
SLICE, SLICES, SLICE_MM, REFERENCE_SERIES = "slice", "slices", "slice_mm", "reference_series"
VOXELS = {name: f"voxels_{name}" for name in L.NAMES}  # label name -> its count column

SAMPLE_SCHEMA = pa.schema(
    [
        (C.STUDY_INSTANCE_UID, pa.string()), (C.PATIENT_KEY, pa.string()), (REFERENCE_SERIES, pa.string()),
        (SLICE, pa.int32()), (SLICES, pa.int32()), (SLICE_MM, pa.float64()),
        (INPUTS, pa.binary()), (LABEL_MAP, pa.binary()), *[(column, pa.int64()) for column in VOXELS.values()],
        (C.STATUS, pa.string()), (C.REASON, pa.string()), (C.ERROR, pa.string()),
    ]
)


@dataclass(frozen=True)
class SampleSettings:
    """What a study task needs (picklable): the plaque and seg sections and the patient salt."""

    plaque: PlaqueConfig
    seg: SegConfig
    patient_salt: str = ""


def visit_samples(study: Study, settings: SampleSettings) -> list[dict[str, Any]]:
    """One study -> its sample rows (module docstring), or one error row. Never raises."""
    base = {C.STUDY_INSTANCE_UID: study.study_instance_uid, C.PATIENT_KEY: study.patient_key}
    source = ArchiveSegmentations()
    visit_settings = VisitSettings(settings.plaque, source, source.model_id, "", "", settings.patient_salt)
    try:
        visit = assemble_visit(study, plan_study(study.members, settings.plaque.sequences), visit_settings)
        truth = source.labels(visit.input).labels.array
        inputs = model_inputs(visit.reference, visit.input.sequences, settings.seg, settings.plaque.reference)
    except VisitRejected as exc:
        return [_error(base, exc.reason, f"study {study.study_instance_uid}: {exc.message}")]
    except Exception as exc:  # a bug must cost one visit, not the cache
        return [_error(base, "internal_error", f"study {study.study_instance_uid}: {type(exc).__name__}: {exc}")]
    labels = ModelGrid.over(visit.reference, settings.seg).to_model(truth, order=0)
    rows = []
    for k in range(inputs.shape[0]):
        counts = np.bincount(labels[k].ravel(), minlength=len(L.NAMES))
        rows.append({
            **base, REFERENCE_SERIES: visit.reference.series_uid, SLICE: k, SLICES: inputs.shape[0],
            SLICE_MM: float(visit.reference.spacing[0]), INPUTS: inputs[k].astype(np.float16).tobytes(),
            LABEL_MAP: labels[k].astype(np.uint8).tobytes(), **{VOXELS[name]: int(counts[v]) for v, name in enumerate(L.NAMES)},
            C.STATUS: C.STATUS_OK, C.REASON: "", C.ERROR: "",
        })
    return rows


def _error(base: dict[str, Any], reason: str, message: str) -> dict[str, Any]:
    return {**base, REFERENCE_SERIES: None, SLICE: -1, SLICES: 0, SLICE_MM: None, INPUTS: b"", LABEL_MAP: b"",
            **{column: 0 for column in VOXELS.values()}, C.STATUS: C.STATUS_ERROR, C.REASON: reason, C.ERROR: message}


def model_settings(seg: SegConfig) -> dict[str, Any]:
    """What a sample holds for the model: recorded with the cache (``CacheInfo.preprocess``) and
    compared with the config before training (:meth:`PlaqueSeg.check_cache`)."""
    return {"sequences": list(seg.sequences), "context": seg.context, "spacing_mm": seg.spacing_mm, "image_size": seg.image_size,
            "percentiles": list(seg.percentiles), "channels": input_channels(seg), "labels": list(L.NAMES)}


def sampler(cfg: Config) -> StudySampler:
    """The plaque model's :class:`~medhier.data.study_cache.StudySampler` for ``cfg``."""
    check_sequences(cfg.seg, cfg.plaque)
    plaque = asdict(cfg.plaque)
    fingerprint = {"measure": measure_version(cfg.plaque), "plaque": {k: plaque[k] for k in ("sequences", "reference", "register", "seg_labels")},
                   "model": model_settings(cfg.seg), "format": 1}
    size = cfg.seg.image_size
    return StudySampler(
        fn=visit_samples, kwargs={"settings": SampleSettings(cfg.plaque, cfg.seg, cfg.dicom.patient_salt)}, schema=SAMPLE_SCHEMA,
        fingerprint=fingerprint, inputs=model_settings(cfg.seg), image_size=size, row_bytes=size * size * (2 * input_channels(cfg.seg) + 1),
        labels="the DICOM SEG objects of each study on its reference series (plaque.seg_labels)",
        count_columns={name: VOXELS[name] for name in L.NAMES}, class_noun="label voxels",
        studies_per_task=1 if cfg.plaque.register else 4,
    )
