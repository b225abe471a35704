"""The plaque segmentation model as the platform sees it: one object that hands ``data`` and
``train`` its pieces (the model, the training step, the cache check, the self-description its
checkpoints carry), as :data:`medhier.classify.task.CLASSIFY` does for the classifier. The
platform never imports this package; :mod:`medhier.plaque.seg_train` and :mod:`medhier.plaque.segment`
pass :data:`PLAQUE_SEG` to it.

A checkpoint of this task (``task: plaque-seg``) carries the ``seg`` section of the config it
was trained with (``model_sections``: a segment job always runs the model with its own input
settings) and, in ``task_meta``: the label set (value -> name), the input sequences in channel
order, the context slices, the reference sequence, the in-plane spacing and size the model sees,
the normalisation, the network and its input channels. ``model_id`` (the weights' hash) names
the model in reports, ledgers and SEG objects.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from medhier.config import Config, ConfigError
from medhier.data.cache import CacheInfo
from medhier.plaque import labels as L
from medhier.plaque.seg_inputs import input_channels
from medhier.plaque.seg_network import build_network
from medhier.plaque.seg_samples import model_settings
from medhier.plaque.seg_step import COLUMNS, SegStep
from medhier.train.loop import Env

__all__ = ["PLAQUE_SEG", "PlaqueSeg"]


class PlaqueSeg:
    """The plaque segmentation model's task object (stateless; every method takes the config)."""

    name = "plaque-seg"
    model_sections = ("seg",)
    columns = COLUMNS

    def build_model(self, cfg: Config, *, pretrained: bool = True) -> nn.Module:
        return build_network(cfg.seg)  # trained from scratch: no pretrained weights to skip

    def describe(self, cfg: Config) -> dict[str, Any]:
        seg = cfg.seg
        return {
            "labels": {str(value): name for value, name in enumerate(L.NAMES)},
            "sequences": list(seg.sequences),
            "context": seg.context,
            "reference": cfg.plaque.reference,
            "spacing_mm": seg.spacing_mm,
            "image_size": seg.image_size,
            "normalisation": {"method": "percentiles", "percentiles": list(seg.percentiles),
                              "what": "each sequence's volume scaled so that these percentiles become 0 and 1"},
            "network": {"arch": seg.arch, "channels": list(seg.channels), "res_units": seg.res_units},
            "input_channels": input_channels(seg),
        }

    def check_cache(self, info: CacheInfo, cfg: Config) -> None:
        wanted = model_settings(cfg.seg)
        if info.preprocess != wanted:
            differ = sorted(k for k in set(wanted) | set(info.preprocess or {}) if (info.preprocess or {}).get(k) != wanted.get(k))
            raise ConfigError(f"cache at {info.archive!r} was made for other model inputs ({', '.join(differ) or 'not a plaque cache'}: "
                              f"{ {k: (info.preprocess or {}).get(k) for k in differ} }, the config asks "
                              f"{ {k: wanted.get(k) for k in differ} }): prepare it again (medhier plaque train-seg does)")

    def metric(self, cfg: Config) -> str:
        return cfg.seg.metric

    def make_step(self, cfg: Config, env: Env, class_counts: dict[str, int]) -> SegStep:
        return SegStep(cfg, env, class_counts)

    def __reduce__(self):  # one instance everywhere, workers included
        return "PLAQUE_SEG"


PLAQUE_SEG = PlaqueSeg()

