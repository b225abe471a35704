"""Grad-CAM for both heads of the hierarchical model (seed 001 §6.1: a flag a radiologist can see).

Single-output Grad-CAM (MONAI's, pytorch-grad-cam's) does not fit a model with two heads whose
subclass scores are normalised *within* a main class, so this module computes it directly with a
forward hook on one trunk stage:

    A = stage activations (B, K, h, w)          score = log P(main = c)          (level "main")
                                                score = log P(sub = leaf | main)  (level "sub")
    w_k = mean over h, w of d score / d A_k      map = ReLU(sum_k w_k A_k)
    -> bilinear upsampling to the input size -> divided by its maximum (an all-zero map stays 0)

The score of the subclass level is the within-main normalised output (``Outputs.log_p_sub``), so
the map shows what tells *this* subclass from its siblings, not what makes the image abnormal
(that is the main map's job). A main class with a single subclass has log P(sub | main) = 0 for
every image: its subclass map is all zeros, honestly, rather than noise normalised to [0, 1].

Scores are log-probabilities rather than logits because the flat head has no main logits (its
P(main) is a sum over leaves), and log-probabilities mean the same thing for both heads.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from medhier.classify.calibration import Temperatures, temper
from medhier.classify.model import STAGES, Outputs, predict
from medhier.classify.presets import eval_preset
from medhier.classify.task import CLASSIFY, taxonomy_of
from medhier.classify.taxonomy import Taxonomy
from medhier.config import StorageConfig
from medhier.io import storage
from medhier.io.image import decode_images
from medhier.train.checkpoint import load_checkpoint, unwrap

__all__ = [
    "LEVELS",
    "CamResult",
    "explain_batch",
    "explain_dicom",
    "grad_cam",
    "heat_summary",
    "overlay_png",
    "resolve_target",
]

LEVELS = ("main", "sub")
# Input pixels per cell of each trunk stage of the torchvision ResNets (stem: /4, then /1, /2, /2, /2).
STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
PNG_NAMES = {"main": "gradcam_main.png", "sub": "gradcam_sub.png"}


@dataclass
class CamResult:
    """Grad-CAM of a batch of B images of S x S pixels."""

    heatmap: torch.Tensor  # (B, S, S) float32 in [0, 1], on the model's device
    target: torch.Tensor  # (B,) int64: main index (level "main") or leaf index (level "sub")
    outputs: Outputs  # the model's outputs for the batch (detached)


# -- targets ------------------------------------------------------------------------------------


def resolve_target(taxonomy: Taxonomy, level: str, target: str | None) -> int | None:
    """A class name -> its index for ``level``: a main class ("fracture") for "main", a leaf
    ("fracture/burst") for "sub"; None stays None (explain the prediction).

    Raises ValueError naming the bad value and the valid ones."""
    _check_level(level)
    if target is None:
        return None
    names = taxonomy.mains if level == "main" else taxonomy.leaf_names
    if target not in names:
        kind = "a main class" if level == "main" else "a leaf ('main/sub')"
        raise ValueError(f"explain target {target!r} is not {kind} of this model's taxonomy; valid for level {level!r}: {list(names)}")
    return names.index(target)


def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"explain level {level!r}: choose from {list(LEVELS)}")


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"explain stage {stage!r}: choose a trunk stage from {list(STAGES)}")


# -- Grad-CAM -----------------------------------------------------------------------------------


def grad_cam(
    model: nn.Module,
    x: torch.Tensor,
    taxonomy: Taxonomy,
    *,
    level: str = "main",
    target: int | torch.Tensor | np.ndarray | None = None,
    stage: str = "layer4",
) -> CamResult:
    """Grad-CAM of ``x`` (B, 3, S, S), normalised as the model's eval preset makes it.

    ``level``: "main" explains log P(main = target), "sub" explains log P(leaf = target | main).
    ``target``: None = the prediction (the predicted main class, or the best leaf inside it);
    an int for every image, or (B,) indices. ``stage``: the trunk stage whose activations are
    weighted (layer4's map is S/32 pixels across, layer3's S/16).

    Runs in eval mode and fp32 whatever the caller's autocast or inference mode; the model's
    training mode and requires_grad flags are restored afterwards, and no parameter's ``.grad``
    is touched.
    """
    _check_level(level)
    _check_stage(stage)
    # A torch.compile'd or DDP model: hook the eager module inside (compiled graphs skip hooks).
    model = unwrap(model)
    with _cut_at(getattr(model.trunk, stage)) as captured, _eval_without_parameter_grads(model):
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            # clone: a tensor made under inference_mode cannot enter autograd
            out = model(x.detach().clone().float())
            activations = captured["A"]
            idx = _targets(out, taxonomy, level, target, x.shape[0])
            scores = (out.log_p_main if level == "main" else out.log_p_sub).gather(1, idx[:, None])
            # Images do not interact in eval mode (BatchNorm uses running statistics), so the
            # gradient of the batch's summed score is each image's own gradient.
            (grads,) = torch.autograd.grad(scores.sum(), activations)
            cam = _weighted_map(activations, grads, tuple(x.shape[-2:]), STRIDES[stage])
    detached = Outputs(*(t.detach() for t in (out.main_logits, out.log_p_main, out.log_p_sub, out.log_p_leaf)))
    return CamResult(cam.clamp_(0.0, 1.0).detach(), idx.detach(), detached)


@contextmanager
def _cut_at(stage: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Inside: ``stage``'s output, as the forward pass makes it, is in the yielded dict under "A"."""
    captured: dict[str, torch.Tensor] = {}

    def cut_and_keep(_module, _inputs, output):
        # The activations become a leaf that requires grad: gradients reach them even where the
        # stage is frozen, and autograd never walks (or stores) the trunk below the stage.
        leaf = output.detach().requires_grad_(True)
        captured["A"] = leaf
        return leaf

    handle = stage.register_forward_hook(cut_and_keep)
    try:
        yield captured
    finally:
        handle.remove()


