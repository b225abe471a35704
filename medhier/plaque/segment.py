"""``medhier plaque segment``: every visit of an archive segmented by a trained model, one DICOM SEG
per visit on its reference series, and the measure job's row from that label map — incrementally
and crash-safely, on Ray Data.

    archive ──list, headers, study index (data.series)──▶ visit keys ──minus the ledger──▶ todo
    todo ──CPU tasks, one per study: volumes, registration (plaque.study), model inputs
           (plaque.seg_inputs), the reference series' headers──▶
         ──model actors (a GPU each where the cluster has GPUs, else CPUs; plaque.segmenter.SegActor):
           label maps on the reference grid──▶
         ──CPU: the DICOM SEG (io.seg.write_seg) and the measurements (plaque.measure)──▶ staging
    staging ──commit (infer.ledger, as ``plaque measure`` and ``medhier score``)──▶ report + ledger
    report ──▶ visits.parquet, summary.json

The driver, the ledger, the commit, the visit manifest and the summary are ``plaque measure``'s
(:func:`medhier.plaque.api.measure_archive`, with this module's pipeline and the model as its
segmentation source): the report has the measure job's columns
(:data:`medhier.plaque.report.REPORT_SCHEMA`), with ``model_id`` the model's id (the weights'
hash), ``model_version`` ``seg-<format>-`` the measurement's version, ``segmentation`` the SEG's
URI and ``segmentation_format`` ``dicom-seg``; the study's own SEG objects are ``unused``
entries of ``segmentation_objects``. A visit is segmented again when it changes, when the model
or the plaque settings change, or with ``--full``.

SEG objects: ``OUTPUT/seg/<model_id>/<StudyInstanceUID>.dcm`` — BINARY, one segment per label
the model found (:data:`SEGMENTS`: SegmentLabels that ``plaque.seg_labels``' default patterns
claim, so the folder is a valid ``plaque measure --segmentations`` input), referencing the
reference series instance by instance, algorithm "medhier plaque-seg" with the model id as its
version. Their UIDs derive from the model id and the reference series, their dates from the
reference series (:func:`medhier.io.seg.write_seg`): segmenting the same visit with the same
model writes the same bytes, so a run that crashed after writing some SEGs and before its commit
leaves files the next run rewrites identically, and only committed rows point at them. A visit
in which the model finds no vessel is an ok row with zero volumes and no SEG (a SEG needs a
segment); its ``segmentation_objects`` entry says so.

Error rows: every reason of ``plaque measure`` (a reference that forms no volume, ...), and
``missing_sequence`` when a sequence the model takes (``seg.sequences``) has no volume or could
not be registered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from pydicom.sr.codedict import codes
from ray.data import ActorPoolStrategy

from medhier import columns as C
from medhier.config import Config, PlaqueConfig, SegConfig, StorageConfig
from medhier.data.series import SeriesSettings, Study, map_studies
from medhier.infer.actor import actor_resources
from medhier.io import storage
from medhier.io.dicom import read_dataset
from medhier.io.seg import SegmentSpec, header_bytes, write_seg
from medhier.plaque import labels as L
from medhier.plaque.api import MeasureSummary, measure_archive
from medhier.plaque.seg_inputs import ModelGrid, check_sequences, model_inputs
from medhier.plaque.measure import measure
from medhier.plaque.segmenter import GRID, PREDICTED, SEGMENTED_AT, ActorOptions, ModelSegmentations, SegActor
from medhier.plaque.report import REPORT_SCHEMA, measurement_values, to_json
from medhier.plaque.seg_samples import INPUTS
from medhier.plaque.study import VisitSettings, assemble_visit, end_row, measure_version, reject_row, start_row
from medhier.plaque.seg_task import PLAQUE_SEG
from medhier.plaque.visits import USED, plan_study
from medhier.train.checkpoint import config_for_checkpoint, load_checkpoint

__all__ = ["SEGMENTS", "SEGMENT_FORMAT", "ModelPipeline", "seg_uri", "segment_archive", "segment_version"]

SEGMENT_FORMAT = 1  # bump when a code change alters what a segmented visit's row or SEG holds
HEADERS, SPACING = "reference_headers", "reference_spacing"  # between the stages only
PREPARED_SCHEMA = (REPORT_SCHEMA.append(pa.field(INPUTS, pa.binary())).append(pa.field(GRID, pa.string()))
                   .append(pa.field(HEADERS, pa.list_(pa.binary()))).append(pa.field(SPACING, pa.list_(pa.float64()))))

# How the model's labels are described in its SEG objects: SegmentLabels claimed by the default
# plaque.seg_labels patterns; SNOMED CT types where one fits.
SEGMENTS = {
    L.LUMEN: SegmentSpec("Lumen", codes.SCT.LumenOfArtery, codes.SCT.AnatomicalStructure),
    L.WALL: SegmentSpec("Vessel wall"),
    L.LIPID: SegmentSpec("Lipid-rich necrotic core"),
    L.HAEMORRHAGE: SegmentSpec("Intraplaque haemorrhage", codes.SCT.Hemorrhage, codes.SCT.MorphologicallyAbnormalStructure),
    L.CALCIFICATION: SegmentSpec("Calcification", codes.SCT.VascularCalcification, codes.SCT.MorphologicallyAbnormalStructure),
    L.CAP: SegmentSpec("Fibrous cap"),
}


def segment_version(plaque: PlaqueConfig) -> str:
    """The report's ``model_version`` of a segment run: this module's format and the measurement's."""
    return f"seg-{SEGMENT_FORMAT}-{measure_version(plaque)}"


