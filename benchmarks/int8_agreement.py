"""int8 scoring against fp32 with a trained model, on a phantom archive it never saw.

    python benchmarks/int8_agreement.py [--checkpoint URI] [--n 1200] [--size 128]

The checkpoint defaults to the hierarchical model benchmarks/hier_vs_flat.py trains (run it
first); any trained medhier checkpoint will do. A fresh archive (seed 77, difficulty 0.3) is
scored twice with `medhier score`'s own pipeline, `score.precision=fp32` then `int8`, and the
reports are compared row by row: predicted leaf, main class, probabilities, and accuracy against
the archive's labels. Prints a Markdown table for benchmarks/RESULTS.md. Not a speed benchmark
(benchmarks/score.py measures int8's images/s); the question here is what int8 changes.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from medhier import columns as C  # noqa: E402
from medhier.synthetic import spine as synthetic  # noqa: E402
from medhier.train.checkpoint import load_checkpoint  # noqa: E402
from medhier.config import load_config  # noqa: E402
from medhier.runtime import init_ray, shutdown_ray  # noqa: E402
from medhier.classify.report import leaf_column  # noqa: E402
from medhier.classify.score import score  # noqa: E402
from medhier.classify.task import CLASSIFY, taxonomy_of  # noqa: E402
from medhier.infer.batch import report_table  # noqa: E402
from common import machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/medhier-bench")
    parser.add_argument("--checkpoint", default="", help="default: WORKDIR/hier-vs-flat/run-hierarchical-0/best")
    parser.add_argument("--n", type=int, default=1200)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    checkpoint = args.checkpoint or os.path.join(args.workdir, "hier-vs-flat", "run-hierarchical-0", "best")
    if not os.path.exists(os.path.join(checkpoint, "model.pt")):
        raise SystemExit(f"no checkpoint at {checkpoint}: run benchmarks/hier_vs_flat.py first, or pass --checkpoint")
    archive = os.path.join(args.workdir, f"int8-archive-{args.n}-{args.size}")
    if not os.path.exists(os.path.join(archive, "labels.csv")):
        shutil.rmtree(archive, ignore_errors=True)
        synthetic.generate_archive(archive, args.n, seed=77, size=args.size, difficulty=0.3)
    loaded = load_checkpoint(checkpoint, CLASSIFY)
    leaves = taxonomy_of(loaded).leaf_names

    cfg = load_config(None, ["runtime.progress=false"])
    init_ray(cfg.runtime)
    reports, summaries = {}, {}
    for precision in ("fp32", "int8"):
        out = os.path.join(args.workdir, f"int8-agreement-{precision}-{time.time_ns()}")
        summaries[precision] = score(load_config(None, ["runtime.progress=false", f"score.precision={precision}"]),
                                             archive, checkpoint, out)
        rows = report_table(out).to_pylist()
        reports[precision] = {r[C.PATH]: r for r in rows if r[C.STATUS] == "ok"}
        shutil.rmtree(out, ignore_errors=True)
    shutdown_ray()

    with open(os.path.join(archive, "labels.csv")) as f:
        truth = {r["path"]: f"{r['main']}/{r['sub']}" for r in csv.DictReader(f)}
    fp32, int8 = reports["fp32"], reports["int8"]
    paths = sorted(fp32)
    assert paths == sorted(int8), "the two runs scored different images"
    probs = {p: np.array([[r[p][leaf_column(n)] for n in leaves] for p in paths]) for p, r in (("fp32", fp32), ("int8", int8))}
    diff = np.abs(probs["fp32"] - probs["int8"])
    same_leaf = np.mean([fp32[p]["leaf_label"] == int8[p]["leaf_label"] for p in paths])
    same_main = np.mean([fp32[p]["main_label"] == int8[p]["main_label"] for p in paths])
    accuracy = {k: np.mean([r[p]["leaf_label"] == truth[p] for p in paths]) for k, r in (("fp32", fp32), ("int8", int8))}
    check = summaries["int8"].int8

    print(f"\n{machine()} | {loaded.cfg.model.arch} at {loaded.cfg.preprocess.image_size} px, trained checkpoint "
          f"{loaded.model_id} | {len(paths)} unseen {args.size} px phantoms | {time.strftime('%Y-%m-%d')}\n")
    print("| measurement | value |")
    print("| --- | ---: |")
    print(f"| images scored by both | {len(paths):,} |")
    print(f"| same predicted leaf | {same_leaf:.2%} |")
    print(f"| same predicted main class | {same_main:.2%} |")
    print(f"| leaf probability difference: largest / mean / 99th percentile | {diff.max():.3f} / {diff.mean():.4f} / "
          f"{np.quantile(diff, 0.99):.3f} |")
    print(f"| leaf accuracy against the labels: fp32 / int8 | {accuracy['fp32']:.3f} / {accuracy['int8']:.3f} |")
    print(f"| the run's own check ({check.get('images', 0)} images, {check.get('calibration_images', 0)} calibration): same leaf | "
          f"{check.get('leaf_agreement', float('nan')):.2%} |")


if __name__ == "__main__":
    main()
