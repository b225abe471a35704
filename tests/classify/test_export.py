"""The classifier's exported graph (medhier/classify/export.py): calibrated where the checkpoint
has temperatures, hierarchical always, and checked on images decoded as scoring decodes them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from medhier.classify.export import ExportedClassifier, export_samples, export_spec
from medhier.classify.presets import eval_preset
from medhier.classify.task import CLASSIFY, taxonomy_of
from medhier.config import load_config
from medhier.infer.export import ExportError, export_onnx
from medhier.synthetic import spine as synthetic
from medhier.train.checkpoint import load_checkpoint, save_checkpoint

SMOKE = str(Path(__file__).parents[2] / "configs" / "smoke.yaml")


def _loaded(tmp_path_factory, *overrides: str):
    cfg = load_config(SMOKE, ["preprocess.image_size=32", "model.head_channels=16", "model.hidden=16", *overrides])
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("ckpt"))
    save_checkpoint(path, CLASSIFY.build_model(cfg).eval(), cfg, CLASSIFY, epoch=0)
    return load_checkpoint(path, CLASSIFY)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return _loaded(tmp_path_factory)


def _with(loaded, temperatures):
    return dataclasses.replace(loaded, task_meta={**loaded.task_meta, "temperatures": temperatures})


@pytest.mark.parametrize("main_t,sub_t,biases", [
    (2.0, 0.5, {}),
    (0.7, [1.0, 3.0, 0.25], {}),
    (0.7, [1.0, 3.0, 0.25], {"main_bias": [0.5, -1.0, 0.5], "sub_bias": [0.0, 0.3, -0.3, -1.0, 1.0]}),
])
def test_temperatures_divide_each_levels_logits(loaded, main_t, sub_t, biases):
    spec = export_spec(_with(loaded, {"main": main_t, "sub": sub_t, **biases}))
    tax = taxonomy_of(loaded)
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32), dtype=np.uint8)
    model = loaded.model
    with torch.no_grad():
        p_main, p_leaf, pred_main, pred_leaf = spec.module(torch.from_numpy(images))
        main_logits, leaf_logits = model.logits(model.trunk(eval_preset(loaded.cfg.preprocess)(torch.from_numpy(images))))
        plain = model(eval_preset(loaded.cfg.preprocess)(torch.from_numpy(images)))
    sub = np.broadcast_to(np.asarray(sub_t, np.float32), (tax.num_mains,))[tax.leaf_main]
    main_b, leaf_b = (torch.tensor(biases.get(key, [0.0] * n)) for key, n in (("main_bias", tax.num_mains), ("sub_bias", tax.num_leaves)))
    torch.testing.assert_close(p_main, torch.softmax(main_logits / main_t + main_b, -1))
    for m in range(tax.num_mains):  # within each main class, the leaves' own softmax at their temperature, plus their biases
        group = np.flatnonzero(tax.leaf_main == m)
        want = torch.softmax(leaf_logits[:, group] / torch.from_numpy(sub[group]) + leaf_b[group], -1) * p_main[:, m : m + 1]
        torch.testing.assert_close(p_leaf[:, group], want)
    assert not torch.allclose(p_main, plain.log_p_main.exp(), atol=1e-4)  # calibration changed the probabilities
    torch.testing.assert_close(p_leaf.sum(-1), torch.ones(6))
    assert all(tax.leaf_main[leaf] == main for main, leaf in zip(pred_main.tolist(), pred_leaf.tolist()))  # hierarchical


def test_the_calibrated_file_agrees_with_pytorch_and_says_it_is_calibrated(loaded, tmp_path):
    main_t, sub_t = 0.7, [1.0, 3.0, 0.25]
    spec = export_spec(_with(loaded, {"main": main_t, "sub": sub_t}))
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32), dtype=np.uint8)
    out = tmp_path / "calibrated.onnx"
    result = export_onnx(spec, images, str(out), model_id=loaded.model_id, task="classify")
    meta = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert meta["calibrated"] == "true" and json.loads(meta["temperatures"]) == {"main": main_t, "sub": sub_t}
    assert result.decisions_equal == {"pred_main": 6, "pred_leaf": 6} and result.max_abs_diff["p_leaf"] < 1e-5
    assert "largest diff     p_main" in result.table()


@pytest.mark.parametrize("temperatures,message", [
    ({"main": 0.0, "sub": 1.0}, "finite and > 0"),
    ({"main": 1.0, "sub": [1.0, -2.0, 1.0]}, "finite and > 0"),
    ({"main": 1.0}, "must be {'main': T"),
    ({"main": "warm", "sub": 1.0}, "must be {'main': T"),
    ({"main": 1.0, "sub": [1.0, 2.0]}, "'sub' needs 1 or 3 values"),
    ({"main": 1.0, "sub": 1.0, "sub_bias": [0.0, 1.0]}, "'sub_bias' needs 5 values"),
])
def test_temperatures_that_cannot_be_are_refused(loaded, temperatures, message):
    with pytest.raises(ExportError, match=message):
        export_spec(_with(loaded, temperatures))


def test_the_flat_head_has_no_temperatures_to_apply(tmp_path_factory):
    flat = _loaded(tmp_path_factory, "model.head=flat")
    assert isinstance(export_spec(flat).module, ExportedClassifier)  # uncalibrated: exports
    with pytest.raises(ExportError, match="hierarchical head only"):
        export_spec(_with(flat, {"main": 1.5, "sub": 1.5}))


def test_samples_come_decoded_from_the_archive_skipping_what_does_not_decode(loaded, tmp_path):
    root = str(tmp_path / "archive")
    synthetic.generate_archive(root, 3, seed=2, size=64)
    broken = synthetic.add_broken_files(root, seed=2)
    images, source = export_samples(loaded, root, 10, loaded.cfg.storage)
    assert images.shape == (3, 32, 32) and images.dtype == np.uint8 and "3 decodable files" in source
    images, source = export_samples(loaded, root, 2, loaded.cfg.storage)
    assert images.shape == (2, 32, 32) and "first 2" in source
    phantoms, source = export_samples(loaded, "", 4, loaded.cfg.storage)
    assert phantoms.shape == (4, 32, 32) and phantoms.std() > 10 and source == "4 phantom CT slices"
    only_broken = tmp_path / "broken"
    only_broken.mkdir()
    for rel in broken:
        (only_broken / Path(rel).name).write_bytes((Path(root) / rel).read_bytes())
    with pytest.raises(ExportError, match=f"none of the {len(broken)} files under"):
        export_samples(loaded, str(only_broken), 4, loaded.cfg.storage)
