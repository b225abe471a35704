"""Where the hierarchical head and the flat baseline part on small phantom sets: an ablation.

    python benchmarks/head_ablation.py [--n 400] [--epochs 15] [--seeds 3] [--first-seed 0] [--size PX]
                                       [--variants flat,hierarchical,...]

`benchmarks/hier_vs_flat.py` compares the two heads through `medhier train` (Ray Train, two
workers), ~2.5 minutes a run. This script trains many variants fast enough to average over seeds:
one process, plain PyTorch, but medhier's own pieces (build_model, HierarchicalLoss, the training
augmentation, AdamW groups with warm-up + cosine, bf16 autocast, class weights, best epoch by
validation leaf macro AUC), on the same cache and splits as hier_vs_flat.py. The batch per step is
train.batch_size x train.num_workers, as in DDP. Variants:

  flat            model.head=flat
  hierarchical    medhier's default head (attention conv blocks, hidden FC, subclass head)
  attention-none  model.attention=none
  cbam            model.attention=cbam
  no-dropout      model.dropout=0
  unweighted      train.class_weights=false (the flat head too: flat-unweighted)
  sub-weight-0.5  train.sub_loss_weight=0.5 (lambda in CE(main) + lambda CE(sub | true main));
  sub-weight-2    and 2
  wide            model.head_channels=256 model.hidden=256 (medhier's defaults; smoke.yaml has 64)
  head-lr-0.001   train.lr_head=0.001 (smoke.yaml: 0.003); head-lr-0.01: 0.01
  linear          diagnostic, not a medhier option: the hierarchical factorisation with one
                  linear layer per level over the pooled trunk features (no conv blocks, no
                  hidden FC): as expressive as the flat head, trained with the hierarchical loss
  leaf-evidence   diagnostic: medhier's heads, each main logit plus the log-sum-exp of its
                  subclass logits (a main class recognised through any of its subclasses)
  linear-evidence diagnostic: `linear` with leaf evidence: leaf logit = main logit + subclass
                  logit: the flat head's leaf logits plus one more linear term per main class, trained
                  with the hierarchical loss (linear-evidence-unweighted: without class weights)

--size trains on images of that size (default smoke.yaml's 64 px; the phantoms are 128 px), from
a cache of its own. With flat among the variants, each other variant's per-seed differences from
it follow the table.

Held-out = validation + test splits. Prints a Markdown table (mean and range over seeds).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import pyarrow.dataset as pads
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from medhier import columns as C  # noqa: E402
from medhier.classify import model as M  # noqa: E402
from medhier.config import load_config  # noqa: E402
from medhier.classify.api import prepare  # noqa: E402
from medhier.classify.labels import LEAF_INDEX, MAIN_INDEX  # noqa: E402
from medhier.classify.step import class_weights, renormalised  # noqa: E402
from medhier.data.cache import CacheInfo  # noqa: E402
from medhier.classify.metrics import evaluate  # noqa: E402
from medhier.classify.presets import eval_preset, train_preset  # noqa: E402
from medhier.classify.taxonomy import Taxonomy  # noqa: E402
from medhier.train.loop import warmup_cosine  # noqa: E402
from common import head_archive, machine  # noqa: E402

SMOKE = os.path.join(os.path.dirname(__file__), "..", "configs", "smoke.yaml")
VARIANTS = {
    "flat": ["model.head=flat"],
    "hierarchical": [],
    "attention-none": ["model.attention=none"],
    "cbam": ["model.attention=cbam"],
    "no-dropout": ["model.dropout=0"],
    "unweighted": ["train.class_weights=false"],
    "flat-unweighted": ["model.head=flat", "train.class_weights=false"],
    "sub-weight-0.5": ["train.sub_loss_weight=0.5"],
    "sub-weight-2": ["train.sub_loss_weight=2"],
    "wide": ["model.head_channels=256", "model.hidden=256"],
    "head-lr-0.001": ["train.lr_head=0.001"],
    "head-lr-0.01": ["train.lr_head=0.01"],
    "linear": [],
    "leaf-evidence": [],
    "linear-evidence": [],
    "linear-evidence-unweighted": ["train.class_weights=false"],
}


class LinearHierarchical(M.HierarchicalResNet):
    """Diagnostic: P(main) and P(sub | main) each from one linear layer on the pooled features."""

    def __init__(self, cfg, taxonomy, trunk, channels):
        super().__init__(cfg, taxonomy, trunk, channels)
        del self.main_block, self.main_fc, self.main_out, self.sub_block, self.sub_out
        self.main_linear = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(channels, taxonomy.num_mains))
        self.sub_linear = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(channels, taxonomy.num_leaves))

    def logits(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = features.mean((2, 3))
        return self.main_linear(pooled), self.sub_linear(pooled)


def with_leaf_evidence(model: M.HierarchicalResNet, main_logits: torch.Tensor, leaf_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each main logit raised by the log-sum-exp of its own subclass logits: leaf logit = main
    logit + subclass logit, up to the within-main normalisation."""
    leaf_logits = leaf_logits.float()
    evidence = torch.logsumexp(leaf_logits.unsqueeze(1) + model.group_mask, dim=-1)  # (B, M)
    return main_logits.float() + evidence, leaf_logits