@contextmanager
def _eval_without_parameter_grads(model: nn.Module) -> Iterator[None]:
    """Inside: ``model`` in eval mode with no parameter requiring grad; its training mode and
    requires_grad flags are restored afterwards."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    try:
        # Parameter gradients are not needed: without them autograd keeps only what the
        # activations' gradient needs.
        for p in params:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)


def _weighted_map(activations: torch.Tensor, grads: torch.Tensor, size: tuple[int, int], stride: int) -> torch.Tensor:
    """Activations (B, K, h, w) weighted by their mean gradients, ReLU, upsampled to ``size`` ->
    (B, H, W) divided by each map's maximum (an all-zero map stays 0)."""
    weights = grads.float().mean((2, 3), keepdim=True)  # (B, K, 1, 1)
    cam = F.relu((weights * activations.detach().float()).sum(1, keepdim=True))  # (B, 1, h, w)
    cam = _upsample(cam, size, stride)
    peak = cam.amax((1, 2), keepdim=True)
    return torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))


def _upsample(cam: torch.Tensor, size: tuple[int, int], stride: int) -> torch.Tensor:
    """(B, 1, h, w) -> (B, H, W): bilinear, with cell (i, j) placed on input pixel
    (stride * i, stride * j), the centre of its receptive field (every strided convolution and
    pooling of the trunk is padded symmetrically), and the border cells' values held beyond them.

    ``F.interpolate`` would put cell i at the centre of the i-th stride-wide block instead,
    stride / 2 - 0.5 pixels further down and right: 15.5 px at layer4, an eighth of a 128 px image.
    """
    b, _, h, w = cam.shape
    ys = torch.arange(size[0], device=cam.device, dtype=torch.float32) / stride  # in cells
    xs = torch.arange(size[1], device=cam.device, dtype=torch.float32) / stride
    # grid_sample's align_corners=True: -1 and +1 are the centres of the first and last cells
    gy = ys * (2.0 / max(h - 1, 1)) - 1.0
    gx = xs * (2.0 / max(w - 1, 1)) - 1.0
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)  # (H, W, 2) as (x, y)
    out = F.grid_sample(cam, grid.expand(b, -1, -1, -1), mode="bilinear", padding_mode="border", align_corners=True)
    return out[:, 0]


def _targets(out: Outputs, taxonomy: Taxonomy, level: str, target, batch: int) -> torch.Tensor:
    """(B,) class indices to explain: the given ones, or the hierarchical prediction."""
    device = out.log_p_main.device
    if target is None:
        main, leaf = predict(out, taxonomy)
        return (main if level == "main" else leaf).long()
    idx = torch.as_tensor(target, dtype=torch.long, device=device).reshape(-1)
    if idx.numel() == 1:
        idx = idx.expand(batch)
    limit = taxonomy.num_mains if level == "main" else taxonomy.num_leaves
    if idx.shape != (batch,) or bool(((idx < 0) | (idx >= limit)).any()):
        raise ValueError(f"explain target: need one index or {batch} indices in [0, {limit}) for level {level!r}, got {target!r}")
    return idx


