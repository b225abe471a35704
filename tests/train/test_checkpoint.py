"""Checkpoints: self-describing, content-addressed, safe to load from untrusted storage."""

from __future__ import annotations

import json
import os

import pytest
import torch

from medhier.classify.task import CLASSIFY, taxonomy_of
from medhier.classify.taxonomy import Taxonomy
from medhier.config import load_config
from medhier.io import storage
from medhier.train.checkpoint import CheckpointError, amend_checkpoint, built, config_for_checkpoint, load_checkpoint, model_id_of, save_checkpoint

OVERRIDES = ["model.arch=resnet18", "model.pretrained=none", "model.head_channels=16", "model.hidden=8",
             "preprocess.image_size=48", "dicom.windows.CT=bone", "dicom.patient_salt=never-stored",
             "taxonomy.classes={normal: [normal], lesion: [benign, malignant]}"]


@pytest.fixture()
def saved(tmp_path):
    cfg = load_config(None, OVERRIDES)
    tax = Taxonomy.from_config(cfg.taxonomy)
    torch.manual_seed(0)
    model = CLASSIFY.build_model(cfg).to(memory_format=torch.channels_last)
    directory = str(tmp_path / "ckpt")
    model_id = save_checkpoint(directory, model, cfg, CLASSIFY, epoch=3, metrics={"auc": torch.tensor(0.9), "nan": float("nan")})
    return cfg, tax, model, directory, model_id


def load(directory: str, storage_cfg=None):
    return load_checkpoint(directory, CLASSIFY, storage_cfg)


def test_round_trip_rebuilds_model_config_and_taxonomy(saved):
    cfg, tax, model, directory, model_id = saved
    loaded = load(directory)
    assert loaded.model_id == model_id == model_id_of(model.state_dict())
    assert taxonomy_of(loaded) == tax and loaded.epoch == 3 and loaded.task == "classify"
    assert loaded.model_sections == ("taxonomy", "dicom", "preprocess", "model")
    assert loaded.metrics == {"auc": pytest.approx(0.9), "nan": None}
    assert loaded.cfg.preprocess.image_size == 48 and loaded.cfg.dicom.windows == {"CT": "bone"}
    assert not loaded.model.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    x = torch.randn(2, 3, 48, 48)
    model.eval()
    torch.testing.assert_close(loaded.model(x).log_p_leaf, model(x).log_p_leaf)


def test_a_checkpoint_loaded_without_building_builds_the_same_model_once_when_asked(saved):
    """What a model actor with a cached compiled model does: read and verify, build nothing."""
    cfg, tax, model, directory, model_id = saved
    lazy = load_checkpoint(directory, CLASSIFY, build=False)
    assert lazy.model is None and lazy.model_id == model_id and taxonomy_of(lazy) == tax
    first = built(lazy, CLASSIFY)
    assert first is built(lazy, CLASSIFY) is lazy.model and lazy.state is None and not first.training
    x = torch.randn(2, 3, 48, 48)
    model.eval()
    torch.testing.assert_close(first(x).log_p_leaf, model(x).log_p_leaf)
    # the weights are verified when read, not when built
    raw = torch.load(os.path.join(directory, "model.pt"), weights_only=True)
    raw["model_state"][next(iter(raw["model_state"]))].add_(1.0)
    torch.save(raw, os.path.join(directory, "model.pt"))
    with pytest.raises(CheckpointError):
        load_checkpoint(directory, CLASSIFY, build=False)
    meta = json.loads(open(os.path.join(directory, "meta.json")).read())
    assert meta["model_id"] == model_id and meta["task"] == "classify"
    assert meta["task_meta"]["taxonomy"]["classes"]["lesion"] == ["benign", "malignant"]


def test_a_checkpoint_of_another_task_is_refused(saved):
    class Segmenter:
        name = "plaque-seg"

    with pytest.raises(CheckpointError, match="holds a 'classify' model, not a 'plaque-seg' one"):
        load_checkpoint(saved[3], Segmenter())


def test_a_format_1_checkpoint_of_medhier_0_1_still_loads(saved):
    """Checkpoints written before they named their task: the classifier's, taxonomy at the top."""
    _, tax, model, directory, model_id = saved
    path = os.path.join(directory, "model.pt")
    data = torch.load(path, weights_only=True)
    old = {k: v for k, v in data.items() if k not in ("task", "model_sections", "task_meta")}
    torch.save({**old, "format": 1, "taxonomy": data["task_meta"]["taxonomy"]}, path)
    loaded = load(directory)
    assert loaded.model_id == model_id and taxonomy_of(loaded) == tax and loaded.task == "classify"
    assert loaded.model_sections == ("taxonomy", "dicom", "preprocess", "model")


