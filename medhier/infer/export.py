"""A checkpoint as a portable ONNX file, checked against PyTorch before it is written.

    checkpoint ──task.export_spec──▶ graph (preprocessing + model + the task's outputs)
               ──torch.onnx──▶ ONNX ──onnxruntime on sample inputs, against PyTorch──▶ FILE

The task hands the platform what to export (:class:`ExportSpec`): a module from the raw model
input (the classifier: uint8 images as medhier's decode makes them) to named outputs, the shape
of one sample, which integer outputs are decisions (the classifier's predicted leaf) and the
metadata the file carries. The platform exports it with a dynamic batch axis, runs the ONNX
graph in onnxruntime on the task's sample inputs (as one batch, and the first sample alone),
compares every output with the PyTorch module's and refuses to write the file when a decision
differs on any sample or a float output differs by more than the spec's tolerance. The largest
difference per output is stated in the result and stored in the file's metadata.

File metadata (ONNX ``metadata_props``, read with
``onnxruntime.InferenceSession(f).get_modelmeta().custom_metadata_map``); values are strings,
JSON where structured:

==================  ===============================================================
key                 value
==================  ===============================================================
``model_id``        the checkpoint's content hash (as in reports and ledgers)
``task``            the checkpoint's task (``classify``)
``medhier_version`` the exporting medhier
``input``           JSON: name, dtype, shape with ``batch`` for the dynamic axis, meaning
``outputs``         JSON: per output name its dtype, shape and meaning
``check``           JSON: samples, largest difference per float output, decisions equal
...                 the task's own (the classifier: ``taxonomy``, ``preprocessing``,
                    ``calibrated``)
==================  ===============================================================

onnx and onnxruntime are an optional extra: ``pip install 'medhier[export]'`` (``dev`` pulls it
in). The graph is traced by torch's TorchScript-based exporter (``dynamo=False``): the newer
torch.export-based one needs onnxscript, which this extra does not install.
"""

from __future__ import annotations

import io
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from medhier import __version__
from medhier.config import Config, StorageConfig
from medhier.io import storage
from medhier.train.checkpoint import Loaded, ModelTask, load_checkpoint

__all__ = ["OPSET", "ExportError", "ExportResult", "ExportSpec", "ExportTask", "export_checkpoint", "export_onnx"]

log = logging.getLogger(__name__)

# ONNX opset 17: every onnxruntime since 1.11 and the common TensorRT/OpenVINO releases run it,
# and it has every operator the models here use.
OPSET = 17
EXTRA = "pip install 'medhier[export]'"


class ExportError(ValueError):
    """An export that cannot be made, or whose ONNX graph disagrees with PyTorch; the message
    says which input or output and by how much."""


@dataclass(frozen=True)
class ExportSpec:
    """What a task hands the platform to export one model.

    ``module``: one input batch (``input_dtype``, shape (B, *input_shape)) -> a tuple of tensors
    in ``output_names`` order, each with the batch first; preprocessing belongs inside, so the
    file takes what medhier's decode produces. ``decisions``: integer outputs that must be equal
    in onnxruntime and PyTorch for every sample; every float output may differ by at most
    ``tolerance``. ``outputs``: a sentence per output for the file's metadata; ``metadata``:
    the task's own entries (JSON-able values)."""

    module: nn.Module
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    input_meaning: str
    output_names: tuple[str, ...]
    outputs: dict[str, str]
    decisions: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    tolerance: float = 1e-4


