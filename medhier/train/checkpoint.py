"""Self-describing checkpoints: a checkpoint alone rebuilds the model and its preprocessing.

A checkpoint is a directory (local or S3) holding ``model.pt`` — a plain dict of tensors and
JSON-like values, so that it loads with ``torch.load(weights_only=True)``: a checkpoint from
storage is untrusted input — and ``meta.json``, the same metadata readable without torch.
``model_id`` is a hash of the weights: it names the model in reports and ledgers, and is checked
on load so that a corrupted file is refused.

The metadata names the task that trained the model (``task``), the config sections that define
what the model sees and predicts (``model_sections``: they always come from the checkpoint when
it runs) and the task's own self-description (``task_meta``: the classifier's taxonomy, the
segmentation model's label set and sequences). The platform rebuilds the model through the
task the caller hands it, and refuses a checkpoint of another task.

What is fitted after training, on held-out data, is added to the finished checkpoint by
:func:`amend_checkpoint` without touching the weights (so ``model_id`` stays): more
``task_meta`` (the classifier's temperatures and referral threshold), ``defaults`` (run-time
settings the checkpoint recommends, ``{"score": {"refer_below": 0.62}}``, used by
:func:`config_for_checkpoint` where the user's config leaves the key null) and ``profile`` (the
training data's reference profile that scoring runs compare themselves with,
:mod:`medhier.infer.drift`). ``meta_sha256`` hashes these three (and is checked on load like
``model_id``), so an edited or damaged checkpoint is refused rather than scored with other
probabilities.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from medhier import __version__
from medhier.config import Config, StorageConfig
from medhier.io import storage

__all__ = [
    "CHECKPOINT_FILE",
    "META_FILE",
    "CheckpointError",
    "Loaded",
    "amend_checkpoint",
    "built",
    "ModelTask",
    "config_for_checkpoint",
    "load_checkpoint",
    "model_id_of",
    "save_checkpoint",
    "unwrap",
]

CHECKPOINT_FILE = "model.pt"
META_FILE = "meta.json"
FORMAT = 2  # 1: the classifier's, before checkpoints named their task (still read)
_FORMAT_1 = {"task": "classify", "model_sections": ("taxonomy", "dicom", "preprocess", "model")}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names it."""


