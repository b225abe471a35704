"""The classifier as an exported graph: what :mod:`medhier.infer.export` writes to ONNX.

    image uint8 (batch, S, S) ──eval preset: [0, 1], 3 channels, ImageNet normalisation──▶ model
        ──▶ p_main (batch, M), p_leaf (batch, L)        float32 probabilities (calibrated, see below)
        ──▶ pred_main (batch,), pred_leaf (batch,)      int64: the main class first, then the best
                                                        leaf inside it (as every medhier output)

The input is what medhier's decode makes of a DICOM frame (``medhier.io.image.decode_images``:
modality LUT, the checkpoint's window, resize to S with its resize mode, rounded to 0..255);
the file's ``preprocessing`` metadata states those settings, so that a deployment can decode
the same way. ``taxonomy`` names the classes in output order, and ``leaves`` the leaf names.

Calibration. Where the checkpoint carries temperatures (issue 21 fits one per level after
training), the exported probabilities are the calibrated ones: main logits / T_main, leaf logits
/ T_sub before the within-group softmax, as everywhere probabilities leave medhier. They are read
by :func:`temperatures_of` from ``task_meta["temperatures"]`` = ``{"main": T, "sub": T or [T per
main class]}``, checked by :mod:`medhier.classify.calibration`, which fitted them. Without them the
file says ``calibrated: false``.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from medhier.classify.calibration import Temperatures
from medhier.classify.model import HierarchicalResNet, predict
from medhier.classify.presets import eval_preset
from medhier.classify.report import P_LEAF, P_MAIN, PRED_LEAF, PRED_MAIN
from medhier.classify.taxonomy import Taxonomy
from medhier.config import StorageConfig
from medhier.infer.export import ExportError, ExportSpec
from medhier.io import storage
from medhier.io.dicom import DicomRejected
from medhier.io.image import decode_images
from medhier.train.checkpoint import Loaded

__all__ = ["ExportedClassifier", "export_samples", "export_spec", "temperatures_of"]

log = logging.getLogger(__name__)

OUTPUTS = {
    P_MAIN: "P(main class), in taxonomy order (metadata 'taxonomy')",
    P_LEAF: "P(leaf) = P(main) x P(sub | main), in the order of metadata 'leaves'",
    PRED_MAIN: "the predicted main class (index into the main classes)",
    PRED_LEAF: "the predicted leaf, inside the predicted main class (index into 'leaves')",
}


def temperatures_of(loaded: Loaded) -> Temperatures | None:
    """The checkpoint's calibration temperatures (:class:`medhier.classify.calibration.Temperatures`),
    or None when it has none. Raises ExportError for values that cannot be temperatures."""
    try:
        return Temperatures.from_meta(loaded.task_meta, f"checkpoint {loaded.uri!r}")
    except ValueError as exc:
        raise ExportError(str(exc)) from None


class ExportedClassifier(nn.Module):
    """uint8 (B, S, S) -> (p_main (B, M), p_leaf (B, L), pred_main (B,), pred_leaf (B,)): the
    graph the ONNX file holds (module docstring)."""

    def __init__(self, model: nn.Module, preset: nn.Module, taxonomy: Taxonomy, temperatures: Temperatures | None = None):
        super().__init__()
        self.model, self.preset, self.taxonomy = model, preset, taxonomy
        self.calibrated = temperatures is not None
        if temperatures is not None:
            if not isinstance(model, HierarchicalResNet):
                raise ExportError("temperatures are defined for the hierarchical head only; this checkpoint has the flat one")
            sub = torch.as_tensor(temperatures.sub, dtype=torch.float32).reshape(-1)
            if len(sub) not in (1, taxonomy.num_mains):
                raise ExportError(f"temperatures: 'sub' needs 1 or {taxonomy.num_mains} values (one per main class), got {len(sub)}")
            leaf_t = sub.expand(taxonomy.num_mains)[torch.as_tensor(taxonomy.leaf_main)]
            self.register_buffer("main_t", torch.tensor(float(temperatures.main)), persistent=False)
            self.register_buffer("leaf_t", leaf_t.clone(), persistent=False)
            # the biases added after dividing (zeros without them): calibration.temper's arithmetic
            for name, key, n in (("main_b", "main_bias", taxonomy.num_mains), ("leaf_b", "sub_bias", taxonomy.num_leaves)):
                bias = getattr(temperatures, key)
                if bias is not None and len(bias) != n:
                    raise ExportError(f"temperatures: {key!r} needs {n} values, got {len(bias)}")
                self.register_buffer(name, torch.tensor(bias if bias is not None else [0.0] * n, dtype=torch.float32), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.preset(images)
        if self.calibrated:
            main_logits, leaf_logits = self.model.logits(self.model.trunk(x))
            out = self.model.outputs(main_logits / self.main_t + self.main_b, leaf_logits / self.leaf_t + self.leaf_b)
        else:
            out = self.model(x)
        main, leaf = predict(out, self.taxonomy)
        return out.log_p_main.exp(), out.log_p_leaf.exp(), main, leaf


def export_spec(loaded: Loaded) -> ExportSpec:
    """The classifier checkpoint's :class:`ExportSpec` (graph, input, outputs, metadata)."""
    cfg = loaded.cfg
    taxonomy = Taxonomy.from_dict(**loaded.task_meta["taxonomy"])
    temperatures = temperatures_of(loaded)
    module = ExportedClassifier(loaded.model.float().eval(), eval_preset(cfg.preprocess), taxonomy, temperatures)
    size = cfg.preprocess.image_size
    public = cfg.to_public_dict()
    return ExportSpec(
        module=module,
        input_name="image",
        input_shape=(size, size),
        input_dtype=torch.uint8,
        input_meaning=f"one DICOM frame decoded by medhier (modality LUT, window, resize '{cfg.preprocess.resize}' to "
                      f"{size}x{size}, rounded to 0..255): see 'preprocessing'",
        output_names=(P_MAIN, P_LEAF, PRED_MAIN, PRED_LEAF),
        outputs=OUTPUTS,
        decisions=(PRED_MAIN, PRED_LEAF),
        metadata={
            "taxonomy": taxonomy.to_dict(),
            "leaves": list(taxonomy.leaf_names),
            "calibrated": "true" if temperatures is not None else "false",
            "temperatures": temperatures.to_dict() if temperatures is not None else None,
            "preprocessing": {
                "dicom": {k: v for k, v in public["dicom"].items() if k != "patient_salt"},
                "image_size": size,
                "resize": cfg.preprocess.resize,
                "in_graph": {"scale": "x / 255", "channels": 3, "mean": list(cfg.preprocess.mean), "std": list(cfg.preprocess.std)},
            },
            "arch": cfg.model.arch,
            "head": cfg.model.head,
        },
    )


