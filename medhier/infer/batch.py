"""Archive scoring: whole archives into Parquet reports, incremental and crash-safe.

    list ─▶ manifest ─▶ minus the ledger (what this model already scored) ─▶ todo
    todo ─▶ decode + preprocess (CPU tasks) ─▶ Scorer actors (GPU, or CPU) ─▶ report rows
         ─▶ staging Parquet under runs/<run_id>/ ─▶ commit

Output layout (OUTPUT is local or s3://)::

    report/run_id=<run>/part-0.parquet   one file per committed run (hive-partitioned by run)
    ledger/run_id=<run>.parquet          what each committed run scored (object version, model)
    studies/<model_id>__<version>.parquet  study roll-up for that model
    runs/<run>/                          staging, manifests, config.yaml, summary.json, _COMMITTED
    summary.json                         the latest run's summary

Crash safety: a run writes only under runs/<run>/ until the end. It then commits in an order
that a crash at any point leaves recoverable: (1) the report file, written atomically (a local
rename, or a single S3 upload that becomes visible only when complete); (2) the ledger file,
which the next run rebuilds from the report if the crash fell between the two. Until (1) nothing
is visible; after it the rows are visible exactly once.

:class:`Scorer` is also the model stage of evaluation after training and of ``medhier evaluate``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from medhier.io import storage
from medhier import columns as C
from medhier.config import Config, StorageConfig
from medhier.runtime import release_failed_pipeline
from medhier.classify.taxonomy import Taxonomy

__all__ = ["Scorer", "ScoreSummary", "predict_dataset", "report_schema", "score_archive"]

log = logging.getLogger(__name__)

P_MAIN = "p_main"  # (N, M) probabilities per main class
P_LEAF = "p_leaf"  # (N, L) probabilities per leaf
PRED_MAIN = "pred_main"
PRED_LEAF = "pred_leaf"
SCORED_MS = "scored_ms"  # (N,) int64: when the model scored the row's batch, ms since the epoch (UTC)
FAIL_AFTER_ENV = "MEDHIER_SCORE_FAIL_AFTER"  # "N": the Scorer fails after N batches (crash tests)

# Report columns besides the per-leaf probabilities (see report_schema and the README).
MODEL_ID, MODEL_VERSION, RUN_ID, SCORED_AT = "model_id", "model_version", "run_id", "scored_at"
ERROR_REASON, ERROR_MESSAGE = "error_reason", "error_message"
MAIN_LABEL, MAIN_PROB, SUB_LABEL, SUB_PROB, LEAF_LABEL, LEAF_PROB = "main_label", "main_prob", "sub_label", "sub_prob", "leaf_label", "leaf_prob"
VERSION_KEY = (C.PATH, C.SIZE, C.ETAG, C.MTIME)  # an object version: a changed object is scored again
# --explain: the Grad-CAM overlay (relative to OUTPUT) and where its heat lies, as fractions of
# the image height and width; --sr: the row's DICOM SR (relative to OUTPUT). Null otherwise.
EXPLAIN_PATH, SR_PATH = "explain_path", "sr_path"
EXPLAIN_LOCATION = ("explain_peak_y", "explain_peak_x", "explain_com_y", "explain_com_x")


def leaf_column(leaf_name: str) -> str:
    """Report column of a leaf's probability: "fracture/burst" -> "p_fracture__burst"."""
    return "p_" + leaf_name.replace("/", "__")


def report_schema(taxonomy: Taxonomy) -> pa.Schema:
    """The report's columns and types; documented in the README."""
    fields = [
        (C.PATH, pa.string()),
        (C.SIZE, pa.int64()),
        (C.ETAG, pa.string()),
        (C.MTIME, pa.timestamp("ms", tz="UTC")),
        (C.SOP_INSTANCE_UID, pa.string()),
        (C.STUDY_INSTANCE_UID, pa.string()),
        (C.SERIES_INSTANCE_UID, pa.string()),
        (C.FRAME, pa.int32()),
        (C.MODALITY, pa.string()),
        (C.BODY_PART, pa.string()),
        (C.PATIENT_KEY, pa.string()),
        (C.STATUS, pa.string()),
        (ERROR_REASON, pa.string()),
        (ERROR_MESSAGE, pa.string()),
        (MAIN_LABEL, pa.string()),
        (MAIN_PROB, pa.float32()),
        (SUB_LABEL, pa.string()),
        (SUB_PROB, pa.float32()),
        (LEAF_LABEL, pa.string()),
        (LEAF_PROB, pa.float32()),
        *[(leaf_column(n), pa.float32()) for n in taxonomy.leaf_names],
        (EXPLAIN_PATH, pa.string()),
        *[(k, pa.float32()) for k in EXPLAIN_LOCATION],
        (SR_PATH, pa.string()),
        (MODEL_ID, pa.string()),
        (MODEL_VERSION, pa.string()),
        (RUN_ID, pa.string()),
        (SCORED_AT, pa.timestamp("ms", tz="UTC")),
    ]
    return pa.schema(fields)


# -- the model actor -----------------------------------------------------------------------


