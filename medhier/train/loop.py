"""The Ray Train harness every task trains through: ``train_on_cache(cfg, cache, output, task)``.

    driver   cache splits ──Ray Data (train split sharded)──▶ TorchTrainer ──▶ OUTPUT/
    worker   resume ─▶ per epoch: train_one_epoch ─▶ evaluate (rank 0) ─▶ checkpoint, best/, early stop

The task hands the harness a :class:`Step` per worker (its loss on a batch, its evaluation of a
split, its optimizer groups); the harness owns DDP, precision, the optimizer's schedule,
checkpoints, resuming and early stopping, the same for every task.

Output layout::

    OUTPUT/train/         Ray Train run: per-epoch checkpoints (checkpoint_epochNNNN/), run snapshot
    OUTPUT/best/          best checkpoint (model.pt, meta.json)
    OUTPUT/history.json   per-epoch training and validation metrics
    OUTPUT/config.yaml    the resolved config
    OUTPUT/tracking.json  the MLflow run of this output, when tracking.uri is set (medhier.train.tracking)

The driver prints one line per epoch (medhier.train.progress); rank 0 logs each epoch to MLflow
when tracking is on. A stop signal (medhier.stopping) ends the run where it is:
the checkpoints written so far are what a re-run resumes from.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import ray
import ray.train
import ray.train.torch
import torch
from ray.data import DataContext
from ray.train.torch import TorchTrainer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from medhier import stopping
from medhier.config import Config, TrainConfig
from medhier.console import number
from medhier.data.cache import CacheInfo, load_cache
from medhier.io import storage
from medhier.runtime import cpu_threads, verbose
from medhier.stopping import Stopped
from medhier.train import tracking
from medhier.train.checkpoint import CHECKPOINT_FILE, META_FILE, ModelTask, model_id_of, save_checkpoint, unwrap
from medhier.train.precision import autocast_dtype
from medhier.train.progress import EpochLines

__all__ = ["Env", "Step", "TrainContext", "TrainTask", "evaluate", "rank_zero", "train_on_cache", "train_one_epoch", "warmup_cosine"]

log = logging.getLogger(__name__)

_CHECKPOINT_DIR = re.compile(r"^checkpoint_epoch(\d{4,})$")


# -- what a task supplies --------------------------------------------------------------------


@dataclass(frozen=True)
class Env:
    """Where a worker computes: its device, precision, memory format and rank."""

    device: torch.device
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    rank: int
    world: int

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)


class Step(Protocol):
    """A task's per-worker training pieces, built on the worker by ``TrainTask.make_step``."""

    metric: str  # the validation metric that picks best/ and stops early
    minimise: bool

    def collate(self) -> Callable[[dict], dict[str, torch.Tensor]]:
        """Ray Data numpy batch -> tensors (``iter_torch_batches``' collate_fn)."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """Augment and forward one training batch (under ``env.autocast()`` where it matters)
        -> (loss, samples)."""

    def evaluate(self, model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Score a whole split -> scalar metrics (``metric`` among them; ``val_loss``) and
        ``metrics`` (the full, JSON-able evaluation). Rank 0 only; no collectives."""

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        """AdamW parameter groups with their learning rates."""


class TrainTask(ModelTask, Protocol):
    """A task that trains through this harness."""

    columns: tuple[str, ...]  # cache columns a training batch needs

    def check_cache(self, info: CacheInfo, cfg: Config) -> None:
        """Raise ConfigError when the cache was made with other input settings than ``cfg``
        asks for (another image size would silently change what the model sees)."""

    def make_step(self, cfg: Config, env: Env, class_counts: dict[str, int]) -> Step:
        """The worker's step; ``class_counts``: labelled training samples per class name."""

    def metric(self, cfg: Config) -> str:
        """The validation metric that picks best/ and stops early under ``cfg`` (its step's
        ``metric``): the driver's per-epoch lines show it."""


