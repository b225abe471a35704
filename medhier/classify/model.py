"""The hierarchical ResNet of seed 000, its flat baseline, and the hierarchical loss.

    image ─▶ ResNet trunk (conv1 … layer4) ─▶ feature map F (B, C, h, w)
    F ─▶ attention conv block ─▶ GAP ─▶ FC (hidden) ─▶ h_main ─▶ FC ─▶ main logits
    [F ‖ h_main broadcast over h×w] ─▶ attention conv block ─▶ GAP ─▶ FC ─▶ leaf logits,
                                        normalised within each main class: log P(sub | main)
    log P(leaf) = log P(main) + log P(sub | main)

Predictions are hierarchical: the main class first, then the most probable subclass *inside
it*, so a report can never say "normal" and "burst fracture" at once.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medhier.config import ModelConfig
from medhier.io import storage
from medhier.classify.taxonomy import Taxonomy

__all__ = [
    "HierarchicalLoss",
    "HierarchicalResNet",
    "Outputs",
    "PretrainedWeightsError",
    "build_model",
    "predict",
    "untie_shared_modules",
]

log = logging.getLogger(__name__)

STAGES = ("layer1", "layer2", "layer3", "layer4")


def _arch(name: str):
    """-> (torchvision factory, ImageNet weights enum, trunk channels) of a ResNet."""
    # torchvision imports torch._dynamo (~2-3 s of a fresh process here): only where a model is
    # built, never in a scoring driver or a model actor that runs a cached compiled model.
    import torchvision

    return {
        "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1, 512),
        "resnet34": (torchvision.models.resnet34, torchvision.models.ResNet34_Weights.IMAGENET1K_V1, 512),
        "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V2, 2048),
    }[name]


class PretrainedWeightsError(ValueError):
    """Pretrained weights could not be obtained; the message says how to provide a file."""


@dataclass
class Outputs:
    """Model outputs for a batch of B images (M main classes, L leaves), all log-probabilities
    except the raw logits."""

    main_logits: torch.Tensor  # (B, M)
    log_p_main: torch.Tensor  # (B, M)
    log_p_sub: torch.Tensor  # (B, L): log P(sub | main of that leaf)
    log_p_leaf: torch.Tensor  # (B, L): log P(main) + log P(sub | main)


# -- attention blocks -----------------------------------------------------------------------


class SelfAttention2d(nn.Module):
    """Self-attention over the spatial positions of a feature map (SAGAN-style), residual with
    a learnt gate that starts at 0 so that pretrained features pass through unchanged at first."""

    def __init__(self, channels: int):
        super().__init__()
        inner = max(channels // 8, 8)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.scale = inner**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # (B, N, d)
        k = self.key(x).flatten(2)  # (B, d, N)
        v = self.value(x).flatten(2)  # (B, C, N)
        attn = torch.softmax(torch.bmm(q, k) * self.scale, dim=-1)  # (B, N, N)
        out = torch.bmm(v, attn.transpose(1, 2)).view(b, c, h, w)
        return x + self.gamma * out


class CBAM(nn.Module):
    """Convolutional Block Attention Module (seed 001 §5.1): channel then spatial attention."""

    def __init__(self, channels: int, ratio: int = 8, kernel: int = 7):
        super().__init__()
        hidden = max(channels // ratio, 4)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = torch.sigmoid(self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True)))
        x = x * channel
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


class AttentionConvBlock(nn.Module):
    """1x1 conv (reduce) -> attention -> 3x3 conv, each conv with BatchNorm and ReLU."""

    def __init__(self, in_channels: int, channels: int, attention: str):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.attention = {"self": SelfAttention2d, "cbam": CBAM}.get(attention, lambda c: nn.Identity())(channels)
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.attention(self.reduce(x)))


# -- the models -----------------------------------------------------------------------------


class _Trunk(nn.Module):
    """A torchvision ResNet without its pooling and classifier, with stage-wise freezing."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        for name in STAGES:
            setattr(self, name, getattr(resnet, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in STAGES:
            x = getattr(self, name)(x)
        return x

    def frozen_modules(self, depth: int) -> list[nn.Module]:
        """Fine-tuning depth k: the top k stages train. k = 4 trains the whole trunk (stem too)."""
        if depth >= len(STAGES):
            return []
        return [self.stem] + [getattr(self, n) for n in STAGES[: len(STAGES) - depth]]


class _Base(nn.Module):
    def __init__(self, cfg: ModelConfig, taxonomy: Taxonomy, trunk: _Trunk, feature_channels: int):
        super().__init__()
        self.taxonomy = taxonomy
        self.trunk = trunk
        self.feature_channels = feature_channels
        self.finetune_depth = cfg.finetune_depth
        self.register_buffer("leaf_main", torch.as_tensor(taxonomy.leaf_main), persistent=False)
        # (M, L) additive mask: 0 inside a main class's group, -inf outside
        mask = torch.full(taxonomy.leaf_mask.shape, float("-inf"))
        mask[torch.as_tensor(taxonomy.leaf_mask)] = 0.0
        self.register_buffer("group_mask", mask, persistent=False)
        self.apply_freezing()

    def apply_freezing(self) -> None:
        for module in self.trunk.frozen_modules(self.finetune_depth):
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen stages keep their pretrained BatchNorm statistics: small medical batches would
        # otherwise overwrite ImageNet's running means.
        for module in self.trunk.frozen_modules(self.finetune_depth):
            module.eval()
        return self

    def param_groups(self, lr_backbone: float, lr_head: float, weight_decay: float) -> list[dict]:
        """Optimizer groups: trainable trunk parameters at lr_backbone, heads at lr_head."""
        trunk = [p for p in self.trunk.parameters() if p.requires_grad]
        heads = [p for n, p in self.named_parameters() if not n.startswith("trunk.") and p.requires_grad]
        groups = [{"params": heads, "lr": lr_head, "weight_decay": weight_decay, "name": "heads"}]
        if trunk:
            groups.append({"params": trunk, "lr": lr_backbone, "weight_decay": weight_decay, "name": "backbone"})
        return groups

    def _within_group_log_softmax(self, leaf_logits: torch.Tensor) -> torch.Tensor:
        """(B, L) logits -> (B, L) log P(sub | main), each leaf normalised over its main's leaves."""
        group_lse = torch.logsumexp(leaf_logits.float().unsqueeze(1) + self.group_mask, dim=-1)  # (B, M)
        return leaf_logits.float() - group_lse[:, self.leaf_main]


class HierarchicalResNet(_Base):
    """Seed 000's model: a main head, and a subclass head fed with the main head's FC features
    concatenated to the backbone's feature map."""

    def __init__(self, cfg: ModelConfig, taxonomy: Taxonomy, trunk: _Trunk, feature_channels: int):
        super().__init__(cfg, taxonomy, trunk, feature_channels)
        self.main_block = AttentionConvBlock(feature_channels, cfg.head_channels, cfg.attention)
        self.main_fc = nn.Sequential(nn.Linear(cfg.head_channels, cfg.hidden), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout))
        self.main_out = nn.Linear(cfg.hidden, taxonomy.num_mains)
        self.sub_block = AttentionConvBlock(feature_channels + cfg.hidden, cfg.head_channels, cfg.attention)
        self.sub_out = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.head_channels, taxonomy.num_leaves))

    def forward(self, x: torch.Tensor) -> Outputs:
        features = self.trunk(x)
        return self.heads(features)

    def heads(self, features: torch.Tensor) -> Outputs:
        """(B, C, h, w) backbone features -> outputs (split out so Grad-CAM can hook the trunk)."""
        return self.outputs(*self.logits(features))

    def outputs(self, main_logits: torch.Tensor, leaf_logits: torch.Tensor) -> Outputs:
        """(main logits (B, M), raw leaf logits (B, L)) -> P(main), P(sub | main) and P(leaf)."""
        log_p_main = torch.log_softmax(main_logits.float(), dim=-1)
        log_p_sub = self._within_group_log_softmax(leaf_logits)
        return Outputs(main_logits.float(), log_p_main, log_p_sub, log_p_main[:, self.leaf_main] + log_p_sub)

    def logits(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) backbone features -> (main logits (B, M), raw leaf logits (B, L))."""
        h_main = self.main_fc(self.main_block(features).mean((2, 3)))
        broadcast = h_main[:, :, None, None].expand(-1, -1, *features.shape[2:]).to(features.dtype)
        leaf_logits = self.sub_out(self.sub_block(torch.cat([features, broadcast], dim=1)).mean((2, 3)))
        return self.main_out(h_main), leaf_logits


class FlatResNet(_Base):
    """Baseline: one softmax over the leaves; P(main) is the sum of its leaves."""

    def __init__(self, cfg: ModelConfig, taxonomy: Taxonomy, trunk: _Trunk, feature_channels: int):
        super().__init__(cfg, taxonomy, trunk, feature_channels)
        self.out = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(feature_channels, taxonomy.num_leaves))

    def forward(self, x: torch.Tensor) -> Outputs:
        return self.heads(self.trunk(x))

    def heads(self, features: torch.Tensor) -> Outputs:
        log_p_leaf = torch.log_softmax(self.out(features.mean((2, 3))).float(), dim=-1)
        log_p_main = torch.logsumexp(log_p_leaf.unsqueeze(1) + self.group_mask, dim=-1)
        log_p_sub = log_p_leaf - log_p_main[:, self.leaf_main]
        return Outputs(log_p_main, log_p_main, log_p_sub, log_p_leaf)


def build_model(cfg: ModelConfig, taxonomy: Taxonomy, storage_cfg=None, load_pretrained: bool = True) -> _Base:
    """A model for ``cfg`` and ``taxonomy``; ``load_pretrained=False`` skips the pretrained
    weights (when a checkpoint's weights are about to be loaded anyway)."""
    factory, weights, channels = _arch(cfg.arch)
    resnet = factory(weights=None)
    if load_pretrained and cfg.pretrained != "none":
        resnet.load_state_dict(_pretrained_state(cfg, weights, storage_cfg))
    trunk = _Trunk(resnet)
    cls = HierarchicalResNet if cfg.head == "hierarchical" else FlatResNet
    return cls(cfg, taxonomy, trunk, channels)


def _pretrained_state(cfg: ModelConfig, weights, storage_cfg) -> dict[str, torch.Tensor]:
    if cfg.pretrained == "imagenet":
        try:
            return weights.get_state_dict(progress=False)
        except Exception as exc:
            raise PretrainedWeightsError(
                f"could not download ImageNet weights for {cfg.arch} from {weights.url} "
                f"({type(exc).__name__}: {exc}). Without internet access, fetch that file on a "
                f"machine that has it and pass model.pretrained=/path/to/{weights.url.rsplit('/', 1)[-1]} "
                "(or an s3:// URI), or model.pretrained=none to train from scratch"
            ) from None
    try:
        raw = storage.read_bytes(cfg.pretrained, storage_cfg)
    except FileNotFoundError:
        raise PretrainedWeightsError(f"model.pretrained: weights file {cfg.pretrained!r} not found") from None
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)  # untrusted input
    except Exception as exc:
        raise PretrainedWeightsError(f"model.pretrained: {cfg.pretrained!r} is not a torch state_dict file ({exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"model.pretrained: {cfg.pretrained!r} holds a {type(state).__name__}, not a state_dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = _arch(cfg.arch)[0](weights=None).state_dict()
    missing = [k for k in expected if k not in state and not k.startswith("fc.")]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or wrong:
        raise PretrainedWeightsError(
            f"model.pretrained: {cfg.pretrained!r} does not fit {cfg.arch}: "
            f"{len(missing)} missing key(s) {missing[:3]}, {len(wrong)} with other shapes {wrong[:3]}"
        )
    # The ImageNet classifier (fc) is never used; keep the torchvision model's own.
    return {k: (state[k] if k in state and not k.startswith("fc.") else v) for k, v in expected.items()}


# -- int8: one module per call ----------------------------------------------------------------


class _CBAM(CBAM):
    """medhier's CBAM with its shared MLP run once on both poolings (concatenated along the
    batch), for the same reason as :mod:`medhier.classify.blocks`' ResNet blocks: the same
    function, one call. Only in the
    int8 copy: training keeps the two calls, so that its runs stay bit-for-bit as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg, peak = self.mlp(torch.cat([x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)])).chunk(2)
        x = x * torch.sigmoid(avg + peak)
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


def untie_shared_modules(model: nn.Module) -> None:
    """Give every module call its own module, in place, so that int8 export quantization
    (:func:`medhier.infer.int8.quantize`, which works on a copy) matches every pattern."""
    from medhier.classify.blocks import BasicBlock, Bottleneck, OneCallBasicBlock, OneCallBottleneck  # torchvision: see _arch

    for module in model.modules():
        if type(module) is CBAM:
            module.__class__ = _CBAM
        elif type(module) is BasicBlock:
            module.__class__ = OneCallBasicBlock
            module.relu_a, module.relu_b = nn.ReLU(), nn.ReLU()
        elif type(module) is Bottleneck:
            module.__class__ = OneCallBottleneck
            module.relu_a, module.relu_b, module.relu_c = nn.ReLU(), nn.ReLU(), nn.ReLU()



# -- predictions and loss ------------------------------------------------------------------


def predict(out: Outputs, taxonomy: Taxonomy) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (main index (B,), leaf index (B,)): the main class first, then the best leaf inside it."""
    main = out.log_p_main.argmax(-1)
    inside = torch.as_tensor(taxonomy.leaf_mask, device=main.device)[main]  # (B, L)
    leaf = out.log_p_leaf.masked_fill(~inside, float("-inf")).argmax(-1)
    return main, leaf


class HierarchicalLoss(nn.Module):
    """CE(main) + λ · CE(sub | true main), with optional class weights and label smoothing.

    The subclass term is the negative log-probability of the true subclass *within the true
    main class*: the subclass head learns to tell compression from burst among fractures,
    whatever the main head says. For the flat head it is CE over the leaves.
    """

    def __init__(self, taxonomy: Taxonomy, sub_weight: float = 1.0, label_smoothing: float = 0.0,
                 main_class_weights: np.ndarray | None = None, leaf_class_weights: np.ndarray | None = None,
                 flat: bool = False):
        super().__init__()
        self.sub_weight, self.smoothing, self.flat = sub_weight, label_smoothing, flat
        self.register_buffer("leaf_mask", torch.as_tensor(taxonomy.leaf_mask), persistent=False)
        self.register_buffer("leaf_main", torch.as_tensor(taxonomy.leaf_main), persistent=False)
        self.register_buffer("main_w", _weights(main_class_weights, taxonomy.num_mains), persistent=False)
        self.register_buffer("leaf_w", _weights(leaf_class_weights, taxonomy.num_leaves), persistent=False)

    def forward(self, out: Outputs, main_label: torch.Tensor, leaf_label: torch.Tensor) -> dict[str, torch.Tensor]:
        """-> {"loss", "main", "sub"}; labels are (B,) int64 main and global leaf indices."""
        if self.flat:
            leaf = -out.log_p_leaf.gather(1, leaf_label[:, None]).squeeze(1)
            if self.smoothing:
                leaf = (1 - self.smoothing) * leaf - self.smoothing * out.log_p_leaf.mean(-1)
            w = self.leaf_w[leaf_label]
            loss = (leaf * w).sum() / w.sum()
            return {"loss": loss, "main": loss.detach(), "sub": torch.zeros_like(loss)}
        main = F.cross_entropy(out.main_logits, main_label, weight=self.main_w, label_smoothing=self.smoothing)
        nll = -out.log_p_sub.gather(1, leaf_label[:, None]).squeeze(1)
        if self.smoothing:
            group = self.leaf_mask[main_label]  # (B, L): leaves of the true main
            uniform = -(out.log_p_sub.masked_fill(~group, 0.0)).sum(-1) / group.sum(-1)
            nll = (1 - self.smoothing) * nll + self.smoothing * uniform
        w = self.leaf_w[leaf_label]
        sub = (nll * w).sum() / w.sum()
        return {"loss": main + self.sub_weight * sub, "main": main.detach(), "sub": sub.detach()}


def _weights(values: np.ndarray | None, n: int) -> torch.Tensor:
    if values is None:
        return torch.ones(n)
    t = torch.as_tensor(np.asarray(values, dtype=np.float32))
    if t.shape != (n,):
        raise ValueError(f"class weights: expected {n} values, got shape {tuple(t.shape)}")
    return t