class ModelTask(Protocol):
    """What a task tells the platform about its models."""

    name: str  # recorded in checkpoints ("classify", "plaque-seg")
    model_sections: tuple[str, ...]  # config sections that define the model's input and output

    def build_model(self, cfg: Config, *, pretrained: bool = True) -> nn.Module:
        """The untrained model for ``cfg``; ``pretrained=False`` skips any pretrained weights
        (a checkpoint's are about to be loaded)."""

    def describe(self, cfg: Config) -> dict[str, Any]:
        """JSON-able self-description stored with the weights (``task_meta``)."""


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def model_id_of(state_dict: dict[str, torch.Tensor]) -> str:
    """Content hash (16 hex digits) of the weights: same weights, same id, on any machine."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        # Flatten first: a channels_last 1x1 conv weight counts as contiguous but has no unit stride.
        flat = t.contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def save_checkpoint(
    directory: str,
    model: nn.Module,
    cfg: Config,
    task: ModelTask,
    *,
    epoch: int,
    metrics: dict[str, Any] | None = None,
    training_state: dict[str, Any] | None = None,
) -> str:
    """Write ``model.pt`` and ``meta.json`` into a local directory -> model_id.

    ``training_state`` (optimizer, scheduler, scaler, early-stopping bookkeeping) is only needed
    to resume training; scoring ignores it.
    """
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    model_id = model_id_of(state)
    meta = {
        "format": FORMAT,
        "task": task.name,
        "model_id": model_id,
        "medhier_version": __version__,
        "epoch": epoch,
        "config": cfg.to_public_dict(),  # resolved config, secrets redacted
        "model_sections": list(task.model_sections),
        "task_meta": task.describe(cfg),
        "metrics": _jsonable(metrics or {}),
    }
    meta["meta_sha256"] = _meta_digest(meta)
    os.makedirs(directory, exist_ok=True)
    buf = io.BytesIO()
    torch.save({**meta, "model_state": state, "training_state": training_state or {}}, buf)
    storage.write_bytes(os.path.join(directory, CHECKPOINT_FILE), buf.getvalue())
    storage.write_text(os.path.join(directory, META_FILE), json.dumps(meta, indent=2))
    return model_id


@dataclass
class Loaded:
    """A loaded checkpoint: the model in eval mode and everything needed to feed it. Loaded with
    ``build=False``, ``model`` is None until :func:`built` makes it from ``state``."""

    model: nn.Module | None
    cfg: Config
    task: str
    task_meta: dict[str, Any]
    model_sections: tuple[str, ...]
    model_id: str
    epoch: int
    metrics: dict[str, Any]
    training_state: dict[str, Any]
    uri: str
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)  # section -> key -> value (see amend_checkpoint)
    profile: dict[str, Any] = field(default_factory=dict)  # the training data's reference profile (medhier.infer.drift)
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # the verified weights while ``model`` is unbuilt


def read_checkpoint(uri: str, storage_cfg: StorageConfig | None = None, map_location: str = "cpu") -> dict[str, Any]:
    """The verified contents of a checkpoint (``model.pt`` of a directory, local or ``s3://``):
    the weights hash to the recorded model_id. Raises FileNotFoundError or CheckpointError
    naming the checkpoint."""
    file_uri = uri if uri.endswith(".pt") else storage.join(storage.normalize(uri), CHECKPOINT_FILE)
    try:
        raw = storage.read_bytes(file_uri, storage_cfg)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {uri!r} not found (looked for {file_uri})") from None
    try:
        data = torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {uri!r} is not a medhier checkpoint: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") not in (1, FORMAT) or "model_state" not in data:
        raise CheckpointError(f"checkpoint {uri!r} is not a medhier checkpoint of format 1 or {FORMAT}")
    if data["format"] == 1:
        data = {**data, **_FORMAT_1, "task_meta": {"taxonomy": data["taxonomy"]}}
    if model_id_of(data["model_state"]) != data["model_id"]:
        raise CheckpointError(f"checkpoint {uri!r}: weights do not match their recorded model_id (corrupted?)")
    if data["format"] == FORMAT and "meta_sha256" in data and _meta_digest(data) != data["meta_sha256"]:
        raise CheckpointError(f"checkpoint {uri!r}: task_meta, defaults or profile do not match their recorded meta_sha256 (edited or corrupted?)")
    return data


def amend_checkpoint(uri: str, storage_cfg: StorageConfig | None = None, *, task_meta: dict[str, Any] | None = None,
                     defaults: dict[str, dict[str, Any]] | None = None, profile: dict[str, Any] | None = None) -> None:
    """Add what was fitted after training to a verified checkpoint (a directory or its
    ``model.pt``, local or ``s3://``), in place: ``task_meta`` entries are merged into the
    task's, ``defaults`` (config section -> key -> value) and ``profile`` replace the stored
    ones. The weights, and so ``model_id``, are unchanged; ``meta.json`` is rewritten to match."""
    data = read_checkpoint(uri, storage_cfg)
    if task_meta:
        data["task_meta"] = {**data["task_meta"], **_jsonable(task_meta)}
    if defaults is not None:
        data["defaults"] = _jsonable(defaults)
    if profile is not None:
        data["profile"] = _jsonable(profile)
    data["meta_sha256"] = _meta_digest(data)
    directory = os.path.dirname(uri) if uri.endswith(".pt") else storage.normalize(uri)
    buf = io.BytesIO()
    torch.save(data, buf)
    storage.write_bytes(storage.join(directory, CHECKPOINT_FILE), buf.getvalue(), storage_cfg)
    meta = {k: v for k, v in data.items() if k not in ("model_state", "training_state")}
    storage.write_text(storage.join(directory, META_FILE), json.dumps(meta, indent=2), storage_cfg)


def load_checkpoint(uri: str, task: ModelTask, storage_cfg: StorageConfig | None = None, map_location: str = "cpu",
                    build: bool = True) -> Loaded:
    """Load a checkpoint of ``task`` (a directory or its ``model.pt``, local or ``s3://``).

    The model is rebuilt by the task from the checkpoint's own config; its weights must hash to
    the recorded model_id. The patient salt is never stored: scoring uses its own. ``build=False``
    leaves the model unbuilt (:func:`built` makes it when needed): a model actor that runs a
    cached compiled model never needs the eager one, nor the libraries that define it.
    """
    data = read_checkpoint(uri, storage_cfg, map_location)
    if data["task"] != task.name:
        raise CheckpointError(f"checkpoint {uri!r} holds a {data['task']!r} model, not a {task.name!r} one")
    public = data["config"]
    public["dicom"]["patient_salt"] = ""
    cfg = Config.from_dict(public)
    loaded = Loaded(None, cfg, data["task"], data["task_meta"], tuple(data["model_sections"]), data["model_id"],
                    int(data["epoch"]), data.get("metrics", {}), data.get("training_state", {}), uri,
                    data.get("defaults", {}), data.get("profile", {}), data["model_state"])
    if build:
        built(loaded, task)
    return loaded


def built(loaded: Loaded, task: ModelTask) -> nn.Module:
    """The checkpoint's model in eval mode, built from its verified weights on the first call."""
    if loaded.model is None:
        model = task.build_model(loaded.cfg, pretrained=False)
        model.load_state_dict(loaded.state)
        loaded.model, loaded.state = model.eval(), None
    return loaded.model


def config_for_checkpoint(user: Config, loaded: Loaded) -> Config:
    """The config to run a checkpoint with: the sections that define the model's input and
    output (its ``model_sections``: DICOM windows, preprocessing, model, taxonomy...) from the
    checkpoint, so inference matches training; where data lives and how to run (storage, data,
    score, runtime, ...) from the user, except that a key the user leaves null takes the
    checkpoint's ``defaults`` (e.g. ``score.refer_below``). The patient salt is the user's: it is
    never stored."""
    data = user.to_dict()
    ckpt = loaded.cfg.to_dict()
    for section in loaded.model_sections:
        data[section] = ckpt[section]
    for section, values in loaded.defaults.items():
        for key, value in values.items():
            if section in data and data[section].get(key, 0) is None:
                data[section][key] = value
    data["dicom"]["patient_salt"] = user.dicom.patient_salt
    return Config.from_dict(data)


def _meta_digest(data: dict[str, Any]) -> str:
    """sha256 of what :func:`amend_checkpoint` may change (canonical JSON)."""
    fitted = {k: data.get(k) for k in ("task_meta", "defaults", "profile")}
    return hashlib.sha256(json.dumps(fitted, sort_keys=True, default=str).encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    """Metrics as plain JSON types (numpy scalars and NaN included), so weights_only can load them."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value