def export_samples(loaded: Loaded, uri: str, n: int, storage_cfg: StorageConfig) -> tuple[np.ndarray, str]:
    """Up to ``n`` images (N, S, S) uint8 decoded with the checkpoint's own DICOM and resize
    settings: from the DICOM files under ``uri`` in listing order (files that do not decode are
    skipped), or from ``n`` phantom CT slices rendered in memory when ``uri`` is "" -> (images,
    where they came from)."""
    cfg = loaded.cfg
    size, mode = cfg.preprocess.image_size, cfg.preprocess.resize
    images: list[np.ndarray] = []
    if not uri:
        from medhier.synthetic import spine  # phantoms only when no archive is given: they render for seconds

        for spec in spine.plan_archive(n, seed=0, size=max(size, 64), compressed_fraction=0.0):
            images += decode_images(spec.encode(max(size, 64), 0.3), cfg.dicom, size, mode, source=spec.path)[1][:1]
        return np.stack(images), f"{len(images)} phantom CT slices"
    tried = 0
    for page in storage.list_objects(storage.normalize(uri), storage_cfg, exclude=cfg.data.exclude):
        for obj in page:
            tried += 1
            path = storage.join(storage.normalize(uri), obj.path)
            try:
                images += decode_images(storage.read_bytes(path, storage_cfg), cfg.dicom, size, mode, source=path)[1][:1]
            except DicomRejected as exc:
                log.info("export samples: %s skipped (%s)", path, exc)
            if len(images) >= n:
                return np.stack(images), f"the first {len(images)} decodable files of {uri}"
    if not images:
        raise ExportError(f"export samples: none of the {tried} files under {uri!r} decoded to an image")
    return np.stack(images), f"{len(images)} decodable files of {uri} (all it has)"
