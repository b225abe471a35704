"""The hierarchical ResNet: shapes, probabilities, coherence, freezing, pretrained weights, loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision

from medhier.config import ModelConfig, TaxonomyConfig
from medhier.classify.model import STAGES, HierarchicalLoss, PretrainedWeightsError, build_model, predict
from medhier.classify.taxonomy import Taxonomy

TAX = Taxonomy.from_config(TaxonomyConfig())
SMALL = dict(arch="resnet18", pretrained="none", head_channels=32, hidden=16)


def _model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**SMALL, **kw}), TAX)


@pytest.mark.parametrize("head", ["hierarchical", "flat"])
@pytest.mark.parametrize("attention", ["self", "cbam", "none"])
def test_shapes_and_probabilities(head, attention):
    model = _model(head=head, attention=attention).eval()
    with torch.no_grad():
        out = model(torch.randn(5, 3, 64, 64))
    assert out.log_p_main.shape == (5, TAX.num_mains) and out.log_p_leaf.shape == (5, TAX.num_leaves)
    torch.testing.assert_close(out.log_p_main.exp().sum(-1), torch.ones(5))
    torch.testing.assert_close(out.log_p_leaf.exp().sum(-1), torch.ones(5))
    # P(sub | main) sums to 1 within every main class, and P(leaf) = P(main) * P(sub | main)
    groups = torch.as_tensor(TAX.leaf_mask, dtype=torch.float32)
    torch.testing.assert_close(out.log_p_sub.exp() @ groups.T, torch.ones(5, TAX.num_mains))
    torch.testing.assert_close(out.log_p_leaf.exp() @ groups.T, out.log_p_main.exp())


def test_predictions_are_coherent_on_random_inputs():
    model = _model().eval()
    torch.manual_seed(1)
    with torch.no_grad():
        out = model(torch.randn(64, 3, 64, 64) * 3)
    # random heads too: perturb outputs so that leaf argmax and main argmax often disagree
    for trial in range(20):
        g = torch.Generator().manual_seed(trial)
        main_logits = torch.randn(64, 3, generator=g) * 2
        leaf_logits = torch.randn(64, 5, generator=g) * 4
        out.log_p_main = torch.log_softmax(main_logits, -1)
        out.log_p_sub = model._within_group_log_softmax(leaf_logits)
        out.log_p_leaf = out.log_p_main[:, model.leaf_main] + out.log_p_sub
        main, leaf = predict(out, TAX)
        assert torch.equal(torch.as_tensor(TAX.leaf_main)[leaf], main)


@pytest.mark.parametrize("depth", range(5))
def test_finetune_depth_freezes_the_lower_stages(depth):
    model = _model(finetune_depth=depth)
    model.train()
    trainable = [s for s in STAGES if all(p.requires_grad for p in getattr(model.trunk, s).parameters())]
    assert trainable == list(STAGES[len(STAGES) - depth:])
    assert all(p.requires_grad for p in model.trunk.stem.parameters()) == (depth == 4)
    for name in STAGES:
        bns = [m for m in getattr(model.trunk, name).modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert all(bn.training == (name in trainable) for bn in bns)  # frozen BN keeps its statistics
    heads = [p for n, p in model.named_parameters() if not n.startswith("trunk.")]
    assert heads and all(p.requires_grad for p in heads)
    groups = model.param_groups(1e-4, 1e-3, 0.0)
    assert {g["name"] for g in groups} == ({"heads", "backbone"} if depth else {"heads"})
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_frozen_stage_weights_and_statistics_do_not_change_in_training():
    model = _model(finetune_depth=1)
    before = {k: v.clone() for k, v in model.trunk.layer1.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    out = model(torch.randn(4, 3, 64, 64))
    HierarchicalLoss(TAX)(out, torch.tensor([0, 1, 2, 1]), torch.tensor([0, 2, 4, 1]))["loss"].backward()
    opt.step()
    for k, v in model.trunk.layer1.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_pretrained_weights_from_a_file_load_exactly(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(ModelConfig(**{**SMALL, "pretrained": str(path)}), TAX)
    ours = model.trunk.state_dict()
    names = {"stem.0.weight": "conv1.weight", "stem.1.running_mean": "bn1.running_mean", "layer3.1.conv2.weight": "layer3.1.conv2.weight"}
    for mine, theirs in names.items():
        torch.testing.assert_close(ours[mine], reference.state_dict()[theirs], rtol=0, atol=0)
    for key, value in reference.state_dict().items():
        if not key.startswith(("fc.", "conv1.", "bn1.")):
            assert torch.equal(ours[key], value), key


@pytest.mark.s3
def test_pretrained_weights_from_s3(s3_bucket, storage_cfg, tmp_path):
    from medhier.io import storage

    reference = torchvision.models.resnet18(weights=None)
    local = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, local)
    uri = f"{s3_bucket}/weights/resnet18.pth"
    storage.write_bytes(uri, local.read_bytes(), storage_cfg)
    model = build_model(ModelConfig(**{**SMALL, "pretrained": uri}), TAX, storage_cfg)
    assert torch.equal(model.trunk.layer4[0].conv1.weight, reference.layer4[0].conv1.weight)


def test_pretrained_errors_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # nothing cached
    with pytest.raises(PretrainedWeightsError, match=r"model.pretrained=/path/to/resnet18-.*\.pth"):
        build_model(ModelConfig(**{**SMALL, "pretrained": "imagenet"}), TAX)
    with pytest.raises(PretrainedWeightsError, match="not found"):
        build_model(ModelConfig(**{**SMALL, "pretrained": str(tmp_path / "missing.pth")}), TAX)
    wrong = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), wrong)
    with pytest.raises(PretrainedWeightsError, match="does not fit resnet18"):
        build_model(ModelConfig(**{**SMALL, "pretrained": str(wrong)}), TAX)


def _outputs(main_logits, leaf_logits):
    model = _model()
    log_p_main = torch.log_softmax(main_logits, -1)
    log_p_sub = model._within_group_log_softmax(leaf_logits)
    from medhier.classify.model import Outputs

    return Outputs(main_logits, log_p_main, log_p_sub, log_p_main[:, model.leaf_main] + log_p_sub)


def test_loss_is_main_ce_plus_conditional_sub_ce():
    main_logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
    leaf_logits = torch.tensor([[0.3, 1.0, -1.0, 0.2, 0.1], [0.0, 2.0, 0.5, -0.5, 0.0]])
    out = _outputs(main_logits, leaf_logits)
    main_label, leaf_label = torch.tensor([0, 1]), torch.tensor([0, 2])  # normal/normal, fracture/burst
    losses = HierarchicalLoss(TAX, sub_weight=0.5)(out, main_label, leaf_label)
    ce_main = -(torch.log_softmax(main_logits, -1)[[0, 1], [0, 1]]).mean()
    # sample 0: normal has one subclass -> -log 1 = 0; sample 1: burst among {compression, burst}
    ce_sub = (0.0 - math.log(math.exp(0.5) / (math.exp(2.0) + math.exp(0.5)))) / 2
    torch.testing.assert_close(losses["main"], ce_main)
    torch.testing.assert_close(losses["sub"], torch.tensor(ce_sub))
    torch.testing.assert_close(losses["loss"], ce_main + 0.5 * ce_sub)


def test_class_weights_and_smoothing_change_the_loss_as_documented():
    main_logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
    leaf_logits = torch.tensor([[0.3, 1.0, -1.0, 0.2, 0.1], [0.0, 2.0, 0.5, -0.5, 0.0]])
    out = _outputs(main_logits, leaf_logits)
    main_label, leaf_label = torch.tensor([0, 1]), torch.tensor([0, 2])
    weighted = HierarchicalLoss(TAX, main_class_weights=np.array([1.0, 3.0, 1.0]))(out, main_label, leaf_label)
    per_sample = -torch.log_softmax(main_logits, -1)[[0, 1], [0, 1]]
    torch.testing.assert_close(weighted["main"], (per_sample[0] + 3 * per_sample[1]) / 4)
    smooth = HierarchicalLoss(TAX, label_smoothing=0.2)(out, main_label, leaf_label)
    plain = HierarchicalLoss(TAX)(out, main_label, leaf_label)
    assert not torch.isclose(smooth["loss"], plain["loss"])
    with pytest.raises(ValueError, match="expected 3 values"):
        HierarchicalLoss(TAX, main_class_weights=np.ones(4))


def test_flat_loss_is_leaf_cross_entropy():
    model = _model(head="flat").eval()
    out = model(torch.randn(3, 3, 64, 64))
    leaf = torch.tensor([0, 3, 4])
    loss = HierarchicalLoss(TAX, flat=True)(out, torch.as_tensor(TAX.leaf_main)[leaf], leaf)["loss"]
    torch.testing.assert_close(loss, -out.log_p_leaf[[0, 1, 2], leaf].mean())


def test_channels_last_and_bf16_forward_match_fp32():
    model = _model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x).log_p_leaf.exp()
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last)).log_p_leaf.exp()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = model(x).log_p_leaf.exp()
    torch.testing.assert_close(cl, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(bf, ref, atol=0.05, rtol=0)