def explain_batch(
    model: nn.Module,
    taxonomy: Taxonomy,
    images_uint8: np.ndarray,
    preset: nn.Module,
    *,
    level: str = "main",
    stage: str = "layer4",
    target: int | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM for a batch of cached/scored images, e.g. inside scoring's model actor.

    ``images_uint8``: (B, S, S) uint8 as the cache stores them; ``preset``: the checkpoint's
    ``eval_preset`` (on the model's device). -> (heatmaps (B, S, S) float32 in [0, 1],
    targets (B,) int64: main indices for "main" (``taxonomy.mains[i]``), leaf indices for "sub"
    (``taxonomy.leaf_names[i]``)).
    """
    device = next(unwrap(model).parameters()).device
    images = np.ascontiguousarray(images_uint8)
    if not images.flags.writeable:  # a view of an Arrow buffer; torch wants memory it may own
        images = images.copy()
    with torch.inference_mode(False):
        x = preset(torch.from_numpy(images).to(device))
    if _is_channels_last(model):
        x = x.contiguous(memory_format=torch.channels_last)
    result = grad_cam(model, x, taxonomy, level=level, target=target, stage=stage)
    return result.heatmap.cpu().numpy(), result.target.cpu().numpy()


def _is_channels_last(model: nn.Module) -> bool:
    conv = unwrap(model).trunk.stem[0].weight
    return conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


# -- pictures and numbers -----------------------------------------------------------------------


def overlay_png(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> bytes:
    """PNG bytes of ``heatmap`` (S, S) float in [0, 1], coloured with matplotlib's 'jet', blended
    with weight ``alpha`` over the grey windowed ``image`` (S, S) uint8. -> an S x S RGB PNG."""
    image = np.asarray(image)
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if image.ndim != 2 or image.shape != heatmap.shape:
        raise ValueError(f"overlay_png: need a 2-D image and a heat map of the same shape, got {image.shape} and {heatmap.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay_png: alpha must be in [0, 1], got {alpha}")
    from matplotlib import colormaps  # ~0.4 s: only runs that explain draw overlays; `medhier score` imports this module

    grey = np.repeat(image.astype(np.float32)[..., None] / 255.0, 3, axis=-1)
    colour = colormaps["jet"](np.clip(np.nan_to_num(heatmap), 0.0, 1.0))[..., :3]
    rgb = np.rint(((1.0 - alpha) * grey + alpha * colour) * 255.0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def heat_summary(heatmap: np.ndarray) -> dict[str, float | None]:
    """Where a heat map (H, W) >= 0 points, as fractions of the image height (y) and width (x),
    measured at pixel centres ((i + 0.5) / H): ``peak_y``/``peak_x`` (the maximum; the first in
    row-major order on ties) and ``com_y``/``com_x`` (the centre of mass). An all-zero map points
    nowhere: every value is None (null in JSON and Parquet)."""
    h = np.nan_to_num(np.asarray(heatmap, dtype=np.float64))
    if h.ndim != 2:
        raise ValueError(f"heat_summary: need a 2-D heat map, got shape {h.shape}")
    h = np.clip(h, 0.0, None)
    total = h.sum()
    if total <= 0:
        return {"peak_y": None, "peak_x": None, "com_y": None, "com_x": None}
    rows, cols = h.shape
    ys, xs = (np.arange(rows) + 0.5) / rows, (np.arange(cols) + 0.5) / cols
    py, px = np.unravel_index(int(np.argmax(h)), h.shape)
    return {
        "peak_y": float(ys[py]),
        "peak_x": float(xs[px]),
        "com_y": float((h.sum(1) * ys).sum() / total),
        "com_x": float((h.sum(0) * xs).sum() / total),
    }


# -- one DICOM, end to end ---------------------------------------------------------------------


def explain_dicom(
    checkpoint: str,
    data: bytes,
    output_dir: str,
    *,
    storage_cfg: StorageConfig | None = None,
    level: str = "both",
    target: str | None = None,
    stage: str = "layer4",
    source: str = "",
) -> dict[str, Any]:
    """Explain one DICOM (``data``: the file's bytes) with a checkpoint (local or s3:// URI).

    Decodes and preprocesses exactly as training and scoring do, with the checkpoint's own
    ``dicom`` and ``preprocess`` settings, and explains the first selected frame. Writes
    ``gradcam_main.png`` and/or ``gradcam_sub.png`` (``level``: "main", "sub" or "both") into
    ``output_dir`` (local or s3://). ``target``: a main class ("fracture") or, for "sub", a leaf
    ("fracture/burst"); with "both", a main class explains the best leaf inside it at the sub
    level, a leaf explains its own main class at the main level. None explains the prediction.

    -> JSON-able dict: model_id, frame, stage, the prediction (main/sub/leaf names with
    p_main, p_sub = P(sub | main), p_leaf; calibrated with the checkpoint's temperatures) and per
    level the explained class, its probability,
    the PNG's URI and its :func:`heat_summary`. Raises ``medhier.io.dicom.DicomRejected``
    unchanged for a file that cannot be decoded, ValueError for a bad level, stage or target.
    """
    if level not in (*LEVELS, "both"):
        raise ValueError(f"explain level {level!r}: choose from {[*LEVELS, 'both']}")
    levels = list(LEVELS) if level == "both" else [level]
    _check_stage(stage)
    loaded = load_checkpoint(checkpoint, CLASSIFY, storage_cfg)
    tax, cfg = taxonomy_of(loaded), loaded.cfg
    temperatures = Temperatures.from_meta(loaded.task_meta, f"checkpoint {checkpoint!r}")
    targets = _dicom_targets(tax, level, target)  # before decoding: a typo fails fast

    decoded, images = decode_images(data, cfg.dicom, cfg.preprocess.image_size, cfg.preprocess.resize, source=source)
    image = images[0]
    x = eval_preset(cfg.preprocess)(torch.from_numpy(image)[None])

    result: dict[str, Any] = {"checkpoint": checkpoint, "model_id": loaded.model_id, "frame": int(decoded.frames[0]), "stage": stage, "maps": {}}
    outputs = None  # set by the first map; "sub" with a main-class target comes after "main"
    for lv in levels:
        cam = grad_cam(loaded.model, x, tax, level=lv, target=_level_target(tax, targets, lv, outputs), stage=stage)
        # The probabilities reported are calibrated, as every output's; the maps explain the model's own.
        outputs = Outputs(cam.outputs.main_logits, *temper(cam.outputs.log_p_main, cam.outputs.log_p_sub, temperatures, tax))
        heat = cam.heatmap[0].numpy()
        uri = storage.join(storage.normalize(output_dir), PNG_NAMES[lv])
        storage.write_bytes(uri, overlay_png(image, heat), storage_cfg)
        result["maps"][lv] = {**_explained_class(cam, lv, tax, outputs), "png": uri, **heat_summary(heat)}
    result["prediction"] = _prediction(outputs, tax)
    return result


def _level_target(tax: Taxonomy, targets: dict[str, int | None], level: str, outputs: Outputs | None) -> int | None:
    """The index :func:`explain_dicom` explains at ``level``: ``targets[level]``, except that
    "both" with a main-class target explains, at "sub", the best leaf inside that main class
    (from the main map's ``outputs``)."""
    if level == "sub" and targets[level] is None and targets.get("sub_within") is not None:
        inside = torch.as_tensor(tax.leaf_mask[targets["sub_within"]])
        return int(outputs.log_p_sub[0].masked_fill(~inside, float("-inf")).argmax())
    return targets[level]


def _explained_class(cam: CamResult, level: str, tax: Taxonomy, outputs: Outputs) -> dict[str, Any]:
    """The first image's explained class at ``level`` and its (calibrated) probability in
    ``outputs``: P(main), or P(sub | main)."""
    t = int(cam.target[0])
    if level == "main":
        return {"target": tax.mains[t], "p": float(outputs.log_p_main[0, t].exp())}
    return {"target": tax.leaf_names[t], "p": float(outputs.log_p_sub[0, t].exp())}


def _prediction(outputs: Outputs, tax: Taxonomy) -> dict[str, Any]:
    """The first image's hierarchical prediction: names and p_main, p_sub = P(sub | main), p_leaf."""
    main, leaf = (int(v[0]) for v in predict(outputs, tax))
    return {
        "main": tax.mains[main],
        "sub": tax.leaves[leaf][1],
        "leaf": tax.leaf_names[leaf],
        "p_main": float(outputs.log_p_main[0, main].exp()),
        "p_sub": float(outputs.log_p_sub[0, leaf].exp()),
        "p_leaf": float(outputs.log_p_leaf[0, leaf].exp()),
    }


def _dicom_targets(tax: Taxonomy, level: str, target: str | None) -> dict[str, int | None]:
    """The per-level target indices of :func:`explain_dicom` (see its docstring)."""
    if level != "both":
        _check_level(level)
        return {level: resolve_target(tax, level, target)}
    if target is None:
        return {"main": None, "sub": None}
    if target in tax.mains:
        return {"main": tax.mains.index(target), "sub": None, "sub_within": tax.mains.index(target)}
    if target in tax.leaf_names:
        leaf = tax.leaf_names.index(target)
        return {"main": int(tax.leaf_main[leaf]), "sub": leaf}
    raise ValueError(
        f"explain target {target!r} is neither a main class nor a leaf of this model's taxonomy; "
        f"main classes: {list(tax.mains)}, leaves: {list(tax.leaf_names)}"
    )

