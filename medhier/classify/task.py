"""The classifier as the platform sees it: one object that hands ``data``, ``train`` and
``infer`` the classifier's pieces (labels codec, model, training step, predictor, report
columns, study roll-up). The platform never imports this package; the classifier's entry points
(:mod:`medhier.classify.api`) pass :data:`CLASSIFY` to it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from torch import nn

from medhier.classify.calibration import Temperatures
from medhier.classify.export import export_samples, export_spec
from medhier.classify.labels import TRAIN_COLUMNS, HierarchicalLabels
from medhier.classify.model import build_model, untie_shared_modules
from medhier.classify.referral import Referral
from medhier.classify.report import ClassifierPredictor, LeafTally, answer, report_columns, report_values
from medhier.classify.studies import write_studies
from medhier.classify.taxonomy import Taxonomy
from medhier.config import Config, StorageConfig
from medhier.data.cache import CacheInfo, check_preprocess_matches
from medhier.infer.export import ExportSpec
from medhier.infer.ledger import Ledger
from medhier.train.checkpoint import Loaded

if TYPE_CHECKING:
    from medhier.classify.step import ClassifyStep
    from medhier.train.loop import Env

__all__ = ["CLASSIFY", "Classifier", "taxonomy_of"]


class Classifier:
    """The hierarchical classifier's task object (stateless; every method takes the config)."""

    name = "classify"
    model_module = "medhier.classify.model"
    model_sections = ("taxonomy", "dicom", "preprocess", "model")
    columns = TRAIN_COLUMNS

    def codec(self, cfg: Config) -> HierarchicalLabels:
        return HierarchicalLabels(Taxonomy.from_config(cfg.taxonomy))

    def build_model(self, cfg: Config, *, pretrained: bool = True) -> nn.Module:
        return build_model(cfg.model, Taxonomy.from_config(cfg.taxonomy), cfg.storage, load_pretrained=pretrained)

    def describe(self, cfg: Config) -> dict[str, Any]:
        taxonomy = Taxonomy.from_config(cfg.taxonomy)
        return {"taxonomy": taxonomy.to_dict(), "leaves": list(taxonomy.leaf_names)}

    def check_cache(self, info: CacheInfo, cfg: Config) -> None:
        check_preprocess_matches(info, cfg.preprocess)

    def metric(self, cfg: Config) -> str:
        return cfg.train.metric

    def make_step(self, cfg: Config, env: Env, class_counts: dict[str, int]) -> ClassifyStep:
        from medhier.classify.step import ClassifyStep  # training only (Ray Train, sklearn): model actors and scoring drivers never load it

        return ClassifyStep(cfg, env, class_counts)

    def predictor(self, loaded: Loaded) -> ClassifierPredictor:
        return ClassifierPredictor(loaded.cfg, Temperatures.from_meta(loaded.task_meta, f"checkpoint {loaded.uri!r}"))

    def prepare_int8(self, model: nn.Module) -> None:
        untie_shared_modules(model)

    def report_columns(self, cfg: Config) -> list[tuple[str, pa.DataType]]:
        return report_columns(Taxonomy.from_config(cfg.taxonomy))

    def report_values(self, cfg: Config, batch: dict[str, np.ndarray], ok: np.ndarray) -> dict[str, pa.Array]:
        return report_values(Taxonomy.from_config(cfg.taxonomy), batch, ok, Referral.of(cfg))

    def tally(self, cfg: Config) -> LeafTally:
        return LeafTally(Taxonomy.from_config(cfg.taxonomy))

    def answer(self, cfg: Config, predictions: dict[str, np.ndarray], i: int) -> dict[str, Any]:
        return answer(Taxonomy.from_config(cfg.taxonomy), predictions, i, Referral.of(cfg))

    def after_commit(self, cfg: Config, ledger: Ledger, model_id: str, version: str) -> None:
        write_studies(ledger, Taxonomy.from_config(cfg.taxonomy), model_id, version)

    def export_spec(self, loaded: Loaded) -> ExportSpec:
        return export_spec(loaded)

    def export_samples(self, loaded: Loaded, uri: str, n: int, storage_cfg: StorageConfig) -> tuple[np.ndarray, str]:
        return export_samples(loaded, uri, n, storage_cfg)

    def __reduce__(self):  # one instance everywhere, workers included
        return "CLASSIFY"


CLASSIFY = Classifier()


def taxonomy_of(loaded: Loaded) -> Taxonomy:
    """The taxonomy a classifier checkpoint predicts."""
    return Taxonomy.from_dict(**loaded.task_meta["taxonomy"])
