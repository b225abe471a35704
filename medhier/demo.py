"""``medhier demo``: the whole system end to end on embedded defaults, on a local Ray.

Generates a phantom CT archive (with a few files that must be rejected) in a local folder,
trains the hierarchical model with 2 CPU workers, and scores the archive into a report, printing
each stage's summary table. Nothing is downloaded.
"""

from __future__ import annotations

import os
import time

from medhier.classify.api import fit
from medhier.classify.score import score
from medhier.classify.taxonomy import Taxonomy
from medhier.config import Config, load_config
from medhier.runtime import init_ray
from medhier.synthetic import spine as synthetic

__all__ = ["DEMO_CONFIG", "demo_config", "run_demo"]

# Kept identical to configs/demo.yaml (a test checks), embedded so that an installed package
# runs the demo without the repository around it.
DEMO_CONFIG = """
dicom:
  windows: {CT: bone}
preprocess:
  image_size: 64
  rotation_deg: 5
  shift: 0.03
  shear_deg: 0
  zoom: [0.95, 1.05]
  hflip: 0.0
  blur_prob: 0.0
model:
  arch: resnet18
  pretrained: none
  finetune_depth: 4
  head_channels: 64
  hidden: 64
  dropout: 0.1
train:
  epochs: 12
  batch_size: 8
  lr_backbone: 0.002
  lr_head: 0.003
  warmup_epochs: 0.5
  num_workers: 2
  cpus_per_worker: 1
  early_stopping_patience: 0
data:
  decode_batch_size: 64
score:
  batch_size: 32
"""

ARCHIVE_IMAGES = 240
ARCHIVE_SIZE = 128


def demo_config(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    return load_config(None, overrides, text=DEMO_CONFIG)


def run_demo(workdir: str, cfg: Config, verbose: bool = False) -> int:
    """Synthesise -> train -> score under ``workdir``; -> exit status."""
    start = time.perf_counter()
    workdir = os.path.abspath(workdir)
    archive, run, scores = (os.path.join(workdir, d) for d in ("archive", "run", "scores"))
    _stage(f"1/3 phantom archive -> {archive}")
    if os.path.exists(os.path.join(archive, "labels.csv")):
        print("archive already there: reusing it")
    else:
        summary = synthetic.generate_archive(archive, ARCHIVE_IMAGES, seed=0, size=ARCHIVE_SIZE, difficulty=0.15,
                                             taxonomy=Taxonomy.from_config(cfg.taxonomy), patient_salt=cfg.dicom.patient_salt)
        broken = synthetic.add_broken_files(archive)
        print(summary.table())
        print(f"plus {len(broken)} broken files under broken/ (they must become error rows)")

    init_ray(cfg.runtime, verbose=verbose)
    _stage(f"2/3 training (Ray Train, {cfg.train.num_workers} workers) -> {run}")
    result = fit(cfg, archive, run)
    print(result.table())

    _stage(f"3/3 scoring the archive -> {scores}")
    scored = score(cfg, archive, result.best_checkpoint, scores)
    print(scored.table())
    print(f"\ndemo finished in {time.perf_counter() - start:,.0f} s; query the report with e.g.\n"
          f"  python -c \"import pandas as pd; print(pd.read_parquet('{scores}/report').groupby('leaf_label').size())\"")
    return 0


def _stage(title: str) -> None:
    print(f"\n== {title}")