# -- the driver ------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a task's fit command returns: the harness's run (``output``, ``best/``, its epoch and
    validation ``metric``, epochs run, resume points), the task's test metrics and the wall time.
    A task adds its own fields in a subclass and its test table after :meth:`run_lines`."""

    output: str
    best_checkpoint: str
    best_epoch: int
    best_metric: float | None
    epochs_run: int
    resumed_at: list[int]
    test_metrics: dict[str, Any]
    seconds: float
    prepare_table: str = ""
    metric: str = "metric"  # the validation metric best_metric is

    @classmethod
    def of_run(cls, output: str, summary: dict[str, Any], **fields: Any) -> Any:
        """``train_on_cache``'s summary of a run under ``output`` plus the task's ``fields``."""
        return cls(output=output, best_checkpoint=storage.join(output, "best"), best_epoch=int(summary.get("best_epoch", -1)),
                   best_metric=summary.get("best_metric"), epochs_run=int(summary.get("epochs_run", 0)),
                   resumed_at=list(summary.get("resumed_at", [])), **fields)

    def run_lines(self) -> list[str]:
        """The run's part of the printed summary (the cache's table was printed when it was ready)."""
        resumed = f"  (resumed at epoch {', '.join(map(str, self.resumed_at))})" if self.resumed_at else ""
        return [
            f"output           {self.output}",
            f"best checkpoint  {self.best_checkpoint}  (epoch {self.best_epoch}, validation {self.metric} {number(self.best_metric)})",
            f"epochs run       {self.epochs_run}{resumed}",
            f"wall time        {self.seconds:,.1f} s",
        ]


def train_on_cache(cfg: Config, cache: str, output: str, task: TrainTask, callbacks: tuple = (), hooks: tuple = (), *,
                   parent_run: tracking.TrackedRun | None = None, epoch_lines: bool = True) -> dict[str, Any]:
    """Run the TorchTrainer on a committed cache, writing checkpoints, best/ and history under
    ``output``. -> the run summary (best epoch and metric, epochs run, resume points).

    Re-running with the same output resumes from its newest checkpoint (and its MLflow run).
    ``callbacks``: Ray Train callbacks (Tune's TuneReportCallback when a search runs this).
    ``hooks``: callables ``hook(ctx, epoch, step)`` run before every training step on every
    worker (tests inject faults with them). ``parent_run``: the MLflow run of the search this
    training is a trial of. ``epoch_lines``: print a line per epoch to stdout. Needs Ray initialised.
    """
    # Training reports per epoch; per-worker dataset progress bars would only interleave. The
    # datasets keep the context they were made with, so switch the bars off before making them.
    data_ctx = DataContext.get_current()
    progress, data_ctx.enable_progress_bars = data_ctx.enable_progress_bars, False
    try:
        return _fit(cfg, cache, output, task, callbacks, hooks, parent_run, epoch_lines)
    except Stopped as stop:
        epoch = _newest_checkpoint_epoch(output, cfg)
        stop.note(f"no checkpoint yet in {output}/train" if epoch is None else
                  f"checkpoints up to epoch {epoch} in {output}/train (best so far: {output}/best); a re-run resumes at epoch {epoch + 1}")
        raise
    finally:
        data_ctx.enable_progress_bars = progress


def _fit(cfg: Config, cache: str, output: str, task: TrainTask, callbacks: tuple, hooks: tuple,
         parent_run: tracking.TrackedRun | None, epoch_lines: bool) -> dict[str, Any]:
    info = CacheInfo.read(cache, cfg.storage)
    if info is None:
        raise FileNotFoundError(f"no committed cache at {cache!r}: run `medhier prepare`")
    task.check_cache(info, cfg)
    split_classes = info.counts.get("split_classes", {})
    samples = info.samples()
    n_train, n_val = samples.get("train", 0), samples.get("val", 0)
    if n_train == 0:
        raise ValueError(f"no labelled training samples in {info.archive!r} (cache {cache}): check the labels "
                         f"({info.labels or 'none found'}) and data.train_fraction")
    if n_val == 0:
        raise ValueError(f"no labelled validation samples in {info.archive!r}: raise data.val_fraction or add patients")
    # Splits under a quarter of the object store are held in memory for the whole run.
    small = int(ray.cluster_resources().get("object_store_memory", 0) * 0.25)
    train_ds, _ = load_cache(cache, cfg.storage, "train", columns=list(task.columns), in_memory_below=small)
    val_ds, _ = load_cache(cache, cfg.storage, "val", columns=list(task.columns), in_memory_below=small)
    # Build the model once here: a missing weights file or a download that cannot work fails now,
    # with its own message, instead of inside every worker.
    task.build_model(cfg)
    storage.write_text(storage.join(output, "config.yaml"), cfg.to_yaml(), cfg.storage)
    run = tracking.start_run(cfg, output, task=task.name, parent=parent_run)
    use_gpu = _use_gpu(cfg.train)
    fs, run_root = storage.filesystem(output, cfg.storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "task": task, "output": output, "n_train": n_train,
                           "class_counts": split_classes.get("train", {}), "hooks": tuple(hooks), "verbose": verbose(),
                           "tracking": run},
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
    with tracking.tracked(run, cfg, output, files=("config.yaml", "history.json"), trial=parent_run is not None), \
            (EpochLines(cfg, output, metric=task.metric(cfg)) if epoch_lines else nullcontext()):
        return _fit_trainer(trainer).return_value or {}


def _fit_trainer(trainer: TorchTrainer):
    """``trainer.fit()``; off the main thread when medhier's stop signals are in force: in the
    main thread Ray Train installs its own Ctrl-C handler (a graceful abort that ends the
    process with status 0) and leaves it installed. The main thread waits in short joins, so a
    stop signal still raises there at once."""
    if not stopping.installed() or threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="medhier-trainer", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _use_gpu(train_cfg: TrainConfig) -> bool:
    if train_cfg.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return train_cfg.use_gpu == "true"


# -- the workers -----------------------------------------------------------------------------


@dataclass
class TrainState:
    """What a resumed run needs besides weights and optimizer: where it was and how it fared."""

    epoch: int = 0  # next epoch to run
    best_metric: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list = field(default_factory=list)
    resumed_at: list = field(default_factory=list)  # epochs a restarted worker group or re-run resumed at

    def record(self, epoch: int, metric: float | None, minimise: bool, patience: int) -> tuple[bool, bool]:
        """Book one finished epoch -> (improved, stop early)."""
        improved = _improved(metric, self.best_metric, minimise)
        if improved:
            self.best_metric, self.best_epoch, self.bad_epochs = metric, epoch, 0
        else:
            self.bad_epochs += 1
        self.epoch = epoch + 1
        return improved, bool(patience) and self.bad_epochs >= patience


@dataclass
class TrainContext:
    """Everything one worker's epochs share (torchvision's references keep the same pieces)."""

    cfg: Config
    task: TrainTask
    env: Env
    step: Step
    model: torch.nn.Module  # DDP-wrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    state: TrainState
    output: str
    hooks: tuple = ()
    mlflow_run: tracking.TrackedRun | None = None  # the run rank 0 logs each epoch to
    drop_last: bool = False  # see last_batch_is_one_image


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One DDP worker: resume if a checkpoint exists, then train / validate / checkpoint per epoch."""
    if not config.get("verbose"):
        _quiet_report_logs()
    ctx = _setup(config)
    tc, state = ctx.cfg.train, ctx.state
    shard, val_data = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    for epoch in range(state.epoch, tc.epochs):
        started = time.perf_counter()
        trained = train_one_epoch(ctx, shard, epoch)
        # Rank 0 validates and decides; everyone follows, so no worker waits in a collective the others left.
        val = _broadcast(ctx.env, evaluate(ctx, val_data) if ctx.env.rank == 0 else {})
        improved, stop = state.record(epoch, val.get(ctx.step.metric), ctx.step.minimise, tc.early_stopping_patience)
        record = {"epoch": epoch, **trained, **{k: v for k, v in val.items() if isinstance(v, (int, float)) or v is None},
                  "best_epoch": state.best_epoch, "improved": improved, "early_stop": stop,
                  "epoch_seconds": time.perf_counter() - started}
        state.history.append(record)
        _report(ctx, record, val.get("metrics", {}), improved)
        if stop:
            break
    return {"best_epoch": state.best_epoch, "best_metric": state.best_metric, "epochs_run": state.epoch, "resumed_at": state.resumed_at}