def seg_uri(output: str, model_id: str, study_uid: str) -> str:
    """Where a visit's SEG goes (module docstring)."""
    return storage.join(storage.normalize(output), "seg", model_id, f"{study_uid}.dcm")


def segment_archive(cfg: Config, archive: str, checkpoint: str, output: str, *, full: bool = False) -> MeasureSummary:
    """Segment the new or changed visits of ``archive`` (all of them with ``full``) with
    ``checkpoint`` (a plaque-seg model): SEGs and report under ``output``. The model's input
    settings (``seg``) come from the checkpoint, the rest from ``cfg``. Needs Ray initialised.
    Raises on failure (the run's rows then never become visible)."""
    loaded = load_checkpoint(checkpoint, PLAQUE_SEG, cfg.storage)
    run_cfg = config_for_checkpoint(cfg, loaded)
    check_sequences(run_cfg.seg, run_cfg.plaque)
    source = ModelSegmentations(storage.normalize(checkpoint), loaded.model_id, run_cfg.plaque.reference, cfg.storage)
    pipeline = ModelPipeline(storage.normalize(checkpoint), storage.normalize(output), run_cfg.seg, cfg.score.use_gpu, cfg.score.actors,
                             cfg.train.precision)
    return measure_archive(run_cfg, archive, output, source=source, full=full, pipeline=pipeline, version=segment_version(run_cfg.plaque))


@dataclass(frozen=True)
class ModelPipeline:
    """The segment job's :class:`~medhier.plaque.api.VisitPipeline` (module docstring)."""

    checkpoint: str
    output: str
    seg: SegConfig
    use_gpu: str = "auto"
    actors: int = 0  # 0: one per GPU, or one on a CPU-only cluster
    precision: str = "auto"
    visits_per_call: int = 4  # visits per actor call

    def rows(self, index: str, todo: pa.Table, settings: SeriesSettings, visit: VisitSettings):
        gpus, cpus = actor_resources(self.use_gpu)
        actors = self.actors or (max(1, int(ray.cluster_resources().get("GPU", 0))) if gpus else 1)
        options = ActorOptions(precision=self.precision, threads=0 if gpus else int(cpus))
        per_task = 1 if visit.plaque.register else 4
        prepared = map_studies(index, todo, prepare_visit, PREPARED_SCHEMA, settings, fn_kwargs={"settings": visit, "seg": self.seg},
                               studies_per_task=per_task)
        segmented = prepared.map_batches(
            SegActor, fn_constructor_kwargs={"checkpoint": self.checkpoint, "storage_cfg": settings.storage, "options": options},
            batch_size=self.visits_per_call, batch_format="pyarrow", compute=ActorPoolStrategy(size=actors), num_gpus=gpus, num_cpus=cpus)
        return segmented.map_batches(finish_visits, fn_kwargs={"output": self.output, "model_id": visit.model_id, "storage_cfg": settings.storage},
                                     batch_size=self.visits_per_call, batch_format="pyarrow")


