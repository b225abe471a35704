"""Clinical trust on phantoms (issue 21): calibration, referral, intervals, drift, shortcut audit.

    python benchmarks/trust.py [--n 400] [--epochs 12] [--difficulty 0.3] [--val-fraction 0.15] [--held-out N] [--no-audit]

One ``medhier train`` (configs/smoke.yaml: ResNet18 from scratch, 64 px, 2 CPU workers) on a
phantom archive, then what its after-training step fitted and measured: the temperatures, ECE
before and after on the test split (the issue's check: after <= half of before, or <= 0.03) and,
with --held-out N, on N new phantoms of another seed scored by ``medhier evaluate``, where
the same validation predictions also fit each ``train.calibration`` mode side by side,
the risk-coverage curve, the referral threshold and its effect, the bootstrap intervals. Then
two scoring runs against the checkpoint's training profile: the archive it came from and one of
finer pixels (96 px phantoms), and their largest PSI. Last, the shortcut audit at the same
settings: the same training on phantoms whose finding is erased, held-out accuracy against
chance. Prints Markdown for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from medhier.classify.api import evaluate_archive, fit  # noqa: E402
from medhier.classify.calibration import calibration_errors, fit_temperatures  # noqa: E402
from medhier.classify.labels import LEAF_INDEX, MAIN_INDEX  # noqa: E402
from medhier.classify.metrics import hierarchical_predictions  # noqa: E402
from medhier.classify.posthoc import calibrated, predict_splits  # noqa: E402
from medhier.classify.report import RAW_LOG_P_MAIN, RAW_LOG_P_SUB  # noqa: E402
from medhier.classify.task import CLASSIFY, taxonomy_of  # noqa: E402
from medhier.train.checkpoint import config_for_checkpoint, load_checkpoint  # noqa: E402
from medhier.classify.score import score  # noqa: E402
from medhier.classify.taxonomy import Taxonomy  # noqa: E402
from medhier.config import load_config  # noqa: E402
from medhier.runtime import init_ray  # noqa: E402
from medhier.synthetic import spine as synthetic  # noqa: E402
from common import machine  # noqa: E402

SMOKE = os.path.join(os.path.dirname(__file__), "..", "configs", "smoke.yaml")


def erased_archive(root: str, n: int, seed: int, size: int, difficulty: float) -> None:
    """The archive generate_archive writes with these arguments, every finding erased (same
    patients, noise, encodings and labels.csv)."""
    tax = Taxonomy.from_dict(synthetic.DEFAULT_CLASSES)
    rows = []
    for spec in synthetic.plan_archive(n, seed=seed, size=size, difficulty=difficulty, taxonomy=tax):
        path = os.path.join(root, spec.path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(spec.encode_phantom(synthetic.render(spec.leaf, spec.rng(), size=size, difficulty=difficulty, finding=False)))
        rows.append((spec.path, *spec.leaf.split("/")))
    with open(os.path.join(root, "labels.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("path", "main", "sub"), *rows])


def ece_table(cal: dict) -> None:
    """The ECE before and after calibration per level, with the issue's check, as Markdown."""
    print("| level | ECE before | ECE after | after / before | class-wise ECE before | after | check (<= 0.5x or <= 0.03) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for level, e in cal["ece"].items():
        ok = e["after"] <= max(0.5 * e["before"], 0.03)
        print(f"| {level} | {e['before']:.3f} | {e['after']:.3f} | {e['after'] / e['before']:.2f} | {e['classwise_before']:.3f} | "
              f"{e['classwise_after']:.3f} | {'met' if ok else 'not met'} |")


def modes_table(best: str, cache: str, held_cache: str, cfg) -> None:
    """Each train.calibration mode fitted on the same validation predictions of ``best``, ECE on
    the held-out cache's images, as Markdown."""
    loaded = load_checkpoint(best, CLASSIFY, cfg.storage)
    tax, run_cfg = taxonomy_of(loaded), config_for_checkpoint(cfg, loaded)
    val = predict_splits(best, cache, run_cfg, ["val"])["val"]
    held = predict_splits(best, held_cache, run_cfg, [None])[None]
    fits = {"none (the model's own)": None}
    for name, bias in (("temperature", False), ("temperature_bias", True)):
        fits[name] = fit_temperatures(val[RAW_LOG_P_MAIN], val[RAW_LOG_P_SUB], val[MAIN_INDEX], val[LEAF_INDEX], tax, bias=bias)
    print(f"\neach train.calibration mode fitted on the same {len(val[MAIN_INDEX])} validation images, ECE on the {len(held[MAIN_INDEX])} "
          "held-out images:\n")
    print("| calibration | main ECE | after / before | main class-wise | leaf ECE | after / before | leaf class-wise | leaf accuracy |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    before = None
    for name, t in fits.items():
        p_main, p_leaf = calibrated(held, t, tax)
        e = calibration_errors(p_main, held[MAIN_INDEX]), calibration_errors(p_leaf, held[LEAF_INDEX])
        before = before or e
        accuracy = (hierarchical_predictions(tax, p_main, p_leaf)[1] == held[LEAF_INDEX]).mean()
        print(f"| {name} | {e[0]['ece']:.3f} | {e[0]['ece'] / before[0]['ece']:.2f} | {e[0]['classwise_ece']:.3f} | {e[1]['ece']:.3f} | "
              f"{e[1]['ece'] / before[1]['ece']:.2f} | {e[1]['classwise_ece']:.3f} | {accuracy:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--difficulty", type=float, default=0.3)
    parser.add_argument("--workdir", default="/tmp/medhier-bench/trust")
    parser.add_argument("--held-out", type=int, default=0, help="also measure ECE before and after on this many new phantoms "
                        "(another seed) with medhier evaluate: the test split alone is small")
    parser.add_argument("--no-audit", action="store_true", help="skip the shortcut audit (a second training as long as the first)")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="patients in the validation split (the test split keeps 0.15)")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    archive, erased, finer = (os.path.join(args.workdir, name) for name in ("archive", "erased", "finer"))
    synthetic.generate_archive(archive, args.n, seed=31, size=64, difficulty=args.difficulty)
    synthetic.generate_archive(finer, 200, seed=32, size=96, difficulty=args.difficulty)
    if not args.no_audit:
        erased_archive(erased, args.n, seed=31, size=64, difficulty=args.difficulty)
    cfg = load_config(SMOKE, ["runtime.progress=false", f"train.epochs={args.epochs}", f"data.val_fraction={args.val_fraction}",
                              f"data.train_fraction={0.85 - args.val_fraction:.4f}"])
    init_ray(cfg.runtime)

    t = time.perf_counter()
    run = os.path.join(args.workdir, "run")
    result = fit(cfg, archive, run)
    train_min = (time.perf_counter() - t) / 60
    m, post = result.test_metrics, result.posthoc
    cal, ref = m["calibration"], m["referral"]
    print(f"\n{machine()} | {args.n} phantoms, difficulty {args.difficulty}, ResNet18 64 px, {args.epochs} epochs "
          f"({train_min:.1f} min with the after-training step) | {time.strftime('%Y-%m-%d')}\n")
    t = post["temperatures"]
    biases = f"; class biases main {t['main_bias']}, leaves {t['sub_bias']}" if t.get("main_bias") else ""
    print(f"calibration fitted on {post['images']} validation images (train.calibration={cfg.train.calibration}): temperatures main "
          f"{t['main']:.3g}, sub {t['sub']:.3g}{biases}; test split: {m['n']} images of {m['bootstrap']['patients']} patients\n")
    ece_table(cal)
    if args.held_out:
        # the test split is a few dozen images: ECE over 15 bins is then mostly sampling noise.
        # The same model, temperatures fitted on the same validation split, measured on a large
        # independent archive of the same generator (medhier evaluate).
        held = os.path.join(args.workdir, "held-out")
        synthetic.generate_archive(held, args.held_out, seed=33, size=64, difficulty=args.difficulty)
        h = evaluate_archive(load_config(None, ["runtime.progress=false"]), result.best_checkpoint, held, os.path.join(args.workdir, "eval-held-out"))
        print(f"\nthe same model on {h['n']} held-out phantoms of another seed (medhier evaluate; main accuracy {h['main']['accuracy']:.3f}, "
              f"leaf {h['leaf']['accuracy']:.3f}):\n")
        ece_table(h["calibration"])
        modes_table(result.best_checkpoint, os.path.join(run, "cache"), os.path.join(args.workdir, "eval-held-out", "cache"), cfg)
    curve = ref["curve"]
    print("\n| coverage (most confident first) | leaf accuracy |")
    print("| ---: | ---: |")
    for want in (0.25, 0.5, 0.75, 1.0):
        i = max(i for i, c in enumerate(curve["coverage"]) if c <= want + 1e-9)
        print(f"| {curve['coverage'][i]:.2f} | {curve['accuracy'][i]:.3f} |")
    r = post["referral"]
    print(f"\nreferral: threshold {r['threshold']:.3f} (target {r['target_accuracy']} on validation: coverage {r['coverage']:.2f}, "
          f"accuracy {r['accuracy'] if r['accuracy'] is None else round(r['accuracy'], 3)}); on test {ref['referred']:.1%} referred, "
          f"accuracy {ref['accuracy_kept'] if ref['accuracy_kept'] is None else round(ref['accuracy_kept'], 3)} on the rest, "
          f"{ref['accuracy_all']:.3f} on all")
    for level in ("main", "leaf"):
        lo, hi = m[level]["ci"]["accuracy"]
        print(f"{level} accuracy {m[level]['accuracy']:.3f} [{lo:.3f}, {hi:.3f}], macro AUC {m[level]['macro']['roc_auc']:.3f} "
              f"{m[level]['ci']['macro']['roc_auc']}")

    print("\n| scoring run against the training profile | images | largest PSI (feature) | warnings |")
    print("| --- | ---: | --- | --- |")
    for name, source in (("the training archive itself", archive), ("96 px phantoms (finer pixels)", finer)):
        summary = score(load_config(None, ["runtime.progress=false"]), source, result.best_checkpoint, os.path.join(args.workdir, f"scores-{os.path.basename(source)}"))
        worst = max(summary.drift["psi"].items(), key=lambda kv: kv[1])
        print(f"| {name} | {summary.drift['images']} | {worst[1]:.3f} ({worst[0]}) | {'; '.join(w.split(':')[0] for w in summary.drift['warnings']) or 'none'} |")

    if args.no_audit:
        json.dump({"trained": m, "posthoc": post}, open(os.path.join(args.workdir, "trust.json"), "w"), indent=1, default=str)
        return
    t = time.perf_counter()
    audit = fit(cfg, erased, os.path.join(args.workdir, "run-erased"))
    leaves = Counter(row["main"] for row in csv.DictReader(open(os.path.join(erased, "labels.csv"))))
    a = audit.test_metrics
    truth = np.array(a["main"]["confusion_matrix"]).sum(1)
    majority = truth.max() / truth.sum()
    bound = majority + 2.33 * np.sqrt(majority * (1 - majority) / truth.sum())
    print(f"\nshortcut audit (finding erased, same training, {(time.perf_counter() - t) / 60:.1f} min): held-out main accuracy "
          f"{a['main']['accuracy']:.3f} on {truth.sum()} test images against chance {majority:.3f} (one-sided 1 % bound {bound:.3f}); "
          f"main macro AUC {a['main']['macro']['roc_auc']:.3f}; archive mains {dict(leaves)}")
    json.dump({"trained": m, "posthoc": post, "audit": a}, open(os.path.join(args.workdir, "trust.json"), "w"), indent=1, default=str)


if __name__ == "__main__":
    main()