class ExportTask(ModelTask, Protocol):
    """A task whose models export (:func:`export_checkpoint`)."""

    def export_spec(self, loaded: Loaded) -> ExportSpec:
        """What to export of a loaded checkpoint."""

    def export_samples(self, loaded: Loaded, uri: str, n: int, storage_cfg: StorageConfig) -> tuple[np.ndarray, str]:
        """Up to ``n`` sample inputs (N, *input_shape) to check the export on, from ``uri`` (an
        archive; "" for the task's own phantoms) -> (samples, where they came from, in words)."""


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how the file compared with PyTorch."""

    output: str
    model_id: str
    bytes: int
    samples: int
    sample_source: str
    max_abs_diff: dict[str, float]  # per float output, largest |onnxruntime - PyTorch| over samples and elements
    decisions_equal: dict[str, int]  # per decision output, samples on which onnxruntime and PyTorch agree
    batch_sizes: list[int]  # the batch sizes onnxruntime ran (the dynamic axis, checked)
    opset: int = OPSET
    seconds: float = 0.0

    def table(self) -> str:
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in self.max_abs_diff.items())
        same = ", ".join(f"{k} on {v} of {self.samples}" for k, v in self.decisions_equal.items())
        return "\n".join([
            f"onnx file        {self.output}  ({self.bytes / 1e6:,.1f} MB, opset {self.opset}, model {self.model_id})",
            f"checked on       {self.samples} samples ({self.sample_source}), batches of {' and '.join(map(str, self.batch_sizes))}",
            f"same decision    {same}",
            f"largest diff     {diffs}  (onnxruntime against PyTorch)",
            f"wall time        {self.seconds:,.1f} s",
        ])


def _onnx_modules():
    """(onnx, onnxruntime), or an error naming the extra that installs them."""
    try:
        import onnx  # optional extra: only `medhier export` needs it
        import onnxruntime
    except ImportError as exc:
        raise ExportError(f"ONNX export needs onnx and onnxruntime ({exc.name} is missing): {EXTRA}") from None
    return onnx, onnxruntime


def export_checkpoint(cfg: Config, checkpoint: str, output: str, task: ExportTask, *, samples: str = "", n_samples: int = 32,
                      fmt: str = "onnx") -> ExportResult:
    """``medhier export``: the checkpoint's model as an ONNX file at ``output`` (local or s3://),
    checked on up to ``n_samples`` inputs the task takes from ``samples`` (an archive URI; ""
    for its phantoms). Raises :class:`ExportError` when the check fails; nothing is written then."""
    if fmt != "onnx":
        raise ExportError(f"export format {fmt!r} is not supported; the one format is onnx")
    if n_samples < 1:
        raise ExportError(f"export: need at least one sample to check the file on, got {n_samples}")
    _onnx_modules()  # before loading anything: a missing extra should fail in a second
    loaded = load_checkpoint(checkpoint, task, cfg.storage)
    inputs, source = task.export_samples(loaded, samples, n_samples, cfg.storage)
    return export_onnx(task.export_spec(loaded), inputs, output, cfg.storage, model_id=loaded.model_id, task=loaded.task,
                       sample_source=source)


def export_onnx(spec: ExportSpec, samples: np.ndarray, output: str, storage_cfg: StorageConfig | None = None, *, model_id: str,
                task: str, sample_source: str = "given", opset: int = OPSET) -> ExportResult:
    """Export ``spec.module`` to ONNX with a dynamic batch axis, check it against PyTorch on
    ``samples`` (N, *spec.input_shape) and write it to ``output`` -> what was written and the
    comparison. Raises :class:`ExportError` (nothing written) when the check fails."""
    onnx, ort = _onnx_modules()
    started = time.perf_counter()
    samples = _check_samples(spec, samples)
    module = spec.module.eval()
    example = torch.from_numpy(samples[: min(2, len(samples))])
    buffer = io.BytesIO()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter says it is deprecated for the torch.export one (see the docstring);
        # its tracer warns about Python values it folds into constants, which are constants here
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=opset, input_names=[spec.input_name],
                          output_names=list(spec.output_names),
                          dynamic_axes={name: {0: "batch"} for name in (spec.input_name, *spec.output_names)})
    proto = onnx.load_model_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        reference = [t.detach().cpu().numpy() for t in module(torch.from_numpy(samples))]
    batches = sorted({len(samples), 1}, reverse=True)
    runs = {b: session.run(list(spec.output_names), {spec.input_name: samples[:b]}) for b in batches}
    diffs, equal = _compare(spec, reference, runs)
    result = ExportResult(output, model_id, 0, len(samples), sample_source, diffs, equal, batches, opset)

    meta = {
        "model_id": model_id,
        "task": task,
        "medhier_version": __version__,
        "input": {"name": spec.input_name, "dtype": str(spec.input_dtype).removeprefix("torch."),
                  "shape": ["batch", *spec.input_shape], "meaning": spec.input_meaning},
        "outputs": {name: {"dtype": str(ref.dtype), "shape": ["batch", *ref.shape[1:]], "meaning": spec.outputs.get(name, "")}
                    for name, ref in zip(spec.output_names, reference)},
        "check": {"samples": len(samples), "source": sample_source, "max_abs_diff": diffs, "decisions_equal": equal,
                  "batch_sizes": batches, "onnxruntime": ort.__version__, "torch": torch.__version__},
        **spec.metadata,
    }
    onnx.helper.set_model_props(proto, {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items() if v is not None})
    proto.doc_string = f"medhier {task} model {model_id}: see metadata_props"
    data = proto.SerializeToString()
    storage.write_bytes(output, data, storage_cfg)
    result.bytes, result.seconds = len(data), time.perf_counter() - started
    log.info("export: %s", asdict(result))
    return result


def _check_samples(spec: ExportSpec, samples: np.ndarray) -> np.ndarray:
    samples = np.ascontiguousarray(samples)
    want = torch.empty(0, dtype=spec.input_dtype).numpy().dtype
    if samples.ndim != 1 + len(spec.input_shape) or tuple(samples.shape[1:]) != tuple(spec.input_shape) or not len(samples):
        raise ExportError(f"export samples: expected shape (N >= 1, {', '.join(map(str, spec.input_shape))}), got {samples.shape}")
    if samples.dtype != want:
        raise ExportError(f"export samples: expected {want}, got {samples.dtype}")
    return samples


def _compare(spec: ExportSpec, reference: list[np.ndarray], runs: dict[int, list[np.ndarray]]) -> tuple[dict[str, float], dict[str, int]]:
    """onnxruntime's outputs for every batch size against PyTorch's -> (largest difference per
    float output, samples with equal decisions per decision output); raises ExportError when a
    decision differs or a difference exceeds the tolerance."""
    diffs: dict[str, float] = {}
    equal: dict[str, int] = {}
    problems = []
    for i, name in enumerate(spec.output_names):
        ref = reference[i]
        for b, outs in runs.items():
            got = outs[i]
            if got.shape != ref[:b].shape:
                raise ExportError(f"export check: output {name!r} has shape {got.shape} in onnxruntime for a batch of {b}, "
                                  f"{ref[:b].shape} in PyTorch")
            if name in spec.decisions:
                same = (got == ref[:b]).reshape(b, -1).all(axis=1)
                if b == len(ref):
                    equal[name] = int(same.sum())
                if not same.all():
                    problems.append(f"{name} differs on {int((~same).sum())} of {b} samples (first: sample {int(np.flatnonzero(~same)[0])}) "
                                    f"in a batch of {b}")
            elif np.issubdtype(ref.dtype, np.floating):
                diff = float(np.abs(got.astype(np.float64) - ref[:b]).max()) if ref.size else 0.0
                diffs[name] = max(diffs.get(name, 0.0), diff)
    for name, diff in diffs.items():
        if diff > spec.tolerance:
            problems.append(f"{name} differs by up to {diff:.3g} (tolerance {spec.tolerance:g})")
    if problems:
        raise ExportError("export check: onnxruntime disagrees with PyTorch, the file was not written: " + "; ".join(problems))
    return diffs, equal