class LinearEvidence(LinearHierarchical):
    """Diagnostic: `LinearHierarchical` with leaf logit = main logit + subclass logit."""

    def logits(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = features.mean((2, 3))
        leaf_logits = self.sub_linear(pooled)  # its dropout mask first, as in the runs in RESULTS.md
        return with_leaf_evidence(self, self.main_linear(pooled), leaf_logits)


class LeafEvidence(M.HierarchicalResNet):
    """Diagnostic: medhier's heads, with each main logit raised by the log-sum-exp of its own
    subclass logits, so that a main class that is a union of unlike subclasses (fracture:
    wedge or fragments) can be recognised through any of them, as the flat head's summed leaf
    probabilities can."""

    def logits(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return with_leaf_evidence(self, *super().logits(features))


def load_split(rows: str, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = pads.dataset(os.path.join(rows, f"{C.SPLIT}={split}"), format="parquet").to_table(columns=[C.IMAGE, MAIN_INDEX, LEAF_INDEX])
    t = t.filter(pads.field(LEAF_INDEX) >= 0)
    images = np.frombuffer(b"".join(t[C.IMAGE].to_pylist()), np.uint8).reshape(-1, size, size).copy()
    return torch.from_numpy(images), torch.from_numpy(t[MAIN_INDEX].to_numpy()), torch.from_numpy(t[LEAF_INDEX].to_numpy())


def run(variant: str, seed: int, epochs: int, size: int, data: dict) -> dict:
    cfg = load_config(SMOKE, [f"train.epochs={epochs}", f"train.seed={seed}", f"preprocess.image_size={size}", *VARIANTS[variant]])
    tc, tax = cfg.train, Taxonomy.from_config(cfg.taxonomy)
    torch.manual_seed(seed)
    model = M.build_model(cfg.model, tax)
    if variant == "linear":
        model = LinearHierarchical(cfg.model, tax, model.trunk, model.feature_channels)
    elif variant.startswith("linear-evidence"):
        model = LinearEvidence(cfg.model, tax, model.trunk, model.feature_channels)
    elif variant == "leaf-evidence":
        model = LeafEvidence(cfg.model, tax, model.trunk, model.feature_channels)
    model = model.to(memory_format=torch.channels_last)
    train = data["train"]
    counts = {name: int((train[2] == i).sum()) for i, name in enumerate(tax.leaf_names)}
    main_w, leaf_w = class_weights(tax, counts) if tc.class_weights else (None, None)
    loss_fn = M.HierarchicalLoss(tax, tc.sub_loss_weight, tc.label_smoothing, main_w, leaf_w, flat=cfg.model.head == "flat")
    optimizer = torch.optim.AdamW(model.param_groups(tc.lr_backbone, tc.lr_head, tc.weight_decay))
    batch = tc.batch_size * tc.num_workers
    scheduler = warmup_cosine(optimizer, tc, math.ceil(len(train[0]) / batch))
    augment, plain = train_preset(cfg.preprocess), eval_preset(cfg.preprocess)
    generator = torch.Generator().manual_seed(seed * 1000 + 7)

    def metrics(split: tuple) -> dict:
        model.eval()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(plain(split[0]).contiguous(memory_format=torch.channels_last))
        p_main, p_leaf = renormalised(out.log_p_main.exp().float().numpy()), renormalised(out.log_p_leaf.exp().float().numpy())
        return evaluate(tax, split[1].numpy(), split[2].numpy(), p_main, p_leaf)

    best, best_state, t = -1.0, None, time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train[0]), generator=generator)
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            x = augment(train[0][idx], generator).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            loss = loss_fn(out, train[1][idx], train[2][idx])["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        auc = metrics(data["val"])["leaf"]["macro"]["roc_auc"]
        if auc > best:
            best, best_state = auc, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    m = metrics(data["held_out"])
    return {"main acc": m["main"]["accuracy"], "leaf acc": m["leaf"]["accuracy"], "main AUC": m["main"]["macro"]["roc_auc"],
            "leaf AUC": m["leaf"]["macro"]["roc_auc"], "sub acc given main": m["hierarchy"]["sub_accuracy_given_main"],
            "seconds": time.perf_counter() - t}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--difficulty", type=float, default=0.3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--size", type=int, default=None, help="image size in px (default: smoke.yaml's)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", default="/tmp/medhier-bench/hier-vs-flat")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    archive, cache = head_archive(args.workdir, args.n, args.difficulty)  # the same as hier_vs_flat.py's
    smoke_size = load_config(SMOKE).preprocess.image_size
    if args.size is None:
        args.size = smoke_size
    elif args.size != smoke_size:
        cache += f"-{args.size}px"
    cfg = load_config(SMOKE, ["runtime.progress=false", f"preprocess.image_size={args.size}"])
    if CacheInfo.read(cache, cfg.storage) is None:
        from medhier.runtime import init_ray, shutdown_ray

        init_ray(cfg.runtime)
        prepare(cfg, archive, cache)
        shutdown_ray()
    info = CacheInfo.read(cache, cfg.storage)
    rows = os.path.join(cache, info.rows_dir, f"{C.STATUS}={C.STATUS_OK}")
    data = {s: load_split(rows, s, info.image_size) for s in ("train", "val", "test")}
    data["held_out"] = tuple(torch.cat([a, b]) for a, b in zip(data["val"], data["test"]))

    results = {v: [run(v, seed, args.epochs, args.size, data) for seed in range(args.first_seed, args.first_seed + args.seeds)] for v in variants}
    keys = ["main acc", "leaf acc", "main AUC", "leaf AUC", "sub acc given main"]
    print(f"\n{machine()} | {args.n} phantoms (train {len(data['train'][0])}, held out "
          f"{len(data['held_out'][0])}), difficulty {args.difficulty}, ResNet18 from scratch at {info.image_size} px, "
          f"{args.epochs} epochs, seeds {args.first_seed}–{args.first_seed + args.seeds - 1} | {time.strftime('%Y-%m-%d')}\n")
    print("| variant | " + " | ".join(keys) + " | s/run |")
    print("| --- |" + " ---: |" * (len(keys) + 1))
    for v, runs in results.items():
        cells = []
        for k in keys:
            values = np.array([r[k] for r in runs], dtype=float)
            cells.append(f"{values.mean():.3f} ({values.min():.2f}–{values.max():.2f})")
        print(f"| {v} | " + " | ".join(cells) + f" | {np.mean([r['seconds'] for r in runs]):.0f} |")
    print("\nmean over seeds (min–max); held out = validation + test splits")
    if "flat" in results:
        # Same seed, same splits, same trunk initialisation: the per-seed difference removes the
        # part of the seed-to-seed spread that both heads share.
        for v in (v for v in results if v != "flat"):
            for k in ("leaf acc", "leaf AUC"):
                d = np.array([r[k] - f[k] for r, f in zip(results[v], results["flat"])])
                print(f"{v} - flat, {k}, per seed: " + ", ".join(f"{x:+.3f}" for x in d)
                      + f"; mean {d.mean():+.3f}, {int((d >= 0).sum())} of {len(d)} seeds >= 0")


if __name__ == "__main__":
    main()
