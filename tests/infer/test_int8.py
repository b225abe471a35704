"""int8 scoring's building blocks (medhier/int8.py): the quantized model computes what the fp32
one does, within int8's error, for every head; and a model that disagrees is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medhier.config import ConfigError, ModelConfig, TaxonomyConfig, load_config
from medhier.classify.model import _CBAM, build_model, predict, untie_shared_modules
from medhier.infer.int8 import Int8AgreementError, _batches, agreement, check_agreement, quantize
from medhier.classify.task import CLASSIFY
from medhier.classify.taxonomy import Taxonomy

TAX = Taxonomy.from_config(TaxonomyConfig())


def _model(arch: str = "resnet18", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, pretrained="none", head_channels=32, hidden=16, **kw), TAX).eval()
    # Random BatchNorm statistics, so that a block that drops or repeats a ReLU shows in the output
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_untied_modules_compute_the_same_function(arch):
    model = _model(arch, attention="cbam")
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        before = model(x).log_p_leaf
        untie_shared_modules(model)
        after = model(x).log_p_leaf
    blocks = [m for m in model.modules() if hasattr(m, "relu_a")]
    assert len(blocks) == (8 if arch == "resnet18" else 16)  # every residual block
    assert sum(isinstance(m, _CBAM) for m in model.modules()) == 2  # both heads' CBAM
    # the blocks are bit-identical; CBAM's one MLP call on two poolings may round differently
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def _predictions(out) -> dict[str, np.ndarray]:
    main, leaf = predict(out, TAX)
    return {"p_leaf": out.log_p_leaf.exp().numpy(), "pred_main": main.numpy(), "pred_leaf": leaf.numpy()}


@pytest.mark.parametrize("head,attention", [("hierarchical", "self"), ("hierarchical", "cbam"), ("hierarchical", "none"), ("flat", "none")])
def test_the_quantized_graph_matches_fp32_for_every_head(head, attention):
    """The converted graph (quantize/dequantize around fp32 operators: the arithmetic of the int8
    kernels, without compiling them) against the fp32 model on inputs it was not calibrated on."""
    model = _model(head=head, attention=attention)
    torch.manual_seed(1)
    calibration, held_out = torch.randn(12, 3, 64, 64), torch.randn(8, 3, 64, 64)
    q = quantize(model, calibration, batch_size=8, prepare=untie_shared_modules)
    targets = [str(n.target) for n in q.compiled.graph.nodes if n.op == "call_function"]
    layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    assert targets.count("quantized_decomposed.dequantize_per_channel.default") == layers  # every weight is int8
    assert "quantized_decomposed.quantize_per_tensor.default" in targets  # and activations
    with torch.no_grad():
        ref, out = model(held_out), q(held_out)
    assert not torch.equal(out.log_p_leaf, ref.log_p_leaf)  # int8 arithmetic, not the fp32 model passed through
    groups = torch.as_tensor(TAX.leaf_mask, dtype=torch.float32)
    torch.testing.assert_close(out.log_p_leaf.exp().sum(-1), torch.ones(8))
    torch.testing.assert_close(out.log_p_leaf.exp() @ groups.T, out.log_p_main.exp())  # still hierarchical
    # 8-bit activations over a calibrated range: measured 0.0002-0.013 in probability and
    # 0.6-1.3 % of the largest logit across the four heads
    assert (out.log_p_leaf.exp() - ref.log_p_leaf.exp()).abs().max() < 0.03
    assert (out.main_logits - ref.main_logits).abs().max() < 0.05 * ref.main_logits.abs().max()
    with pytest.raises(ValueError, match="exactly 8"):
        q(held_out[:5])
    # the fp32 model is left as it was
    assert not any(hasattr(m, "relu_a") for m in model.modules())


def test_calibration_batches_repeat_images_to_fill_the_last_batch():
    images = torch.arange(10).view(10, 1, 1, 1).float()
    batches = _batches(images, 4)
    assert [b.shape[0] for b in batches] == [4, 4, 4]
    assert torch.cat(batches).flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    with pytest.raises(ValueError, match="at least one calibration image"):
        quantize(_model(), torch.zeros(0, 3, 64, 64), 4)


def test_agreement_and_the_refusal_below_the_threshold():
    fp32 = {"p_leaf": np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3]]),
            "pred_main": np.array([0, 1, 1, 0]), "pred_leaf": np.array([0, 1, 1, 0])}
    int8 = {"p_leaf": np.array([[0.85, 0.15], [0.55, 0.45], [0.2, 0.8], [0.7, 0.3]]),
            "pred_main": np.array([0, 1, 1, 0]), "pred_leaf": np.array([0, 0, 1, 0])}
    result = agreement(fp32, int8)
    assert result.images == 4 and result.leaf_agreement == 0.75 and result.main_agreement == 1.0
    assert result.max_abs_diff == pytest.approx(0.15) and result.mean_abs_diff == pytest.approx(0.4 / 8)
    check_agreement(result, 0.75)  # at the threshold: accepted
    with pytest.raises(Int8AgreementError, match=r"75\.0% of 4 check images.*int8_min_agreement=0\.8.*bf16"):
        check_agreement(result, 0.8)
    nothing = agreement({"pred_leaf": np.zeros(0)}, {})
    assert nothing.images == 0 and nothing.leaf_agreement is None
    check_agreement(nothing, 1.0)  # nothing to compare: nothing to refuse


def test_int8_settings_are_validated():
    with pytest.raises(ConfigError, match="score.precision: int8 is a CPU path"):
        load_config(None, ["score.precision=int8", "score.use_gpu=true"])
    with pytest.raises(ConfigError, match="score.int8_min_agreement"):
        load_config(None, ["score.int8_min_agreement=1.5"])
    with pytest.raises(ConfigError, match="score.int8_calibration_images"):
        load_config(None, ["score.int8_calibration_images=0"])
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["train.precision=int8"])  # scoring only


def test_serve_refuses_int8(tmp_path):
    from medhier.infer.serve import build_app

    with pytest.raises(ValueError, match="int8"):
        build_app(load_config(None, ["score.precision=int8"]), str(tmp_path), CLASSIFY)