class Scorer:
    """Callable class for ``map_batches``: one model per actor, loaded (and compiled) once.

    Input rows need ``image`` (uint8 bytes, image_size²); rows whose image is empty (error rows)
    pass through with NaN probabilities and -1 predictions. Output: the input columns minus the
    image, plus ``p_main`` (N, M), ``p_leaf`` (N, L), ``pred_main`` and ``pred_leaf``
    (hierarchical: the leaf lies inside the predicted main class) and ``scored_ms`` (when the
    model scored the row's batch: the report's ``scored_at``).
    """

    def __init__(self, checkpoint: str, storage_cfg: dict[str, Any], precision: str = "auto", channels_last: bool = True,
                 threads: int = 0, compile: bool = False, batch_size: int = 32, fail_after: int = 0,
                 explain: dict[str, Any] | None = None, int8: dict[str, Any] | None = None):
        from medhier.train.checkpoint import load_checkpoint
        from medhier.classify.model import autocast_dtype
        from medhier.classify.presets import eval_preset

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.storage = StorageConfig(**storage_cfg)
        loaded = load_checkpoint(checkpoint, self.storage)
        self.taxonomy = loaded.taxonomy
        self.model_id = loaded.model_id
        self.checkpoint_cfg, self.epoch = loaded.cfg, loaded.epoch  # for callers that need the rest
        self.image_size = loaded.cfg.preprocess.image_size
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = loaded.model.to(self.device, memory_format=self.memory_format).eval()
        self.preset = eval_preset(loaded.cfg.preprocess).to(self.device)
        self.amp_dtype = None if precision == "int8" else autocast_dtype(precision, self.device)
        self.batch_size = batch_size
        self.compiled = compile or precision == "int8"
        self.batches = 0
        self.fail_after = fail_after
        # --explain: {"output", "run_id", "storage", "min_prob", "skip_mains"}. Grad-CAM needs
        # gradients, so it runs on the eager model even when scoring runs a compiled one.
        self.explain = explain
        self.eager = self.model
        if precision == "int8":
            self._quantize(int8 or {})
        elif compile:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # constant-fold the weights: the CPU speed-up lives here
            self.model = torch.compile(self.model)
            # Compile now, at the one batch shape it will ever see (partial batches are padded).
            self.predict_images(np.zeros((batch_size, self.image_size, self.image_size), np.uint8))

    def _quantize(self, int8: dict[str, Any]) -> None:
        """Replace the model by its int8 version (medhier/int8.py), calibrated on the images of
        ``int8["images"]`` (an .npz URI: "calibration" and "check", (N, S, S) uint8 as decode
        tasks make them), then compare it with the fp32 model on the check images: below
        ``int8["min_agreement"]`` it raises. The comparison is written as JSON into the folder
        ``int8["report"]`` when given."""
        import socket

        from medhier.infer.int8 import agreement, check_agreement, quantize

        if self.device.type != "cpu":
            raise ValueError("score.precision=int8 is a CPU path; this Scorer runs on a GPU: use bf16 or fp16 there")
        if not int8.get("images"):
            raise ValueError("score.precision=int8 needs calibration images: none were given")
        with np.load(io.BytesIO(storage.read_bytes(int8["images"], self.storage))) as images:
            calibration, check = images["calibration"], images["check"]
        if not len(calibration):
            raise ValueError(f"score.precision=int8: {int8['images']} holds no calibration image")
        started = time.perf_counter()
        with torch.inference_mode():
            x = self.preset(torch.from_numpy(calibration).to(self.device))
        self.model = quantize(self.eager, x.contiguous(memory_format=self.memory_format), self.batch_size)
        fp32, quantized = [], []
        if len(check):
            for start in range(0, len(check), self.batch_size):
                part = check[start : start + self.batch_size]
                quantized.append(self.predict_images(part))  # the first call compiles
                fp32.append(self.predict_images(part, eager=True))
        else:
            self.predict_images(np.zeros((self.batch_size, self.image_size, self.image_size), np.uint8))  # compile now
        join = lambda parts: {k: np.concatenate([p[k] for p in parts]) for k in (P_LEAF, PRED_MAIN, PRED_LEAF)}  # noqa: E731
        result = agreement(join(fp32), join(quantized)) if fp32 else agreement({PRED_LEAF: np.zeros(0)}, {})
        check_summary = {"calibration_images": len(calibration), **result.to_dict(), "seconds": round(time.perf_counter() - started, 1)}
        if int8.get("report"):
            where = f"{socket.gethostname()}-{os.getpid()}"
            storage.write_text(storage.join(int8["report"], f"{where}.json"), json.dumps(check_summary), self.storage)
        log.info("int8: %s", check_summary)
        check_agreement(result, float(int8.get("min_agreement", 0.0)))

    @torch.inference_mode()
    def predict_images(self, images: np.ndarray, eager: bool = False) -> dict[str, np.ndarray]:
        """(N, S, S) uint8 -> probabilities and hierarchical predictions (numpy). ``eager``: with
        the uncompiled model (fp32 for int8 scoring), as a reference."""
        from medhier.classify.model import predict

        n = len(images)
        if self.compiled and not eager and n < self.batch_size:  # one shape, one compiled graph
            images = np.concatenate([images, np.zeros((self.batch_size - n, *images.shape[1:]), np.uint8)])
        if not images.flags.writeable:  # a view of Arrow's buffer; torch wants memory it may own
            images = images.copy()
        x = torch.from_numpy(images).to(self.device, non_blocking=True)
        x = self.preset(x).contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = (self.eager if eager else self.model)(x)
        main, leaf = predict(out, self.taxonomy)
        return {
            P_MAIN: out.log_p_main.float().exp()[:n].cpu().numpy(),
            P_LEAF: out.log_p_leaf.float().exp()[:n].cpu().numpy(),
            PRED_MAIN: main[:n].cpu().numpy(),
            PRED_LEAF: leaf[:n].cpu().numpy(),
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.batches += 1
        if self.fail_after and self.batches > self.fail_after:
            raise RuntimeError(f"injected failure after {self.fail_after} batches ({FAIL_AFTER_ENV})")
        blobs = batch[C.IMAGE]
        n = len(blobs)
        ok = np.array([len(b) > 0 for b in blobs], dtype=bool)
        m, l = self.taxonomy.num_mains, self.taxonomy.num_leaves
        result = {
            P_MAIN: np.full((n, m), np.nan, np.float32),
            P_LEAF: np.full((n, l), np.nan, np.float32),
            PRED_MAIN: np.full(n, -1, np.int64),
            PRED_LEAF: np.full(n, -1, np.int64),
            SCORED_MS: np.full(n, -1, np.int64),
        }
        images = None
        if ok.any():
            images = np.frombuffer(b"".join(blobs[ok]), dtype=np.uint8).reshape(-1, self.image_size, self.image_size)
            for start in range(0, len(images), self.batch_size):
                part = self.predict_images(images[start : start + self.batch_size])
                rows = np.flatnonzero(ok)[start : start + self.batch_size]
                for key, values in part.items():
                    result[key][rows] = values
                result[SCORED_MS][rows] = int(time.time() * 1000)
        # error rows: when their batch passed the model
        result[SCORED_MS][result[SCORED_MS] < 0] = int(time.time() * 1000)
        out = {k: v for k, v in batch.items() if k != C.IMAGE}
        out.update(result)
        if self.explain and images is not None:
            out.update(self._explain(batch, ok, images, result))
        return out

    def _explain(self, batch: dict[str, np.ndarray], ok: np.ndarray, images: np.ndarray, result: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Grad-CAM (main level) for the selected rows: an overlay PNG each, and where it points."""
        import hashlib

        from medhier.classify.explain import explain_batch, heat_summary, overlay_png

        n, cfg = len(ok), self.explain
        paths = np.full(n, None, dtype=object)
        location = {k: np.full(n, np.nan, np.float32) for k in EXPLAIN_LOCATION}
        rows = np.flatnonzero(ok)  # row of each image
        mains = np.array(self.taxonomy.mains, dtype=object)
        leaf_prob = result[P_LEAF][rows, result[PRED_LEAF][rows]]
        chosen = [j for j, r in enumerate(rows) if mains[result[PRED_MAIN][r]] not in cfg["skip_mains"] and leaf_prob[j] >= cfg["min_prob"]]
        scfg = StorageConfig(**cfg["storage"])
        for start in range(0, len(chosen), self.batch_size):
            part = chosen[start : start + self.batch_size]
            heat, _ = explain_batch(self.eager, self.taxonomy, images[part], self.preset, level="main")
            for j, h in zip(part, heat):
                r = rows[j]
                key = hashlib.sha1(f"{batch[C.PATH][r]}\0{batch[C.FRAME][r]}".encode()).hexdigest()[:20]
                relative = f"explain/run_id={cfg['run_id']}/{key}.png"
                storage.write_bytes(storage.join(cfg["output"], relative), overlay_png(images[j], h), scfg)
                paths[r] = relative
                for name, value in heat_summary(h).items():
                    location[f"explain_{name}"][r] = np.nan if value is None else value
        return {EXPLAIN_PATH: paths, **location}


def scorer_resources(use_gpu: str = "auto") -> tuple[int, float]:
    """(GPUs, CPUs) for one Scorer actor: a GPU when asked for or when the cluster has one;
    otherwise the CPUs of the largest node less one. An actor holding every CPU of its node
    leaves none there for the decode tasks that feed it: if the other nodes go (preempted,
    scaled down), the pipeline would wait forever for a CPU."""
    import ray

    if use_gpu == "true" or (use_gpu == "auto" and ray.cluster_resources().get("GPU", 0) >= 1):
        return 1, 1.0
    total = int(ray.cluster_resources().get("CPU", 1))
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
    return 0, float(max(1, min(int(largest) - 1, total - 1)))


def predict_dataset(ds, checkpoint: str, cfg: Config, keep: list[str], batch_size: int = 64) -> dict[str, np.ndarray]:
    """Score a (small) dataset of image rows and gather the results on the driver.

    -> {"p_main": (N, M), "p_leaf": (N, L), "pred_main", "pred_leaf", *keep columns}.
    For evaluation sets; archive scoring streams instead of gathering.
    """
    from ray.data import ActorPoolStrategy

    gpus, cpus = scorer_resources(cfg.score.use_gpu)
    scored = ds.map_batches(
        Scorer,
        fn_constructor_kwargs={"checkpoint": checkpoint, "storage_cfg": cfg.to_dict()["storage"],
                               "threads": 0 if gpus else int(cpus), "batch_size": batch_size},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=1),
        num_gpus=gpus,
        num_cpus=cpus,
    )
    parts = {k: [] for k in [P_MAIN, P_LEAF, PRED_MAIN, PRED_LEAF, *keep]}
    failure = None
    try:
        for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
            for k in parts:
                parts[k].append(batch[k])
    except BaseException as exc:
        failure = exc
    if failure is not None:  # as in score_archive: free the Scorer's CPUs or GPU now
        del ds, scored
        release_failed_pipeline(failure)
        raise failure
    return {k: (np.concatenate(v) if v else np.zeros((0,))) for k, v in parts.items()}


# -- report rows ---------------------------------------------------------------------------


def to_report(batch: dict[str, np.ndarray], taxonomy: dict[str, Any], model_id: str, model_version: str, run_id: str,
              sr: dict[str, Any] | None = None) -> pa.Table:
    """Scored rows (decode columns + predictions) -> report rows with :func:`report_schema`.

    ``sr`` (``--sr``): {"archive", "output", "storage"}: also write a DICOM SR per ok row.
    """
    tax = Taxonomy.from_dict(**taxonomy)
    n = len(batch[C.PATH])
    ok = batch[C.STATUS] == C.STATUS_OK
    pred_main, pred_leaf = batch[PRED_MAIN].astype(np.int64), batch[PRED_LEAF].astype(np.int64)
    p_main, p_leaf = batch[P_MAIN], batch[P_LEAF]
    rows = np.arange(n)
    safe_main, safe_leaf = np.where(ok, pred_main, 0), np.where(ok, pred_leaf, 0)
    main_prob = np.where(ok, p_main[rows, safe_main], np.nan)
    leaf_prob = np.where(ok, p_leaf[rows, safe_leaf], np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        sub_prob = leaf_prob / main_prob  # P(sub | main) = P(leaf) / P(main)
    names = np.array(tax.leaf_names, dtype=object)
    mains = np.array(tax.mains, dtype=object)
    subs = np.array([s for _, s in tax.leaves], dtype=object)
    # the model actor's stamp (the report stage runs behind it by a varying lag); now for
    # batches that did not pass a Scorer
    stamps = batch[SCORED_MS].astype(np.int64) if SCORED_MS in batch else np.full(n, int(time.time() * 1000), np.int64)

    def strings(values, mask=None):
        arr = pa.array([str(v) for v in values], pa.string())
        return arr if mask is None else pc.if_else(pa.array(mask), arr, pa.nulls(n, pa.string()))

    def floats(values):
        return pa.array(np.asarray(values, np.float32), pa.float32(), from_pandas=True)  # NaN -> null

    columns = {
        C.PATH: strings(batch[C.PATH]),
        C.SIZE: pa.array(batch[C.SIZE].astype(np.int64)),
        C.ETAG: strings(batch[C.ETAG]),
        C.MTIME: mtime_column(batch[C.MTIME]),
        C.SOP_INSTANCE_UID: strings(batch[C.SOP_INSTANCE_UID]),
        C.STUDY_INSTANCE_UID: strings(batch[C.STUDY_INSTANCE_UID]),
        C.SERIES_INSTANCE_UID: strings(batch[C.SERIES_INSTANCE_UID]),
        C.FRAME: pa.array(batch[C.FRAME].astype(np.int32)),
        C.MODALITY: strings(batch[C.MODALITY]),
        C.BODY_PART: strings(batch[C.BODY_PART]),
        C.PATIENT_KEY: strings(batch[C.PATIENT_KEY]),
        C.STATUS: strings(batch[C.STATUS]),
        ERROR_REASON: strings(batch[C.REASON], ~ok),
        ERROR_MESSAGE: strings(batch[C.ERROR], ~ok),
        MAIN_LABEL: strings(mains[safe_main], ok),
        MAIN_PROB: floats(main_prob),
        SUB_LABEL: strings(subs[safe_leaf], ok),
        SUB_PROB: floats(sub_prob),
        LEAF_LABEL: strings(names[safe_leaf], ok),
        LEAF_PROB: floats(leaf_prob),
        **{leaf_column(name): floats(p_leaf[:, i]) for i, name in enumerate(tax.leaf_names)},
        EXPLAIN_PATH: pa.array(batch.get(EXPLAIN_PATH, [None] * n), pa.string()),
        **{k: floats(batch.get(k, np.full(n, np.nan))) for k in EXPLAIN_LOCATION},
        SR_PATH: pa.array(_write_srs(batch, ok, tax, model_id, model_version, run_id, sr) if sr else [None] * n, pa.string()),
        MODEL_ID: pa.array([model_id] * n, pa.string()),
        MODEL_VERSION: pa.array([model_version] * n, pa.string()),
        RUN_ID: pa.array([run_id] * n, pa.string()),
        SCORED_AT: pa.array(stamps.astype("datetime64[ms]"), pa.timestamp("ms", tz="UTC")),
    }
    return pa.table(columns, schema=report_schema(tax))


def _write_srs(batch, ok, tax: Taxonomy, model_id: str, model_version: str, run_id: str, sr: dict[str, Any]) -> list[str | None]:
    """One DICOM SR per ok row, next to the report: -> each row's SR path relative to OUTPUT.

    The SR needs its source's header (patient and study identity for the PACS), so the source is
    read again here; that costs one more GET per image and only with --sr. A source an SR cannot
    be made for (e.g. without a SeriesInstanceUID) keeps a null sr_path and a warning: the
    report row stands either way.
    """
    from medhier.io.sr import make_sr, sr_filename

    scfg = StorageConfig(**sr["storage"])
    paths: list[str | None] = [None] * len(ok)
    sources: dict[str, bytes] = {}
    for i in np.flatnonzero(ok):
        rel = str(batch[C.PATH][i])
        try:
            if rel not in sources:
                sources = {rel: storage.read_bytes(storage.join(sr["archive"], rel), scfg)}  # frames of one object are adjacent
            main, leaf = int(batch[PRED_MAIN][i]), int(batch[PRED_LEAF][i])
            p_main, p_leaf = float(batch[P_MAIN][i][main]), float(batch[P_LEAF][i][leaf])
            multi = int(batch[C.NUM_FRAMES][i]) > 1
            frame = int(batch[C.FRAME][i])
            result = {"main_label": tax.mains[main], "main_prob": p_main, "sub_label": tax.leaves[leaf][1],
                      "sub_prob": min(1.0, p_leaf / p_main) if p_main > 0 else 0.0, "leaf_prob": p_leaf,
                      **({"frame": frame} if multi else {})}
            data = make_sr(sources[rel], result, taxonomy=tax, model_id=model_id, model_version=model_version)
            name = sr_filename(str(batch[C.SOP_INSTANCE_UID][i]), model_id, frame if multi else None)
            relative = f"sr/run_id={run_id}/{name}"
            storage.write_bytes(storage.join(sr["output"], relative), data, scfg)
            paths[i] = relative
        except Exception as exc:  # the report row matters more than its SR
            log.warning("no SR for %s: %s", rel, exc)
    return paths


def mtime_column(seconds: np.ndarray) -> pa.Array:
    """Listing mtimes (float seconds) -> the report's UTC millisecond timestamps. The ledger
    compares object versions through this one conversion, so it must stay the only one."""
    ms = (np.asarray(seconds, dtype=np.float64) * 1000).astype(np.int64)
    return pa.array(ms.astype("datetime64[ms]"), pa.timestamp("ms", tz="UTC"))


# -- the job -------------------------------------------------------------------------------


@dataclass
class ScoreSummary:
    """What a run did: written as summary.json and printed as a table."""

    run_id: str
    archive: str
    output: str
    model_id: str
    model_version: str
    listed: int = 0
    already_scored: int = 0
    files: int = 0  # objects scored in this run
    rows: int = 0
    images_ok: int = 0
    error_files: int = 0
    leaves: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    excluded: int = 0
    recovered_runs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    images_per_s: float = 0.0
    compiled: bool = False
    precision: str = ""  # what the model ran in: int8, bf16, fp16 or fp32
    int8: dict[str, Any] = field(default_factory=dict)  # int8's comparison with fp32 (medhier/int8.py)

    @property
    def error_rate(self) -> float:
        return self.error_files / self.files if self.files else 0.0

    def table(self) -> str:
        lines = [
            f"run              {self.run_id}  (model {self.model_id}, {self.model_version})",
            f"archive          {self.archive}",
            f"listed           {self.listed:,} objects ({self.excluded:,} excluded by data.exclude)",
            f"already scored   {self.already_scored:,}",
            f"scored now       {self.files:,} files -> {self.rows:,} rows ({self.images_ok:,} images, {self.error_files:,} error files, error rate {self.error_rate:.1%})",
        ]
        lines += [f"  {leaf:<22}{n:,}" for leaf, n in self.leaves.items()]
        if self.errors:
            lines.append("errors by reason")
            lines += [f"  {reason:<22}{n:,}" for reason, n in sorted(self.errors.items())]
        if self.recovered_runs:
            lines.append(f"recovered        ledger of interrupted commit(s): {', '.join(self.recovered_runs)}")
        if self.precision:
            lines.append(f"precision        {self.precision}{', compiled' if self.compiled else ''}")
        if self.int8.get("images"):
            lines.append(f"int8 vs fp32     same leaf on {self.int8['leaf_agreement']:.1%} of {self.int8['images']} check images "
                         f"(largest probability difference {self.int8['max_abs_diff']:.3f}; "
                         f"{self.int8['calibration_images']} calibration images)")
        elif self.int8:
            lines.append(f"int8 vs fp32     not compared (score.int8_check_images=0; {self.int8['calibration_images']} calibration images)")
        lines.append(f"wall time        {self.seconds:,.1f} s  ({self.images_per_s:,.1f} images/s{', compiled' if self.compiled else ''})")
        lines.append(f"report           {storage.join(self.output, 'report')}")
        return "\n".join(lines)


def score_archive(cfg: Config, archive: str, checkpoint: str, output: str, full: bool = False, explain: bool = False, sr: bool = False) -> ScoreSummary:
    """Score the new or changed objects of ``archive`` (all of them with ``full``) into ``output``.

    ``explain``: Grad-CAM overlays for the rows ``score.explain_*`` select (PNG under
    ``OUTPUT/explain/run_id=<run>/``); ``sr``: a DICOM SR per image under ``OUTPUT/sr/run_id=<run>/``.
    Needs Ray initialised. Raises on failure; report rows become visible only if the run commits.
    """
    from ray.data import ActorPoolStrategy

    from medhier.train.checkpoint import config_for_checkpoint, load_checkpoint
    from medhier.data.cache import build_ingest, decode_settings, write_manifest

    start = time.perf_counter()
    archive, output, scfg = storage.normalize(archive), storage.normalize(output), cfg.storage
    loaded = load_checkpoint(checkpoint, scfg)
    run_cfg = config_for_checkpoint(cfg, loaded.cfg)
    version = cfg.score.model_version or f"epoch-{loaded.epoch}"
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    run_dir = storage.join(output, "runs", run_id)
    summary = ScoreSummary(run_id, archive, output, loaded.model_id, version)
    summary.recovered_runs = _recover_ledgers(output, scfg)
    storage.write_text(storage.join(run_dir, "config.yaml"), run_cfg.to_yaml(), scfg)

    listing = write_manifest(archive, storage.join(run_dir, "manifest"), run_cfg.data, scfg)
    summary.listed, summary.excluded = listing.objects, listing.excluded
    todo_uri = storage.join(run_dir, "todo")
    todo, already = _todo(storage.join(run_dir, "manifest"), todo_uri, output, loaded.model_id, version, full, run_cfg)
    summary.files, summary.already_scored = todo, already
    if todo:
        gpus, cpus = scorer_resources(cfg.score.use_gpu)
        compiled = cfg.score.compile == "true" or (cfg.score.compile == "auto" and todo / max(1, _actors(cfg, gpus)) >= cfg.score.compile_min_images)
        settings = decode_settings(run_cfg, archive, None)
        precision, int8 = cfg.score.precision, None
        if precision == "int8":
            if gpus:
                raise ValueError("score.precision=int8 is a CPU path, but the cluster has GPUs and score.use_gpu=auto "
                                 "would score there: set score.use_gpu=false to score on CPUs, or use bf16 or fp16")
            images = _int8_images(todo_uri, settings, cfg)
            if len(images["calibration"]):
                # Through storage, not the actor's arguments: megabytes of constructor arguments
                # would sit in the object store, which a restarted actor cannot count on.
                buffer = io.BytesIO()
                np.savez(buffer, **images)
                int8 = {"images": storage.join(run_dir, "int8", "images.npz"), "report": storage.join(run_dir, "int8"),
                        "min_agreement": cfg.score.int8_min_agreement}
                storage.write_bytes(int8["images"], buffer.getvalue(), scfg)
                compiled = True
            else:
                log.warning("score.precision=int8: none of the sampled objects decoded to an image to calibrate on; scoring with precision auto")
                precision, int8 = "auto", None
        summary.compiled, summary.precision = compiled, _resolved_precision(precision, gpus)
        decoded = build_ingest(todo_uri, settings, run_cfg.data)
        scored = decoded.map_batches(
            Scorer,
            fn_constructor_kwargs={
                "checkpoint": checkpoint, "storage_cfg": run_cfg.to_dict()["storage"], "precision": precision, "int8": int8,
                "threads": 0 if gpus else int(cpus), "compile": compiled, "batch_size": cfg.score.batch_size,
                "fail_after": int(os.environ.get(FAIL_AFTER_ENV, "0") or 0),
                "explain": {"output": output, "run_id": run_id, "storage": run_cfg.to_dict()["storage"],
                            "min_prob": cfg.score.explain_min_prob, "skip_mains": list(cfg.score.explain_skip_mains)} if explain else None,
            },
            batch_size=max(cfg.score.batch_size, run_cfg.data.decode_batch_size),
            batch_format="numpy",
            compute=ActorPoolStrategy(size=_actors(cfg, gpus)),
            num_gpus=gpus,
            num_cpus=cpus,
        )
        report = scored.map_batches(
            to_report,
            fn_kwargs={"taxonomy": loaded.taxonomy.to_dict(), "model_id": loaded.model_id, "model_version": version, "run_id": run_id,
                       "sr": {"archive": archive, "output": output, "storage": run_cfg.to_dict()["storage"]} if sr else None},
            batch_size=None,
            batch_format="numpy",
            zero_copy_batch=True,
        )
        fs, staging = storage.filesystem(storage.join(run_dir, "staging"), scfg)
        score_start = time.perf_counter()
        failure = None
        try:
            report.write_parquet(staging, filesystem=fs, compression="zstd")
        except BaseException as exc:
            failure = exc
        if failure is not None:
            del decoded, scored, report
            release_failed_pipeline(failure)
            raise failure
        scoring_seconds = time.perf_counter() - score_start
        if int8:
            summary.int8 = _int8_checks(int8["report"], scfg)
        _commit(output, run_dir, run_id, loaded.taxonomy, scfg, summary, replace_model=(loaded.model_id, version) if full else None)
        summary.images_per_s = summary.images_ok / max(scoring_seconds, 1e-9)
        write_studies(output, loaded.taxonomy, loaded.model_id, version, scfg)
    summary.seconds = time.perf_counter() - start
    text = json.dumps(asdict(summary), indent=2)
    storage.write_text(storage.join(run_dir, "summary.json"), text, scfg)
    storage.write_text(storage.join(output, "summary.json"), text, scfg)
    storage.write_text(storage.join(run_dir, "_COMMITTED"), run_id, scfg)
    return summary


def _resolved_precision(precision: str, gpus: int) -> str:
    """What a ``score.precision`` setting runs as: int8, bf16, fp16 or fp32."""
    from medhier.classify.model import autocast_dtype

    if precision == "int8":
        return precision
    dtype = autocast_dtype(precision, torch.device("cuda" if gpus else "cpu"))
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def _int8_images(todo: str, settings, cfg: Config) -> dict[str, np.ndarray]:
    """Images to calibrate int8 scoring on, and others to check it against fp32: objects spread
    evenly over the todo list (not the first folder's), decoded as the pipeline decodes them.
    -> {"calibration": (N, S, S) uint8, "check": (K, S, S) uint8}; both empty when no sampled
    object decodes."""
    from medhier.data.cache import decode_batch

    want = cfg.score.int8_calibration_images + cfg.score.int8_check_images
    fs, path = storage.filesystem(todo, cfg.storage)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    total = dataset.count_rows()  # from the Parquet footers: the driver never holds the whole todo list
    # twice as many objects as images wanted: some will be error files
    rows = dataset.take(np.unique(np.linspace(0, total - 1, min(total, 2 * want)).round().astype(np.int64)))
    decoded = decode_batch({c: rows.column(c).to_numpy(zero_copy_only=False) for c in rows.column_names}, settings)
    blobs = [b for b in decoded[C.IMAGE] if len(b)][:want]
    size = settings.image_size
    images = np.frombuffer(b"".join(blobs), np.uint8).reshape(-1, size, size)
    checks = min(cfg.score.int8_check_images, len(images) // 3)  # at least 2/3 calibrate when the sample is short
    is_check = np.zeros(len(images), bool)
    if checks:
        is_check[np.unique(np.linspace(0, len(images) - 1, checks).round().astype(np.int64))] = True
    return {"calibration": images[~is_check][: cfg.score.int8_calibration_images], "check": images[is_check]}


def _int8_checks(folder: str, scfg: StorageConfig) -> dict[str, Any]:
    """The int8 actors' comparisons with fp32 (one JSON each) -> the summary's ``int8`` entry:
    the least agreement over the actors (they calibrate on the same images, so they agree)."""
    checks = [json.loads(storage.read_bytes(storage.join(folder, o.path), scfg))
              for page in storage.list_objects(folder, scfg) for o in page if o.path.endswith(".json")]
    if not checks:
        return {}
    return {**min(checks, key=lambda c: c["leaf_agreement"] if c["images"] else 2.0), "actors": len(checks)}


def _actors(cfg: Config, gpus: int) -> int:
    import ray

    if cfg.score.actors:
        return cfg.score.actors
    return max(1, int(ray.cluster_resources().get("GPU", 0))) if gpus else 1


def _ledger_table(output: str, scfg: StorageConfig) -> pa.Table | None:
    fs, path = storage.filesystem(storage.join(output, "ledger"), scfg)
    if fs.get_file_info(path).type == storage.pafs.FileType.NotFound:
        return None
    return pads.dataset(path, filesystem=fs, format="parquet").to_table()


def _todo(manifest: str, todo: str, output: str, model_id: str, version: str, full: bool, cfg: Config) -> tuple[int, int]:
    """Write the objects still to score (not in the ledger for this model, or changed since)
    as a manifest -> (to score, already scored). ``full`` keeps everything."""
    fs, path = storage.filesystem(manifest, cfg.storage)
    listed = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    ledger = None if full else _ledger_table(output, cfg.storage)
    if ledger is not None and ledger.num_rows:
        mine = ledger.filter(pc.and_(pc.equal(ledger[MODEL_ID], model_id), pc.equal(ledger[MODEL_VERSION], version)))
        done = mine.select(list(VERSION_KEY)).group_by(list(VERSION_KEY)).aggregate([])
        keyed = listed.append_column("_mtime_ms", mtime_column(listed[C.MTIME].to_numpy()))
        done = done.rename_columns([*VERSION_KEY[:-1], "_mtime_ms"])
        keys = [*VERSION_KEY[:-1], "_mtime_ms"]
        remaining = keyed.join(done, keys=keys, join_type="left anti").drop_columns(["_mtime_ms"]).select(listed.column_names)
    else:
        remaining = listed
    storage.delete(todo, cfg.storage)
    storage.makedirs(todo, cfg.storage)
    tfs, tpath = storage.filesystem(todo, cfg.storage)
    if remaining.num_rows:
        with tfs.open_output_stream(f"{tpath}/part-00000.parquet") as f:
            pq.write_table(remaining, f, row_group_size=cfg.data.decode_batch_size)
    return remaining.num_rows, listed.num_rows - remaining.num_rows


def _commit(output: str, run_dir: str, run_id: str, taxonomy: Taxonomy, scfg: StorageConfig, summary: ScoreSummary, replace_model=None) -> None:
    """Make the run visible: the report file (atomic), then the ledger (rebuildable from it)."""
    fs, staging = storage.filesystem(storage.join(run_dir, "staging"), scfg)
    staged = pads.dataset(staging, filesystem=fs, format="parquet", schema=report_schema(taxonomy))
    report_uri = storage.join(output, "report", f"run_id={run_id}", "part-0.parquet")
    rfs, rpath = storage.filesystem(report_uri, scfg)
    local_tmp = None
    if storage.is_s3(report_uri):
        sink = rfs.open_output_stream(rpath)  # a multipart upload: visible only once complete
    else:
        os.makedirs(os.path.dirname(rpath), exist_ok=True)
        local_tmp = f"{rpath}.tmp-{uuid.uuid4().hex}"
        sink = open(local_tmp, "wb")
    leaves: Counter = Counter()
    errors: Counter = Counter()
    ledger_parts = []
    with sink, pq.ParquetWriter(sink, report_schema(taxonomy), compression="zstd") as writer:
        for batch in staged.to_batches():  # streamed: memory holds one batch, not the run
            table = pa.Table.from_batches([batch], schema=report_schema(taxonomy))
            writer.write_table(table)
            summary.rows += table.num_rows
            status = table[C.STATUS].to_pylist()
            leaves.update(v for v, s in zip(table[LEAF_LABEL].to_pylist(), status) if s == C.STATUS_OK)
            errors.update(v for v, s in zip(table[ERROR_REASON].to_pylist(), status) if s == C.STATUS_ERROR)
            ledger_parts.append(_ledger_rows(table))
    if local_tmp:
        os.replace(local_tmp, rpath)
    summary.images_ok = sum(leaves.values())
    summary.leaves = {name: leaves.get(name, 0) for name in taxonomy.leaf_names}
    summary.errors = dict(errors)
    ledger = pa.concat_tables(ledger_parts) if ledger_parts else None
    if ledger is not None:
        summary.error_files = len(set(ledger.filter(pc.equal(ledger[C.STATUS], C.STATUS_ERROR))[C.PATH].to_pylist()))
        _write_ledger(output, run_id, ledger, scfg)
    if replace_model:
        _drop_older_runs(output, run_id, *replace_model, scfg)


def _ledger_rows(report: pa.Table) -> pa.Table:
    """One ledger row per scored object version (frames collapse into one)."""
    keep = report.select([*VERSION_KEY, C.STATUS, MODEL_ID, MODEL_VERSION, RUN_ID, SCORED_AT])
    # an object is an error when any of its rows is (a decode rejection has exactly one row)
    return keep.group_by([*VERSION_KEY, MODEL_ID, MODEL_VERSION, RUN_ID]).aggregate(
        [(C.STATUS, "min"), (SCORED_AT, "max")]).rename_columns([*VERSION_KEY, MODEL_ID, MODEL_VERSION, RUN_ID, C.STATUS, SCORED_AT])


def _write_ledger(output: str, run_id: str, ledger: pa.Table, scfg: StorageConfig) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(ledger, sink, compression="zstd")
    storage.write_bytes(storage.join(output, "ledger", f"run_id={run_id}.parquet"), sink.getvalue().to_pybytes(), scfg)


def _report_runs(output: str, scfg: StorageConfig) -> list[str]:
    fs, path = storage.filesystem(storage.join(output, "report"), scfg)
    if fs.get_file_info(path).type == storage.pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(storage.pafs.FileSelector(path))
    return sorted(i.base_name[len("run_id="):] for i in infos if i.base_name.startswith("run_id=") and i.type == storage.pafs.FileType.Directory)


def _recover_ledgers(output: str, scfg: StorageConfig) -> list[str]:
    """Roll forward commits interrupted between the report and the ledger: rebuild the ledger
    of every visible report partition that has none. -> the recovered run ids."""
    recovered = []
    for run_id in _report_runs(output, scfg):
        if storage.exists(storage.join(output, "ledger", f"run_id={run_id}.parquet"), scfg):
            continue
        fs, path = storage.filesystem(storage.join(output, "report", f"run_id={run_id}"), scfg)
        table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=[*VERSION_KEY, C.STATUS, MODEL_ID, MODEL_VERSION, RUN_ID, SCORED_AT])
        _write_ledger(output, run_id, _ledger_rows(table), scfg)
        recovered.append(run_id)
    return recovered


def _drop_older_runs(output: str, keep_run: str, model_id: str, version: str, scfg: StorageConfig) -> None:
    """After a --full run commits, earlier runs of the same model and version are superseded:
    remove them, so that no object version has two rows for one model."""
    ledger = _ledger_table(output, scfg)
    if ledger is None:
        return
    mine = ledger.filter(pc.and_(pc.equal(ledger[MODEL_ID], model_id), pc.equal(ledger[MODEL_VERSION], version)))
    for run_id in sorted(set(mine[RUN_ID].to_pylist()) - {keep_run}):
        storage.delete(storage.join(output, "report", f"run_id={run_id}"), scfg)
        storage.delete(storage.join(output, "ledger", f"run_id={run_id}.parquet"), scfg)


def report_table(output: str, scfg: StorageConfig | None = None, columns: list[str] | None = None) -> pa.Table:
    """All committed report rows (every run), e.g. for tests and small analyses."""
    fs, path = storage.filesystem(storage.join(storage.normalize(output), "report"), scfg)
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table(columns=columns)


def write_studies(output: str, taxonomy: Taxonomy, model_id: str, version: str, scfg: StorageConfig) -> str:
    """One row per study for a model: the most severe predicted leaf over its images (severity
    order from the taxonomy), that leaf's highest probability, and image counts per leaf.

    Vectorised in Arrow (group-bys and a join), so archives of millions of rows roll up in seconds.
    """
    cols = [C.STUDY_INSTANCE_UID, C.PATIENT_KEY, C.STATUS, LEAF_LABEL, LEAF_PROB, MODEL_ID, MODEL_VERSION]
    table = report_table(output, scfg, columns=cols)
    keep = pc.and_(pc.and_(pc.equal(table[MODEL_ID], model_id), pc.equal(table[MODEL_VERSION], version)),
                   pc.equal(table[C.STATUS], C.STATUS_OK))
    table = table.filter(keep).select([C.STUDY_INSTANCE_UID, C.PATIENT_KEY, LEAF_LABEL, LEAF_PROB])
    names = list(taxonomy.leaf_names)
    ranks = pa.array(taxonomy.severity_rank, pa.int64())
    table = table.append_column("rank", pc.take(ranks, pc.index_in(table[LEAF_LABEL], value_set=pa.array(names))))
    study = C.STUDY_INSTANCE_UID
    per_study = table.group_by(study).aggregate([("rank", "max"), (C.PATIENT_KEY, "min"), (LEAF_LABEL, "count")])
    per_study = per_study.rename_columns([study, "worst_rank", C.PATIENT_KEY, "n_images"])
    worst = table.join(per_study.select([study, "worst_rank"]), keys=study)
    worst = worst.filter(pc.equal(worst["rank"], worst["worst_rank"]))
    worst = worst.group_by([study, LEAF_LABEL]).aggregate([(LEAF_PROB, "max")]).rename_columns([study, "most_severe_leaf", "most_severe_prob"])
    counts = table.group_by([study, LEAF_LABEL]).aggregate([(LEAF_PROB, "count")]).rename_columns([study, LEAF_LABEL, "n"])
    out = per_study.join(worst, keys=study).sort_by(study)
    leaf = out["most_severe_leaf"].to_pylist()
    columns = {
        study: out[study],
        C.PATIENT_KEY: out[C.PATIENT_KEY],
        "n_images": out["n_images"],
        "most_severe_leaf": out["most_severe_leaf"],
        "most_severe_main": pa.array([v.split("/")[0] for v in leaf], pa.string()),
        "most_severe_sub": pa.array([v.split("/")[1] for v in leaf], pa.string()),
        "most_severe_prob": pc.cast(out["most_severe_prob"], pa.float32()),
    }
    order = {uid: i for i, uid in enumerate(out[study].to_pylist())}
    for name in names:
        n = np.zeros(out.num_rows, np.int64)
        mine = counts.filter(pc.equal(counts[LEAF_LABEL], name))
        for uid, c in zip(mine[study].to_pylist(), mine["n"].to_pylist()):
            n[order[uid]] = c
        columns["n_" + name.replace("/", "__")] = pa.array(n)
    columns[MODEL_ID] = pa.array([model_id] * out.num_rows, pa.string())
    columns[MODEL_VERSION] = pa.array([version] * out.num_rows, pa.string())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink, compression="zstd")
    uri = storage.join(output, "studies", f"{model_id}__{version}.parquet")
    storage.write_bytes(uri, sink.getvalue().to_pybytes(), scfg)
    return uri