def test_the_patient_salt_never_enters_a_checkpoint(saved):
    cfg, _, _, directory, _ = saved
    for name in os.listdir(directory):
        assert b"never-stored" not in open(os.path.join(directory, name), "rb").read()
    assert load(directory).cfg.dicom.patient_salt == ""


def test_model_id_depends_only_on_the_weights(saved):
    _, _, model, _, model_id = saved
    state = {k: v.contiguous() for k, v in model.state_dict().items()}  # memory layout is not content
    assert model_id_of(state) == model_id
    state["main_out.bias"] = state["main_out.bias"] + 1
    assert model_id_of(state) != model_id


def test_corrupted_or_foreign_files_are_refused(saved, tmp_path):
    _, _, _, directory, _ = saved
    path = os.path.join(directory, "model.pt")
    data = torch.load(path, weights_only=True)
    data["model_state"]["main_out.bias"] += 1
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="do not match their recorded model_id"):
        load(directory)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    evil = tmp_path / "evil"
    evil.mkdir()
    with open(evil / "model.pt", "wb") as f:
        torch.save({"format": 1, "payload": Evil()}, f)
    with pytest.raises(CheckpointError, match="not a medhier checkpoint"):
        load(str(evil))  # weights_only refuses to run the pickled call
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load(str(tmp_path / "nowhere"))


def test_run_config_takes_model_sections_from_the_checkpoint(saved):
    _, _, _, directory, _ = saved
    user = load_config(None, ["preprocess.image_size=224", "dicom.patient_salt=site", "data.decode_batch_size=7"])
    run = config_for_checkpoint(user, load(directory))
    assert run.preprocess.image_size == 48 and run.model.arch == "resnet18"  # from the checkpoint
    assert run.data.decode_batch_size == 7 and run.dicom.patient_salt == "site"  # from the user


FITTED = {"task_meta": {"temperatures": {"main": 1.7, "sub": 0.8}}, "defaults": {"score": {"refer_below": 0.62}},
          "profile": {"images": 10, "features": {}}}


def test_amending_adds_what_was_fitted_and_keeps_the_weights(saved):
    _, tax, _, directory, model_id = saved
    amend_checkpoint(directory, **FITTED)
    loaded = load(directory)
    assert loaded.model_id == model_id and taxonomy_of(loaded) == tax  # the task's own meta is kept
    assert loaded.task_meta["temperatures"] == {"main": 1.7, "sub": 0.8}
    assert loaded.defaults == {"score": {"refer_below": 0.62}} and loaded.profile == FITTED["profile"]
    meta = json.loads(open(os.path.join(directory, "meta.json")).read())
    assert meta["task_meta"]["temperatures"]["main"] == 1.7 and meta["defaults"]["score"]["refer_below"] == 0.62
    assert "model_state" not in meta


@pytest.mark.parametrize("edit", [
    lambda d: d["task_meta"]["temperatures"].update(main=1.0),
    lambda d: d["defaults"]["score"].update(refer_below=0.0),
    lambda d: d["profile"].update(images=11),
])
def test_an_edited_amendment_is_refused(saved, edit):
    directory = saved[3]
    amend_checkpoint(directory, **FITTED)
    path = os.path.join(directory, "model.pt")
    data = torch.load(path, weights_only=True)
    edit(data)
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="meta_sha256"):
        load(directory)


@pytest.mark.parametrize("user, refer_below", [
    ([], 0.62),  # left null: the checkpoint's
    (["score.refer_below=0.9"], 0.9),  # the user's choice wins
    (["score.refer_below=0"], 0.0),
])
def test_a_null_setting_takes_the_checkpoint_default(saved, user, refer_below):
    directory = saved[3]
    amend_checkpoint(directory, **FITTED)
    assert config_for_checkpoint(load_config(None, user), load(directory)).score.refer_below == refer_below


@pytest.mark.s3
def test_checkpoint_from_s3(saved, s3_bucket, storage_cfg):
    _, _, _, directory, model_id = saved
    for name in os.listdir(directory):
        storage.write_bytes(f"{s3_bucket}/run/best/{name}", open(os.path.join(directory, name), "rb").read(), storage_cfg)
    assert load(f"{s3_bucket}/run/best", storage_cfg).model_id == model_id
    amend_checkpoint(f"{s3_bucket}/run/best", storage_cfg, **FITTED)
    assert load(f"{s3_bucket}/run/best", storage_cfg).task_meta["temperatures"]["sub"] == 0.8
