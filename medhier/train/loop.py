"""Distributed training with Ray Train (PyTorch DDP): ``fit(cfg, archive, output)``.

The driver makes (or reuses) the preprocessed cache, shards its training split over the
workers with Ray Data, and runs :func:`train_loop_per_worker` on each worker. Every epoch, rank 0
validates, writes a self-describing checkpoint that Ray Train persists (and that a restarted
worker group or a re-run with the same output resumes from), and copies it to ``OUTPUT/best``
when the validation metric improved. At the end the best model is evaluated on the held-out
test split: ``metrics.json``, plots and a summary table.

Output layout::

    OUTPUT/cache/         preprocessed cache (unless data.cache points elsewhere)
    OUTPUT/train/         Ray Train run: per-epoch checkpoints, run snapshot (for resuming)
    OUTPUT/best/          best checkpoint (model.pt, meta.json): ready for `medhier score`
    OUTPUT/history.json   per-epoch training and validation metrics
    OUTPUT/metrics.json   evaluation of the best model on the test split
    OUTPUT/plots/         confusion matrices and ROC curves (PNG)
    OUTPUT/config.yaml    the resolved config
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from medhier import columns as C
from medhier.io import storage
from medhier.train.checkpoint import load_checkpoint, save_checkpoint, unwrap
from medhier.config import MINIMISED_METRICS, Config, TrainConfig
from medhier.runtime import verbose
from medhier.classify.taxonomy import Taxonomy

__all__ = ["FitResult", "evaluate_archive", "evaluate_checkpoint", "fit", "rank_zero", "train_loop_per_worker", "train_on_cache"]

log = logging.getLogger(__name__)

FAIL_AT_ENV = "MEDHIER_FAIL_AT"  # "epoch:step:rank": inject one worker failure (fault-tolerance tests)


def rank_zero() -> bool:
    """True on the worker that does the run's single-copy work (checkpoints, files, logs)."""
    import ray.train

    return ray.train.get_context().get_world_rank() == 0


# -- driver --------------------------------------------------------------------------------


@dataclass
class FitResult:
    output: str
    best_checkpoint: str
    best_epoch: int
    best_metric: float | None
    epochs_run: int
    resumed_at: list[int]
    test_metrics: dict[str, Any]
    seconds: float
    prepare_table: str = ""

    def table(self) -> str:
        from medhier.classify.metrics import summary_table

        head = ([self.prepare_table, ""] if self.prepare_table else []) + [
            f"output           {self.output}",
            f"best checkpoint  {self.best_checkpoint}  (epoch {self.best_epoch}, validation metric {self.best_metric})",
            f"epochs run       {self.epochs_run}" + (f"  (resumed at epoch {', '.join(map(str, self.resumed_at))})" if self.resumed_at else ""),
            f"wall time        {self.seconds:,.1f} s",
        ]
        return "\n".join(head) + ("\n" + summary_table(self.test_metrics) if self.test_metrics else "")


def fit(cfg: Config, archive: str, output: str, labels: str = "") -> FitResult:
    """Train on ``archive`` (made into a cache when needed), writing everything under ``output``.

    Re-running with the same output resumes from the last checkpoint. Needs Ray initialised.
    """
    from medhier.data.cache import prepare

    start = time.perf_counter()
    output = storage.normalize(output)
    cache = cfg.data.cache or storage.join(output, "cache")
    prepared = prepare(cfg, archive, cache, labels)
    summary = train_on_cache(cfg, cache, output)
    best_uri = storage.join(output, "best")
    test_metrics = evaluate_checkpoint(best_uri, cache, cfg, output=output)
    return FitResult(
        output=output,
        best_checkpoint=best_uri,
        best_epoch=int(summary.get("best_epoch", -1)),
        best_metric=summary.get("best_metric"),
        epochs_run=int(summary.get("epochs_run", 0)),
        resumed_at=list(summary.get("resumed_at", [])),
        test_metrics=test_metrics,
        seconds=time.perf_counter() - start,
        prepare_table=prepared.table(),
    )