def _setup(config: dict[str, Any]) -> TrainContext:
    """The worker's model, optimizer, schedule and state, resumed from the newest checkpoint."""
    cfg, task = Config.from_dict(config["cfg"]), config["task"]
    tc = cfg.train
    train_ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # One intra-op thread per reserved CPU: more would fight the other workers for cores.
        torch.set_num_threads(cpu_threads(tc.cpus_per_worker))
    env = Env(device, autocast_dtype(tc.precision, device), torch.channels_last if tc.channels_last else torch.contiguous_format,
              train_ctx.get_world_rank(), train_ctx.get_world_size())
    torch.manual_seed(tc.seed + env.rank)
    model = task.build_model(cfg).to(memory_format=env.memory_format)
    saved = _newest_checkpoint(config["output"], cfg)
    state = TrainState(**saved["training_state"]["state"]) if saved else TrainState()
    if saved:
        unwrap(model).load_state_dict(saved["model_state"])
        state.resumed_at.append(state.epoch)
        log.warning("resuming from the checkpoint of epoch %d", state.epoch - 1)
    model = ray.train.torch.prepare_model(model)
    step = task.make_step(cfg, env, config["class_counts"])
    optimizer = torch.optim.AdamW(step.param_groups(unwrap(model)))
    steps_per_epoch = max(1, math.ceil(config["n_train"] / (env.world * tc.batch_size)))
    scheduler = warmup_cosine(optimizer, tc, steps_per_epoch)
    scaler = torch.amp.GradScaler(enabled=env.amp_dtype == torch.float16)
    if saved:
        optimizer.load_state_dict(saved["training_state"]["optimizer"])
        scaler.load_state_dict(saved["training_state"]["scaler"])
        try:
            scheduler.load_state_dict(saved["training_state"]["scheduler"])
        except (KeyError, ValueError, TypeError):  # a checkpoint of medhier 0.1's hand-written LambdaLR
            for _ in range(state.epoch * steps_per_epoch):
                scheduler.step()
    return TrainContext(cfg, task, env, step, model, optimizer, scheduler, scaler, state, config["output"], config.get("hooks", ()),
                        config.get("tracking"), drop_last=last_batch_is_one_image(config["n_train"], env.world, tc.batch_size))


