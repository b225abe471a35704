"""A checkpoint fitted for a few full-batch steps on a phantom archive itself: an untrained
network gives every image nearly the same answer, and scoring and serving tests need several."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from medhier.classify.model import HierarchicalLoss
from medhier.classify.presets import eval_preset
from medhier.classify.task import CLASSIFY
from medhier.classify.taxonomy import Taxonomy
from medhier.config import Config
from medhier.io.image import decode_images
from medhier.train.checkpoint import save_checkpoint


def fitted_checkpoint(directory: str, cfg: Config, root: str, *, seed: int, steps: int, epoch: int) -> str:
    """Fit ``cfg``'s model with Adam for ``steps`` steps on every labelled image of ``root``
    (decoded and preprocessed as scoring does) and save it to ``directory`` -> ``directory``."""
    tax = Taxonomy.from_config(cfg.taxonomy)
    torch.manual_seed(seed)
    model = CLASSIFY.build_model(cfg)
    images, mains, leaves = [], [], []
    for row in csv.DictReader(open(Path(root, "labels.csv"))):
        _, (image,) = decode_images(Path(root, row["path"]).read_bytes(), cfg.dicom, cfg.preprocess.image_size)
        images.append(image)
        main, _, leaf = tax.encode(row["main"], row["sub"])
        mains.append(main)
        leaves.append(leaf)
    x = eval_preset(cfg.preprocess)(torch.from_numpy(np.stack(images)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = HierarchicalLoss(tax)
    for _ in range(steps):
        loss = loss_fn(model(x), torch.tensor(mains), torch.tensor(leaves))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(directory, model.eval(), cfg, CLASSIFY, epoch=epoch)
    return directory