def train_on_cache(cfg: Config, cache: str, output: str, callbacks: tuple = ()) -> dict[str, Any]:
    """Run the TorchTrainer on a committed cache, writing checkpoints, best/ and history under
    ``output``. -> the run summary (best epoch and metric, epochs run, resume points).

    ``callbacks``: Ray Train callbacks (Tune's TuneReportCallback when a search runs this).
    """
    from ray.data import DataContext

    # Training reports per epoch; per-worker dataset progress bars would only interleave. The
    # datasets keep the context they were made with, so switch the bars off before making them.
    ctx = DataContext.get_current()
    progress, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    try:
        return _train_on_cache(cfg, cache, output, callbacks)
    finally:
        ctx.enable_progress_bars = progress


def _train_on_cache(cfg: Config, cache: str, output: str, callbacks: tuple) -> dict[str, Any]:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from medhier.data.cache import check_preprocess_matches, load_cache
    from medhier.classify.model import build_model

    info = _cache_info(cache, cfg)
    check_preprocess_matches(info, cfg.preprocess)
    split_leaves = info.counts.get("split_leaves", {})
    n_train = sum(split_leaves.get("train", {}).values())
    n_val = sum(split_leaves.get("val", {}).values())
    if n_train == 0:
        raise ValueError(
            f"no labelled training images in {info.archive!r} (cache {cache}): check the labels manifest "
            f"({info.labels or 'none found'}) and data.train_fraction"
        )
    if n_val == 0:
        raise ValueError(f"no labelled validation images in {info.archive!r}: raise data.val_fraction or add patients")
    columns = [C.IMAGE, C.MAIN_LABEL, C.LEAF_LABEL]
    # Splits under a quarter of the object store are held in memory for the whole run.
    small = int(ray.cluster_resources().get("object_store_memory", 0) * 0.25)
    train_ds, _ = load_cache(cache, cfg.storage, "train", columns=columns, in_memory_below=small)
    val_ds, _ = load_cache(cache, cfg.storage, "val", columns=columns, in_memory_below=small)

    # Build the model once here: a missing weights file or a download that cannot work fails now,
    # with its own message, instead of inside every worker.
    build_model(cfg.model, Taxonomy.from_config(cfg.taxonomy), cfg.storage)
    storage.write_text(storage.join(output, "config.yaml"), cfg.to_yaml(), cfg.storage)
    use_gpu = _use_gpu(cfg.train)
    fs, run_root = storage.filesystem(output, cfg.storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "output": output,
            "n_train": n_train,
            "split_leaves": split_leaves,
            "fail_at": os.environ.get(FAIL_AT_ENV, ""),
            "verbose": verbose(),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=run_root,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
            # medhier reports per epoch itself; Ray Train's INFO lines only when asked for
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=list(callbacks),
        ),
        datasets={"train": train_ds, "val": val_ds},
        # Validation is not split: rank 0 scores all of it, so every epoch's metric is exact.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    return trainer.fit().return_value or {}


def _cache_info(cache: str, cfg: Config):
    from medhier.data.cache import CacheInfo

    info = CacheInfo.read(cache, cfg.storage)
    if info is None:  # pragma: no cover - prepare() just committed it
        raise FileNotFoundError(f"cache {cache!r} missing after prepare")
    return info


def _use_gpu(train_cfg: TrainConfig) -> bool:
    import ray

    if train_cfg.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return train_cfg.use_gpu == "true"


