"""ONNX export (medhier/infer/export.py): the file computes what PyTorch and the scorer compute,
carries its metadata, takes any batch size, and is not written when it disagrees."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from medhier.classify.report import P_LEAF, P_MAIN, PRED_LEAF, PRED_MAIN
from medhier.classify.task import CLASSIFY, taxonomy_of
from medhier.cli import EXIT_USAGE, main
from medhier.config import load_config
from medhier.infer.actor import ActorSettings, ModelActor
from medhier.infer.export import ExportError, ExportSpec, export_checkpoint, export_onnx
from medhier.io.image import decode_images
from medhier.synthetic import spine as synthetic
from medhier.train.checkpoint import load_checkpoint
from tests.fitted import fitted_checkpoint

SMOKE = str(Path(__file__).parents[2] / "configs" / "smoke.yaml")
CFG = load_config(SMOKE, ["model.head_channels=16", "model.hidden=16"])
N = 16


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("export-archive"))
    synthetic.generate_archive(root, N, seed=4, size=64, compressed_fraction=0.3)
    synthetic.add_broken_files(root, seed=4)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, archive) -> str:
    """Fitted a little, so that images get different answers and "same leaf" means something."""
    return fitted_checkpoint(str(tmp_path_factory.mktemp("export-ckpt")), CFG, archive, seed=0, steps=10, epoch=3)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoint, archive) -> str:
    """The file ``medhier export`` wrote."""
    out = str(tmp_path_factory.mktemp("export-out") / "model.onnx")
    code = main(["export", "--checkpoint", checkpoint, "--format", "onnx", "--output", out, "--samples", archive, "--n-samples", "12",
                 "model.arch=resnet50"])  # overrides never change what a checkpoint is
    assert code == 0
    return out


def _images(archive: str, n: int) -> np.ndarray:
    """Images the export check did not see: the archive's last ``n`` phantoms, decoded as scoring does."""
    files = sorted(Path(archive).rglob("IM*.dcm"))[-n:]
    return np.stack([decode_images(f.read_bytes(), CFG.dicom, CFG.preprocess.image_size)[1][0] for f in files])


def test_the_file_answers_what_the_scorer_answers_for_any_batch(exported, checkpoint, archive):
    path = exported
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    images = _images(archive, 5)
    actor = ModelActor(CLASSIFY, checkpoint, CFG.storage, ActorSettings(precision="fp32", channels_last=False, batch_size=8))
    want = actor.predict_images(images)  # what the Parquet report, the SR and serve say
    names = [P_MAIN, P_LEAF, PRED_MAIN, PRED_LEAF]
    for batch in ([images], [images[:1], images[1:3], images[3:]]):  # 5 at once; then 1, 2 and 2: the batch axis is dynamic
        got = {k: np.concatenate(v) for k, v in zip(names, zip(*(session.run(names, {"image": b}) for b in batch)))}
        np.testing.assert_array_equal(got[PRED_LEAF], want[PRED_LEAF])
        np.testing.assert_array_equal(got[PRED_MAIN], want[PRED_MAIN])
        np.testing.assert_allclose(got[P_LEAF], want[P_LEAF], atol=1e-5)
        np.testing.assert_allclose(got[P_MAIN], want[P_MAIN], atol=1e-5)
    assert len(set(want[PRED_LEAF].tolist())) >= 2  # a fitted model: the images do not all get one answer


def test_the_file_says_which_model_classes_and_preprocessing_it_holds(exported, checkpoint):
    path = exported
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    loaded = load_checkpoint(checkpoint, CLASSIFY)
    tax = taxonomy_of(loaded)
    assert meta["model_id"] == loaded.model_id and meta["task"] == "classify" and meta["arch"] == "resnet18"
    assert json.loads(meta["leaves"]) == list(tax.leaf_names)
    assert json.loads(meta["taxonomy"]) == tax.to_dict()
    assert meta["calibrated"] == "false" and "temperatures" not in meta
    pre = json.loads(meta["preprocessing"])
    assert pre["image_size"] == 64 and pre["resize"] == "pad" and pre["dicom"]["windows"] == {"CT": "bone"}
    assert "patient_salt" not in pre["dicom"]
    assert json.loads(meta["input"])["shape"] == ["batch", 64, 64] and json.loads(meta["input"])["dtype"] == "uint8"
    assert json.loads(meta["outputs"])[P_LEAF]["shape"] == ["batch", tax.num_leaves]
    check = json.loads(meta["check"])
    assert check["samples"] == 12 and check["decisions_equal"] == {PRED_MAIN: 12, PRED_LEAF: 12}
    assert 0 <= check["max_abs_diff"][P_LEAF] < 1e-5 and check["batch_sizes"] == [12, 1]
    assert [i.shape for i in session.get_inputs()] == [["batch", 64, 64]]


class _Noisy(nn.Module):
    """A graph that cannot agree with itself: its output draws random numbers."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.softmax(x.float().flatten(1) + torch.rand(x.shape[0], 4 * 4), -1)
        return p, p.argmax(-1)


def _spec(module: nn.Module) -> ExportSpec:
    return ExportSpec(module, "x", (4, 4), torch.uint8, "test input", ("p", "pred"), {}, ("pred",))


@pytest.mark.parametrize("case,samples,message", [
    ("disagrees", np.zeros((8, 4, 4), np.uint8), "disagrees with PyTorch, the file was not written: pred differs on"),
    ("wrong shape", np.zeros((3, 4, 5), np.uint8), r"expected shape \(N >= 1, 4, 4\), got \(3, 4, 5\)"),
    ("wrong dtype", np.zeros((3, 4, 4), np.float32), "expected uint8, got float32"),
    ("no samples", np.zeros((0, 4, 4), np.uint8), "expected shape"),
])
def test_a_file_that_fails_its_check_is_not_written(tmp_path, case, samples, message):
    out = tmp_path / "x.onnx"
    with pytest.raises(ExportError, match=message):
        export_onnx(_spec(_Noisy()), samples, str(out), model_id="m", task="t")
    assert not out.exists()


def test_without_the_extra_the_error_names_it(monkeypatch, checkpoint, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if `pip install medhier` ran without [export]
    with pytest.raises(ExportError, match=r"onnxruntime is missing\): pip install 'medhier\[export\]'"):
        export_checkpoint(CFG, checkpoint, str(tmp_path / "m.onnx"), CLASSIFY)
    assert main(["export", "--checkpoint", checkpoint, "--output", str(tmp_path / "m.onnx")]) == EXIT_USAGE
    assert "medhier[export]" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()