def last_batch_is_one_image(n_train: int, world: int, batch_size: int) -> bool:
    """Whether each worker's last training batch holds one image, which BatchNorm cannot train on
    ("Expected more than 1 value per channel"): that batch is dropped. Ray Train splits the
    training set into equal shards (``streaming_split(equal=True)``), so every worker has
    ``n_train // world`` rows and drops the same batch: DDP's steps stay in step."""
    per_worker = n_train // max(1, world)
    return per_worker > batch_size and per_worker % batch_size == 1


def warmup_cosine(optimizer: torch.optim.Optimizer, tc: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over ``tc.warmup_epochs`` (from 1/w of the rate to all of it), then cosine
    decay to 0 at the last step, stepped once per optimizer step (torch's own schedulers)."""
    warmup = max(1, int(tc.warmup_epochs * steps_per_epoch)) if tc.warmup_epochs else 0
    total = max(warmup + 1, tc.epochs * steps_per_epoch)
    cosine = CosineAnnealingLR(optimizer, T_max=total - warmup)
    if not warmup:
        return cosine
    linear = LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=max(warmup - 1, 1))
    return SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


def train_one_epoch(ctx: TrainContext, shard, epoch: int) -> dict[str, float]:
    """One pass over this worker's shard -> {"train_loss" (mean over all workers), "train_images_per_s" (all workers)}."""
    tc, env = ctx.cfg.train, ctx.env
    ctx.model.train()
    generator = torch.Generator(device=env.device).manual_seed(tc.seed * 1000 + env.rank + 7919 * epoch)
    start, seen, loss_sum = time.perf_counter(), 0, 0.0
    batches = shard.iter_torch_batches(batch_size=tc.batch_size, collate_fn=ctx.step.collate(), drop_last=ctx.drop_last,
                                       local_shuffle_buffer_size=tc.shuffle_buffer or None,
                                       local_shuffle_seed=tc.seed + epoch * 131 + env.rank, prefetch_batches=tc.prefetch_batches)
    for step, batch in enumerate(batches):
        for hook in ctx.hooks:
            hook(ctx, epoch, step)
        loss, n = ctx.step.loss(ctx.model, batch, generator)
        ctx.optimizer.zero_grad(set_to_none=True)
        ctx.scaler.scale(loss).backward()
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
        ctx.scheduler.step()
        seen += n
        loss_sum += loss.item() * n
    seconds = time.perf_counter() - start
    return {"train_loss": _mean_over_workers(loss_sum, seen, env.device), "train_images_per_s": seen / max(seconds, 1e-9) * env.world}


def evaluate(ctx: TrainContext, val_data) -> dict[str, Any]:
    """Rank 0: the task's evaluation of the whole validation split."""
    net = unwrap(ctx.model)
    net.eval()
    with torch.inference_mode():
        batches = val_data.iter_torch_batches(batch_size=ctx.cfg.train.batch_size * 2, collate_fn=ctx.step.collate())
        return ctx.step.evaluate(net, batches)


def rank_zero() -> bool:
    """True on the worker that does the run's single-copy work (checkpoints, files, logs)."""
    return ray.train.get_context().get_world_rank() == 0


def _broadcast(env: Env, value: dict[str, Any]) -> dict[str, Any]:
    decision = [value]
    if env.world > 1:
        torch.distributed.broadcast_object_list(decision, src=0)
    return decision[0]


def _improved(metric: float | None, best: float | None, minimise: bool) -> bool:
    if metric is None or (isinstance(metric, float) and math.isnan(metric)):
        return best is None  # an undefined metric never beats a defined one
    if best is None:
        return True
    return metric < best if minimise else metric > best


def _mean_over_workers(total: float, count: int, device) -> float:
    t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return float(t[0] / max(t[1], 1.0))


def _report(ctx: TrainContext, record: dict[str, Any], val_metrics: dict[str, Any], improved: bool) -> None:
    """Every worker reports the epoch; rank 0 also writes its checkpoint, best/ and history."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank_zero():
            training_state = {"optimizer": ctx.optimizer.state_dict(), "scheduler": ctx.scheduler.state_dict(),
                              "scaler": ctx.scaler.state_dict(), "state": asdict(ctx.state)}
            save_checkpoint(tmp, ctx.model, ctx.cfg, ctx.task, epoch=record["epoch"], metrics={"validation": val_metrics, **record},
                            training_state=training_state)
            if improved:
                _copy_best(tmp, ctx.output, ctx.cfg)
            storage.write_text(storage.join(ctx.output, "history.json"), json.dumps(ctx.state.history, indent=2, default=str), ctx.cfg.storage)
            # before report: Tune may end a trial as soon as its last report is in (a worker that
            # dies between the two logs that epoch again when it is run again)
            tracking.log_epoch(ctx.mlflow_run, record)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(
            # undefined metrics (an AUC without both classes) as NaN: Tune needs every key, always
            {k: float("nan") if v is None else v for k, v in record.items()},
            checkpoint=checkpoint,
            checkpoint_dir_name=f"checkpoint_epoch{record['epoch']:04d}",
        )


def _copy_best(local_dir: str, output: str, cfg: Config) -> None:
    # Only weights and metadata: the optimizer state is not needed to score.
    data = torch.load(os.path.join(local_dir, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    data["training_state"] = {}
    buf = io.BytesIO()
    torch.save(data, buf)
    storage.write_bytes(storage.join(output, "best", CHECKPOINT_FILE), buf.getvalue(), cfg.storage)
    with open(os.path.join(local_dir, META_FILE), "rb") as f:
        storage.write_bytes(storage.join(output, "best", META_FILE), f.read(), cfg.storage)


def _checkpoint_names(output: str, cfg: Config) -> list[str]:
    """This run's checkpoint directories, newest first."""
    fs, path = storage.filesystem(storage.join(output, "train"), cfg.storage)
    try:
        entries = fs.get_file_info(storage.pafs.FileSelector(path))
    except FileNotFoundError:
        return []
    return sorted((e.base_name for e in entries if _CHECKPOINT_DIR.match(e.base_name)), reverse=True)


def _newest_checkpoint_epoch(output: str, cfg: Config) -> int | None:
    """The epoch of the newest stored checkpoint (by its name and weights file, without loading
    it), or None."""
    for name in _checkpoint_names(output, cfg):
        if storage.exists(storage.join(output, "train", name, CHECKPOINT_FILE), cfg.storage):
            return int(_CHECKPOINT_DIR.match(name).group(1))
    return None


def _newest_checkpoint(output: str, cfg: Config) -> dict[str, Any]:
    """The newest complete checkpoint of this run, or {} for a fresh start.

    Ray Train's own ``get_checkpoint()`` is the last checkpoint its controller *registered*; a
    worker that dies right after an epoch's report can beat the registration, and resuming from
    it would run that epoch again. Every checkpoint directory here is written in full before
    ``report`` returns and carries a hash of its weights, so the newest one that loads and
    verifies is the true resume point.
    """
    root = storage.join(output, "train")
    for name in _checkpoint_names(output, cfg):
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


def _quiet_report_logs() -> None:
    """Ray Train's workers log every report (all its metrics) at INFO under a logger named by
    its file's path, outside the reach of LoggingConfig: silence it unless --verbose."""
    try:  # a private module of Ray 2.60: another Ray version may not have it
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: its logs stay as they are
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