def evaluate_checkpoint(checkpoint: str, cache: str, cfg: Config, output: str, split: str | None = "test") -> dict[str, Any]:
    """Score a cache split with a checkpoint and write metrics.json and plots under ``output``.

    Falls back to the validation split when the test split is empty; ``split=None`` uses every
    labelled row (``medhier evaluate`` on another archive). Returns the metrics ({} if no rows).
    """
    from medhier.data.cache import load_cache
    from medhier.classify.metrics import evaluate, write_plots
    from medhier.infer.batch import predict_dataset

    candidates = [split, "val"] if split == "test" else [split]
    for name in candidates:
        try:
            ds, _ = load_cache(cache, cfg.storage, name, columns=[C.IMAGE, C.MAIN_LABEL, C.LEAF_LABEL])
        except FileNotFoundError:
            continue
        pred = predict_dataset(ds, checkpoint, cfg, keep=[C.MAIN_LABEL, C.LEAF_LABEL])
        if len(pred["p_main"]) == 0:
            continue
        loaded = load_checkpoint(checkpoint, cfg.storage)
        tax = loaded.taxonomy
        metrics = evaluate(tax, pred[C.MAIN_LABEL], pred[C.LEAF_LABEL], pred["p_main"], pred["p_leaf"])
        metrics["split"] = name or "all"
        metrics["model_id"] = loaded.model_id
        storage.write_text(storage.join(output, "metrics.json"), json.dumps(metrics, indent=2), cfg.storage)
        with tempfile.TemporaryDirectory() as tmp:
            for path in write_plots(tax, pred[C.MAIN_LABEL], pred[C.LEAF_LABEL], pred["p_main"], pred["p_leaf"], out_dir=tmp):
                with open(path, "rb") as f:
                    storage.write_bytes(storage.join(output, "plots", os.path.basename(path)), f.read(), cfg.storage)
        return metrics
    return {}


def evaluate_archive(cfg: Config, checkpoint: str, archive: str, output: str, labels: str = "") -> dict[str, Any]:
    """``medhier evaluate``: score every labelled image of an archive with a checkpoint and write
    metrics.json and plots under ``output``. Preprocessing comes from the checkpoint."""
    from medhier.train.checkpoint import config_for_checkpoint
    from medhier.data.cache import prepare

    output = storage.normalize(output)
    run_cfg = config_for_checkpoint(cfg, load_checkpoint(checkpoint, cfg.storage).cfg)
    cache = run_cfg.data.cache or storage.join(output, "cache")
    summary = prepare(run_cfg, archive, cache, labels)
    if sum(sum(v.values()) for v in summary.counts.get("split_leaves", {}).values()) == 0:
        raise ValueError(f"no labelled images in {archive!r}: pass --labels (CSV/Parquet with path or sop_instance_uid, main, sub)")
    storage.write_text(storage.join(output, "config.yaml"), run_cfg.to_yaml(), cfg.storage)
    return evaluate_checkpoint(checkpoint, cache, run_cfg, output, split=None)


# -- workers -------------------------------------------------------------------------------


