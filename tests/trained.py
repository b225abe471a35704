"""A finished training run on a phantom archive, for the tests of what happens after training
(calibration, referral, intervals, model card, drift): the archive prepared into a stratified
cache by medhier, a model fitted on the cache's training split in this process (no Ray Train:
the harness has its own tests, and its start-up would dominate here), and then medhier's own
after-training step, ``finish_best``, exactly as ``medhier train`` runs it.

The model is fitted without augmentation (batches of 16, 10 epochs) until it knows its training
images by heart, so it is over-confident on new ones, as small medical models are: calibration
has something to correct.
The splits are 40/30/30 % of the patients, so that validation (where the temperatures and the
threshold are fitted) and test (where they are judged) hold about 70 images each.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medhier import columns as C
from medhier.classify.api import finish_best, prepare
from medhier.classify.labels import LEAF_INDEX, MAIN_INDEX
from medhier.classify.model import HierarchicalLoss
from medhier.classify.presets import eval_preset
from medhier.classify.task import CLASSIFY
from medhier.classify.taxonomy import Taxonomy
from medhier.config import Config, load_config
from medhier.data.cache import cache_table
from medhier.synthetic import spine as synthetic
from medhier.train.checkpoint import save_checkpoint

SMOKE = str(Path(__file__).parent.parent / "configs" / "smoke.yaml")


@dataclass(frozen=True)
class Finished:
    archive: str
    cache: str
    output: str  # holds best/, metrics.json, plots/, model_card.*
    cfg: Config
    model_id: str  # of the weights, before anything was fitted after training
    posthoc: dict
    metrics: dict

    @property
    def best(self) -> str:
        return os.path.join(self.output, "best")


def finished_run(directory: str, n: int = 240, epochs: int = 10) -> Finished:
    """Make the archive, cache, fitted ``best/`` and everything ``finish_best`` writes under
    ``directory`` (needs Ray initialised)."""
    archive, output = os.path.join(directory, "archive"), os.path.join(directory, "run")
    cache = os.path.join(output, "cache")
    synthetic.generate_archive(archive, n, seed=21, size=64, difficulty=0.1)
    # Large held-out splits (70 images each): a calibration error measured on 30 images is mostly noise.
    cfg = load_config(SMOKE, ["runtime.progress=false", "data.train_fraction=0.4", "data.val_fraction=0.3",
                              "train.bootstrap_samples=300", "train.refer_target_accuracy=0.8"])
    prepare(cfg, archive, cache)
    # Sorted: the cache's file order is Ray's, and the same images in another order fit another model.
    rows = cache_table(cache, cfg.storage, [C.PATH, C.FRAME, C.IMAGE, MAIN_INDEX, LEAF_INDEX], "train").sort_by([(C.PATH, "ascending"), (C.FRAME, "ascending")])
    size = cfg.preprocess.image_size
    images = np.frombuffer(b"".join(rows.column(C.IMAGE).to_pylist()), np.uint8).reshape(-1, size, size)
    mains, leaves = (torch.tensor(rows.column(c).to_numpy(), dtype=torch.long) for c in (MAIN_INDEX, LEAF_INDEX))
    torch.manual_seed(0)
    model = CLASSIFY.build_model(cfg)
    x = eval_preset(cfg.preprocess)(torch.from_numpy(images.copy()))
    loss_fn = HierarchicalLoss(Taxonomy.from_config(cfg.taxonomy))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for epoch in range(epochs):
        model.train()
        for idx in np.array_split(np.random.default_rng(epoch).permutation(len(x)), max(1, len(x) // 16)):
            loss = loss_fn(model(x[idx]), mains[idx], leaves[idx])["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    model_id = save_checkpoint(os.path.join(output, "best"), model.eval(), cfg, CLASSIFY, epoch=epochs - 1)
    posthoc, metrics = finish_best(cfg, os.path.join(output, "best"), cache, output)
    return Finished(archive, cache, output, cfg, model_id, posthoc.to_dict(), metrics)
