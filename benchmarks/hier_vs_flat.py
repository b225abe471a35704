"""Hierarchical head against the flat baseline, side by side on the same phantom archive.

    python benchmarks/hier_vs_flat.py [--n 400] [--epochs 15] [--difficulty 0.3] [--seeds 2]

Both models train with configs/smoke.yaml's settings (ResNet18 from scratch, 64 px, 2 CPU
workers) on the same cache, so the same patients land in the same splits; each is then scored on
the validation and test splits together (the held-out images). Prints a Markdown table for
benchmarks/RESULTS.md. Not a speed benchmark: a quality comparison asked for by the training
issue ("the hierarchical model matches the flat baseline or beats it").
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from medhier import columns as C  # noqa: E402
from medhier.config import load_config  # noqa: E402
from medhier.data.cache import load_cache  # noqa: E402
from medhier.classify.metrics import evaluate  # noqa: E402
from medhier.runtime import init_ray  # noqa: E402
from medhier.classify.labels import LEAF_INDEX, MAIN_INDEX  # noqa: E402
from medhier.classify.task import CLASSIFY  # noqa: E402
from medhier.infer.actor import predict_dataset  # noqa: E402
from medhier.classify.taxonomy import Taxonomy  # noqa: E402
from medhier.classify.api import fit  # noqa: E402
from common import head_archive, machine  # noqa: E402

SMOKE = os.path.join(os.path.dirname(__file__), "..", "configs", "smoke.yaml")


def held_out_metrics(cfg, run: str, cache: str) -> dict:
    parts = {"p_main": [], "p_leaf": [], MAIN_INDEX: [], LEAF_INDEX: []}
    for split in ("val", "test"):
        ds, _ = load_cache(cache, cfg.storage, split, columns=[C.IMAGE, MAIN_INDEX, LEAF_INDEX])
        pred = predict_dataset(ds, CLASSIFY, os.path.join(run, "best"), cfg)
        for k in parts:
            parts[k].append(pred[k])
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    p_main = arrays["p_main"] / arrays["p_main"].sum(1, keepdims=True)
    p_leaf = arrays["p_leaf"] / arrays["p_leaf"].sum(1, keepdims=True)
    return evaluate(Taxonomy.from_config(cfg.taxonomy), arrays[MAIN_INDEX], arrays[LEAF_INDEX], p_main, p_leaf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--difficulty", type=float, default=0.3)
    parser.add_argument("--seeds", type=int, default=2, help="training seeds per head")
    parser.add_argument("--workdir", default="/tmp/medhier-bench/hier-vs-flat")
    args = parser.parse_args()
    archive, cache = head_archive(args.workdir, args.n, args.difficulty)
    rows = []
    for head in ("hierarchical", "flat"):
        for seed in range(args.seeds):
            cfg = load_config(SMOKE, ["runtime.progress=false", f"train.epochs={args.epochs}", f"model.head={head}",
                                      f"train.seed={seed}", f"data.cache={cache}"])
            init_ray(cfg.runtime)
            run = os.path.join(args.workdir, f"run-{head}-{seed}")
            shutil.rmtree(run, ignore_errors=True)
            t = time.perf_counter()
            fit(cfg, archive, run)
            m = held_out_metrics(cfg, run, cache)
            rows.append((head, seed, m, time.perf_counter() - t))
    n = rows[0][2]["n"]
    print(f"\n{machine()} | {args.n} phantoms, difficulty {args.difficulty}, "
          f"ResNet18 64 px, {args.epochs} epochs, {n} held-out images | {time.strftime('%Y-%m-%d')}\n")
    print("| head | seed | main acc | leaf acc | main macro AUC | leaf macro AUC | sub acc given main | consistency | minutes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for head, seed, m, seconds in rows:
        h = m["hierarchy"]
        print(f"| {head} | {seed} | {m['main']['accuracy']:.3f} | {m['leaf']['accuracy']:.3f} | {m['main']['macro']['roc_auc']:.3f} | "
              f"{m['leaf']['macro']['roc_auc']:.3f} | {h['sub_accuracy_given_main']:.3f} | {h['consistency']:.3f} | {seconds / 60:.1f} |")
    for head in ("hierarchical", "flat"):
        mine = [m for h, _, m, _ in rows if h == head]
        print(f"\n{head}: mean leaf accuracy {np.mean([m['leaf']['accuracy'] for m in mine]):.3f}, "
              f"mean leaf macro AUC {np.mean([m['leaf']['macro']['roc_auc'] for m in mine]):.3f}")


if __name__ == "__main__":
    main()