def _quiet_report_logs() -> None:
    """Ray Train's workers log every report (all its metrics) at INFO under a logger named by
    its file's path, outside the reach of LoggingConfig: silence it unless --verbose."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: its logs stay as they are
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One DDP worker: resume if a checkpoint exists, then train/validate/checkpoint per epoch."""
    import ray.train
    import ray.train.torch

    from medhier.classify.model import HierarchicalLoss, autocast_dtype, build_model
    from medhier.classify.presets import eval_preset, train_preset

    if not config.get("verbose"):
        _quiet_report_logs()
    cfg = Config.from_dict(config["cfg"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # One intra-op thread per reserved CPU: more would fight the other workers for cores.
        torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    torch.manual_seed(tc.seed + rank)
    taxonomy = Taxonomy.from_config(cfg.taxonomy)
    amp_dtype = autocast_dtype(tc.precision, device)

    model = build_model(cfg.model, taxonomy, cfg.storage)
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    state = _TrainState()
    saved = _newest_checkpoint(config["output"], cfg)
    if saved:
        unwrap(model).load_state_dict(saved["model_state"])
        state = _TrainState(**saved["training_state"]["state"])
        state.resumed_at.append(state.epoch)
        log.warning("resuming from the checkpoint of epoch %d", state.epoch - 1)
    model = ray.train.torch.prepare_model(model)

    optimizer = torch.optim.AdamW(unwrap(model).param_groups(tc.lr_backbone, tc.lr_head, tc.weight_decay))
    steps_per_epoch = max(1, math.ceil(config["n_train"] / (world * tc.batch_size)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(tc, steps_per_epoch))
    scaler = torch.amp.GradScaler(enabled=amp_dtype == torch.float16)
    if saved:
        optimizer.load_state_dict(saved["training_state"]["optimizer"])
        scheduler.load_state_dict(saved["training_state"]["scheduler"])
        scaler.load_state_dict(saved["training_state"]["scaler"])

    main_w, leaf_w = _class_weights(taxonomy, config["split_leaves"].get("train", {}), tc.class_weights)
    loss_fn = HierarchicalLoss(taxonomy, tc.sub_loss_weight, tc.label_smoothing, main_w, leaf_w, flat=cfg.model.head == "flat").to(device)
    augment, plain = train_preset(cfg.preprocess).to(device), eval_preset(cfg.preprocess).to(device)
    generator = torch.Generator(device=device).manual_seed(tc.seed * 1000 + rank + 7919 * state.epoch)
    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val")
    fail_at = _parse_fail_at(config.get("fail_at", ""))
    image_size = cfg.preprocess.image_size

    for epoch in range(state.epoch, tc.epochs):
        model.train()
        t0, seen, loss_sum, step = time.perf_counter(), 0, 0.0, 0
        for step, batch in enumerate(train_shard.iter_torch_batches(
            batch_size=tc.batch_size,
            collate_fn=_collate(image_size),
            local_shuffle_buffer_size=tc.shuffle_buffer or None,
            local_shuffle_seed=tc.seed + epoch * 131 + rank,
            prefetch_batches=tc.prefetch_batches,
        )):
            if fail_at and fail_at[:3] == (epoch, step, rank):
                _inject_failure(config["output"], cfg)
            images = augment(batch[C.IMAGE].to(device), generator).contiguous(memory_format=memory_format)
            main_label, leaf_label = batch[C.MAIN_LABEL].to(device), batch[C.LEAF_LABEL].to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(images)
            losses = loss_fn(out, main_label, leaf_label)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            seen += len(images)
            loss_sum += losses["loss"].item() * len(images)
        train_seconds = time.perf_counter() - t0

        val = _validate(model, val_data, plain, loss_fn, taxonomy, device, amp_dtype, memory_format, image_size, cfg) if rank == 0 else {}
        # Rank 0 decides; everyone follows, so no worker waits in a collective the others left.
        decision = [val]
        if world > 1:
            torch.distributed.broadcast_object_list(decision, src=0)
        val = decision[0]
        metric = val.get(tc.metric)
        improved = _improved(metric, state.best_metric, tc.metric)
        if improved:
            state.best_metric, state.best_epoch, state.bad_epochs = metric, epoch, 0
        else:
            state.bad_epochs += 1
        state.epoch = epoch + 1
        stop = bool(tc.early_stopping_patience) and state.bad_epochs >= tc.early_stopping_patience
        record = {
            "epoch": epoch,
            "train_loss": _mean_over_workers(loss_sum, seen, device),
            "train_images_per_s": seen / max(train_seconds, 1e-9) * world,
            **{k: v for k, v in val.items() if isinstance(v, (int, float)) or v is None},
            "best_epoch": state.best_epoch,
            "improved": improved,
            "early_stop": stop,
        }
        state.history.append(record)
        _report(model, optimizer, scheduler, scaler, state, cfg, taxonomy, record, val.get("metrics", {}), improved, config["output"])
        if stop:
            break
    return {"best_epoch": state.best_epoch, "best_metric": state.best_metric, "epochs_run": state.epoch, "resumed_at": state.resumed_at}


_CHECKPOINT_DIR = re.compile(r"^checkpoint_epoch(\d{4,})$")


def _newest_checkpoint(output: str, cfg: Config) -> dict[str, Any]:
    """The newest complete checkpoint of this run, or {} for a fresh start.

    Ray Train's own ``get_checkpoint()`` is the last checkpoint its controller *registered*; a
    worker that dies right after an epoch's report can beat the registration, and resuming from
    it would run that epoch again. Every checkpoint directory here is written in full before
    ``report`` returns and carries a hash of its weights, so the newest one that loads and
    verifies is the true resume point.
    """
    from medhier.train.checkpoint import CHECKPOINT_FILE, model_id_of

    root = storage.join(output, "train")
    fs, path = storage.filesystem(root, cfg.storage)
    try:
        entries = fs.get_file_info(storage.pafs.FileSelector(path))
    except FileNotFoundError:
        return {}
    names = sorted((e.base_name for e in entries if _CHECKPOINT_DIR.match(e.base_name)), reverse=True)
    for name in names:
        try:
            raw = storage.read_bytes(storage.join(root, name, CHECKPOINT_FILE), cfg.storage)
            data = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as exc:  # a checkpoint cut short by the failure: try the one before
            log.warning("skipping unreadable checkpoint %s: %s", name, exc)
            continue
        if model_id_of(data["model_state"]) == data.get("model_id") and data.get("training_state"):
            return data
        log.warning("skipping checkpoint %s: its weights do not match their hash", name)
    return {}


@dataclass
class _TrainState:
    """What a resumed run needs besides weights and optimizer: where it was and how it fared."""

    epoch: int = 0  # next epoch to run
    best_metric: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list | None = None
    resumed_at: list | None = None  # epochs a restarted worker group or re-run resumed at

    def __post_init__(self):
        self.history = self.history or []
        self.resumed_at = self.resumed_at or []


def _collate(image_size: int):
    """Ray Data numpy batch -> torch tensors; images arrive as raw uint8 bytes per row."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            # b"".join copies into fresh, writable memory: torch may own it as it is
            images = bytearray(b"".join(batch[C.IMAGE]))
            return {
                C.IMAGE: torch.frombuffer(images, dtype=torch.uint8).view(-1, image_size, image_size),
                C.MAIN_LABEL: torch.tensor(batch[C.MAIN_LABEL], dtype=torch.long),
                C.LEAF_LABEL: torch.tensor(batch[C.LEAF_LABEL], dtype=torch.long),
            }

    return Collate()


def _warmup_cosine(tc: TrainConfig, steps_per_epoch: int):
    warmup = max(1, int(tc.warmup_epochs * steps_per_epoch)) if tc.warmup_epochs else 0
    total = max(warmup + 1, tc.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _class_weights(taxonomy: Taxonomy, train_leaves: dict[str, int], enabled: bool):
    if not enabled:
        return None, None
    from medhier.classify.metrics import balanced_class_weights, subclass_weights

    counts = np.array([int(train_leaves.get(name, 0)) for name in taxonomy.leaf_names])
    leaf_labels = np.repeat(np.arange(taxonomy.num_leaves), counts)
    main_labels = taxonomy.leaf_main[leaf_labels]
    return balanced_class_weights(main_labels, taxonomy.num_mains), subclass_weights(taxonomy, leaf_labels)


def _validate(model, val_data, plain, loss_fn, taxonomy, device, amp_dtype, memory_format, image_size, cfg) -> dict[str, Any]:
    """Rank 0: loss and metrics on the whole validation split (no collectives inside)."""
    from medhier.classify.metrics import evaluate

    net = unwrap(model)
    net.eval()
    p_main, p_leaf, mains, leaves, loss_sum, n = [], [], [], [], 0.0, 0
    with torch.inference_mode():
        for batch in val_data.iter_torch_batches(batch_size=cfg.train.batch_size * 2, collate_fn=_collate(image_size)):
            images = plain(batch[C.IMAGE].to(device)).contiguous(memory_format=memory_format)
            main_label, leaf_label = batch[C.MAIN_LABEL].to(device), batch[C.LEAF_LABEL].to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = net(images)
            loss_sum += loss_fn(out, main_label, leaf_label)["loss"].item() * len(images)
            n += len(images)
            p_main.append(out.log_p_main.exp().float().cpu().numpy())
            p_leaf.append(out.log_p_leaf.exp().float().cpu().numpy())
            mains.append(main_label.cpu().numpy())
            leaves.append(leaf_label.cpu().numpy())
    if n == 0:
        return {"val_loss": None}
    metrics = evaluate(taxonomy, np.concatenate(mains), np.concatenate(leaves), _renorm(np.concatenate(p_main)), _renorm(np.concatenate(p_leaf)))
    return {
        "val_loss": loss_sum / n,
        "main_accuracy": metrics["main"]["accuracy"],
        "leaf_accuracy": metrics["leaf"]["accuracy"],
        "main_macro_auc": metrics["main"]["macro"]["roc_auc"],
        "leaf_macro_auc": metrics["leaf"]["macro"]["roc_auc"],
        "path_accuracy": metrics["hierarchy"]["path_accuracy"],
        "consistency": metrics["hierarchy"]["consistency"],
        "metrics": metrics,
    }


def _renorm(p: np.ndarray) -> np.ndarray:
    # bf16/fp32 rounding leaves rows a hair off 1; metric code checks sums strictly-ish.
    p = np.clip(p.astype(np.float64), 0, None)
    return p / p.sum(1, keepdims=True)


def _improved(metric: float | None, best: float | None, name: str) -> bool:
    if metric is None or (isinstance(metric, float) and math.isnan(metric)):
        return best is None  # an undefined metric never beats a defined one
    if best is None:
        return True
    return metric < best if name in MINIMISED_METRICS else metric > best


def _mean_over_workers(total: float, count: int, device) -> float:
    t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return float(t[0] / max(t[1], 1.0))


def _report(model, optimizer, scheduler, scaler, state, cfg, taxonomy, record, val_metrics, improved, output) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank_zero():
            training_state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "state": asdict(state),
            }
            save_checkpoint(tmp, model, cfg, taxonomy, epoch=record["epoch"], metrics={"validation": val_metrics, **record}, training_state=training_state)
            if improved:
                _copy_best(tmp, output, cfg)
            storage.write_text(storage.join(output, "history.json"), json.dumps(state.history, indent=2, default=str), cfg.storage)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(
            # undefined metrics (an AUC without both classes) as NaN: Tune needs every key, always
            {k: float("nan") if v is None else v for k, v in record.items()},
            checkpoint=checkpoint,
            checkpoint_dir_name=f"checkpoint_epoch{record['epoch']:04d}",
        )


def _copy_best(local_dir: str, output: str, cfg: Config) -> None:
    # Only weights and metadata: the optimizer state is not needed to score.
    from medhier.train.checkpoint import CHECKPOINT_FILE, META_FILE

    data = torch.load(os.path.join(local_dir, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    data["training_state"] = {}
    buf = io.BytesIO()
    torch.save(data, buf)
    storage.write_bytes(storage.join(output, "best", CHECKPOINT_FILE), buf.getvalue(), cfg.storage)
    with open(os.path.join(local_dir, META_FILE), "rb") as f:
        storage.write_bytes(storage.join(output, "best", META_FILE), f.read(), cfg.storage)


def _parse_fail_at(spec: str) -> tuple[int, int, int] | None:
    if not spec:
        return None
    epoch, step, rank = (int(v) for v in spec.split(":"))
    return epoch, step, rank


def _inject_failure(output: str, cfg: Config) -> None:
    """Kill this worker process once (a marker under the output makes it happen only once)."""
    marker = storage.join(output, ".injected-failure")
    if storage.exists(marker, cfg.storage):
        return
    storage.write_text(marker, "injected", cfg.storage)
    log.warning("injected failure: killing this worker (MEDHIER_FAIL_AT)")
    os._exit(1)
