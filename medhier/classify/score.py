"""The classifier's archive scoring: the platform's batch job (:mod:`medhier.infer.batch`) with
the classifier's extras around it:

* ``--explain``: Grad-CAM (main level) for the rows ``score.explain_*`` selects, computed in the
  model actor beside the predictions (it needs the model): an overlay PNG per row under
  ``OUTPUT/explain/run_id=<run>/`` and where its heat lies, in the report's ``explain_*`` columns;
* ``--sr``: one DICOM SR (TID 1500) per ok row under ``OUTPUT/sr/run_id=<run>/``, written by a
  stage of its own over the scored rows, with the very values its report row carries; the
  row's ``sr_path`` names it;
* ``--sr-to dicomweb+http(s)://...``: the SRs (``--sr`` implied) are also stored in a PACS with
  STOW-RS once the run has committed, and every committed SR an earlier run could not store
  there is tried again (:mod:`medhier.infer.deliver` records each attempt under
  ``OUTPUT/deliveries/``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np

from medhier import columns as C
from medhier.classify.explain import explain_batch, heat_summary, overlay_png
from medhier.classify.report import EXPLAIN_LOCATION, EXPLAIN_PATH, P_LEAF, PRED_LEAF, PRED_MAIN, RESULT_FIELDS, SR_PATH, prediction_fields
from medhier.classify.task import CLASSIFY
from medhier.classify.taxonomy import Taxonomy
from medhier.config import Config, StorageConfig
from medhier.infer.actor import ModelActor
from medhier.infer.batch import RunInfo, ScoreSummary, Stage, score_archive
from medhier.infer.deliver import Delivery
from medhier.io import storage
from medhier.classify.sr import make_sr, sr_filename

__all__ = ["GradCam", "score", "write_srs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GradCam:
    """The model actor's annotator for ``--explain`` (see the module docstring)."""

    output: str
    run_id: str
    storage: StorageConfig
    min_prob: float
    skip_mains: tuple[str, ...]

    def __call__(self, actor: ModelActor, batch: dict[str, np.ndarray], ok: np.ndarray, images: np.ndarray,
                 result: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(ok)
        taxonomy = actor.predictor.taxonomy
        paths = np.full(n, None, dtype=object)
        location = {k: np.full(n, np.nan, np.float32) for k in EXPLAIN_LOCATION}
        rows = np.flatnonzero(ok)  # the row of each image
        mains = np.array(taxonomy.mains, dtype=object)
        leaf_prob = result[P_LEAF][rows, result[PRED_LEAF][rows]]
        chosen = [j for j, r in enumerate(rows) if mains[result[PRED_MAIN][r]] not in self.skip_mains and leaf_prob[j] >= self.min_prob]
        for start in range(0, len(chosen), actor.batch_size):
            part = chosen[start : start + actor.batch_size]
            heat, _ = explain_batch(actor.eager, taxonomy, images[part], actor.preset, level="main")
            for j, h in zip(part, heat):
                r = rows[j]
                key = hashlib.sha1(f"{batch[C.PATH][r]}\0{batch[C.FRAME][r]}".encode()).hexdigest()[:20]
                relative = f"explain/run_id={self.run_id}/{key}.png"
                storage.write_bytes(storage.join(self.output, relative), overlay_png(images[j], h), self.storage)
                paths[r] = relative
                for name, value in heat_summary(h).items():
                    location[f"explain_{name}"][r] = np.nan if value is None else value
        return {EXPLAIN_PATH: paths, **location}


def write_srs(batch: dict[str, np.ndarray], run: RunInfo) -> dict[str, np.ndarray]:
    """The SR stage over scored rows: one DICOM SR per ok row, with the values its report row
    will carry (:func:`prediction_fields`) -> the rows with ``sr_path`` (relative to OUTPUT).

    The SR carries its source's patient and study, so the source's header is read again (one
    GET per image, only with --sr). A source an SR cannot be made for (e.g. without a
    SeriesInstanceUID) keeps a null sr_path and a warning: the report row stands either way. An
    archive that stops answering fails the stage (and the run): a row committed without its SR
    would never get one.
    """
    tax = Taxonomy.from_config(run.cfg.taxonomy)
    ok = batch[C.STATUS] == C.STATUS_OK
    fields = prediction_fields(tax, batch, ok)
    paths = np.full(len(ok), None, dtype=object)
    read = storage.reader(run.archive, run.storage)
    source_path, source = None, b""
    for i in np.flatnonzero(ok):
        rel = str(batch[C.PATH][i])
        try:
            if rel != source_path:  # frames of one object are adjacent
                source_path, source = rel, read(rel)
            frame = int(batch[C.FRAME][i]) if int(batch[C.NUM_FRAMES][i]) > 1 else None
            result = {k: fields[k][i] for k in RESULT_FIELDS} | ({"frame": frame} if frame is not None else {})
            data = make_sr(source, result, taxonomy=tax, model_id=run.model_id, model_version=run.version, source_name=rel)
            relative = f"sr/run_id={run.run_id}/{sr_filename(str(batch[C.SOP_INSTANCE_UID][i]), run.model_id, frame)}"
            storage.write_bytes(storage.join(run.output, relative), data, run.storage)
            paths[i] = relative
        except storage.ArchiveUnavailable:
            raise
        except Exception as exc:  # the report row matters more than its SR
            log.warning("no SR for %s: %s", rel, exc)
    return {**batch, SR_PATH: paths}


def score(cfg: Config, archive: str, checkpoint: str, output: str, *, full: bool = False, explain: bool = False,
          sr: bool = False, sr_to: str = "") -> ScoreSummary:
    """``medhier score``: the classifier over the new or changed objects of ``archive`` (all of
    them with ``full``), with Grad-CAM overlays (``explain``) and DICOM SRs (``sr``) beside the
    report; ``sr_to``: a DICOMweb URI the SRs are stored in (implies ``sr``). Needs Ray
    initialised. Raises ValueError naming a malformed ``sr_to``."""
    s = cfg.score
    deliveries = (Delivery(SR_PATH, sr_to),) if sr_to else ()  # checked before any work
    annotator = (lambda run: GradCam(run.output, run.run_id, run.storage, s.explain_min_prob, tuple(s.explain_skip_mains))) if explain else None
    return score_archive(cfg, archive, checkpoint, output, CLASSIFY, full=full, annotator=annotator,
                         stages=(Stage(write_srs),) if sr or sr_to else (), deliveries=deliveries)