def prepare_visit(study: Study, settings: VisitSettings, seg: SegConfig) -> dict[str, Any]:
    """Stage 1, one study: its row (ok so far, or an error row) with the model's inputs, the
    reference grid and the reference series' headers. Never raises."""
    row = start_row(study, settings)
    plan = plan_study(study.members, settings.plaque.sequences)
    visit = None
    extra: dict[str, Any] = {INPUTS: b"", GRID: None, HEADERS: [], SPACING: None}
    try:
        visit = assemble_visit(study, plan, settings, row)
        reference = visit.reference
        inputs = model_inputs(reference, visit.input.sequences, seg, settings.plaque.reference)
        paths = list(dict.fromkeys(reference.sources))  # a multi-frame reference is one file
        extra = {INPUTS: inputs.astype(np.float16).tobytes(), GRID: ModelGrid.over(reference, seg).to_json(),
                 HEADERS: [header_bytes(visit.input.objects[p], source=p) for p in paths], SPACING: list(map(float, reference.spacing))}
        row.update(status=C.STATUS_OK, error_reason=None, error_message=None, **measurement_values(None))
    except Exception as exc:  # VisitRejected, or a bug: either costs one visit, not the run
        reject_row(row, exc)
        return {**end_row(row, plan, visit, settings, getattr(exc, "choice", None)), **extra}
    return {**end_row(row, plan, visit, settings), **extra}


def finish_visits(batch: pa.Table, output: str, model_id: str, storage_cfg: StorageConfig) -> pa.Table:
    """Stage 3: segmented rows -> report rows: the SEG written, the label map measured."""
    rows = []
    for row in batch.to_pylist():
        predicted, headers, spacing = row.pop(PREDICTED), row.pop(HEADERS), row.pop(SPACING)
        grid, segmented_at = row.pop(GRID), row.pop(SEGMENTED_AT)
        if row[C.STATUS] == C.STATUS_OK:
            try:
                _finish(row, predicted, ModelGrid.from_json(grid), headers, spacing, output, model_id, storage_cfg)
            except Exception as exc:  # a bug must cost one visit, not the run
                reject_row(row, exc)
            row[C.SCORED_AT] = segmented_at
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=REPORT_SCHEMA)


def _finish(row: dict[str, Any], predicted: bytes, grid: ModelGrid, headers: list[bytes], spacing: list[float], output: str,
            model_id: str, storage_cfg: StorageConfig) -> None:
    labels = np.frombuffer(predicted, np.uint8).reshape(-1, *grid.shape)
    study = row[C.STUDY_INSTANCE_UID]
    entry = {"path": None, "outcome": USED, "reason": None, "message": None, "unmapped": {}, "resampled": not grid.identity,
             "outside_voxels": 0}
    if labels.any():
        uri = seg_uri(output, model_id, study)
        data = write_seg(labels, [read_dataset(h, pixels=False) for h in headers], SEGMENTS, entropy=f"{model_id}|{row['reference_series_uid']}",
                         series_description="PLAQUE SEG " + model_id, algorithm_name="medhier plaque-seg", algorithm_version=model_id)
        storage.write_bytes(uri, data, storage_cfg)
        entry.update(path=uri, message=f"written by model {model_id}")
        row.update(segmentation=uri, segmentation_format="dicom-seg")
    else:
        entry["message"] = f"model {model_id} found no vessel: no SEG written (a SEG needs a segment)"
    row["segmentation_objects"] = to_json([entry, *json.loads(row["segmentation_objects"])])
    row.update(measurement_values(measure(labels, spacing).to_dict()))
