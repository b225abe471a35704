"""The plaque prediction model as saved by ``medhier plaque fit``: self-describing, content-hashed,
verified on load, no pickle.

A model is a folder (local or s3://)::

    model.json          format, model_id, factors (measurement, kind, unit), the feature space
                        (measurements, covariates with types, units, categories), the base
                        (ridge or mean) per factor as arrays, XGBoost parameters and rounds,
                        the intervals' coverage, conformal quantile and scale floor per
                        factor, training facts
    boosters/<factor>.ubj        one XGBoost booster per factor (UBJSON): the trees on the base
    boosters/<factor>.scale.ubj  the booster of its absolute error: the intervals' local scale

``model_id`` is a SHA-256 over model.json (without its own id) and every booster's bytes, so a
changed or truncated file is refused by :meth:`PredictionModel.load`, and it names the model in
the prediction report and its ledger.

A prediction for one row of inputs is, per factor, ``base(x) + trees(x)`` with the interval
``± quantile * max(scale(x), floor)`` (:mod:`medhier.plaque.intervals`): ``predict`` returns
the three arrays.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import xgboost

from medhier import __version__
from medhier.config import FactorSpec, StorageConfig
from medhier.io import storage
from medhier.plaque.boost import booster_from_bytes
from medhier.plaque.change import factor_unit
from medhier.plaque.features import FeatureSpace
from medhier.plaque.intervals import local_scale
from medhier.plaque.linear import LinearModel

__all__ = ["MODEL_FILE", "ModelError", "Prediction", "PredictionModel", "load_model", "model_folder"]

MODEL_FILE = "model.json"
FORMAT = 1
TASK = "plaque-predict"


class ModelError(ValueError):
    """A model folder that cannot be used; the message names it."""


@dataclass(frozen=True)
class Prediction:
    """One factor's predictions for n rows: point, lower and upper bound, each (n,) float64."""

    value: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


@dataclass
class PredictionModel:
    """What predicts the change factors (module docstring)."""

    factors: dict[str, FactorSpec]
    space: FeatureSpace
    base_kind: str
    base: dict[str, LinearModel]
    boosters: dict[str, bytes]
    scales: dict[str, bytes]
    rounds: dict[str, int]
    quantile: dict[str, float]  # conformal quantile of |error| / scale
    scale_floor: dict[str, float]
    coverage: float
    params: dict[str, Any]
    facts: dict[str, Any] = field(default_factory=dict)  # training split sizes, medhier version, ...
    model_id: str = ""

    def __post_init__(self) -> None:
        self._loaded: dict[str, xgboost.Booster] = {}
        if not self.model_id:
            self.model_id = self._digest()

    def predict(self, table: pa.Table) -> dict[str, Prediction]:
        """Each factor's prediction and interval for every row of ``table`` (the earlier visit's
        measurements and the covariates, :attr:`FeatureSpace.columns`)."""
        x = self.space.matrix(table)
        return self.predict_matrix(x)

    def predict_matrix(self, x: np.ndarray) -> dict[str, Prediction]:
        """As :meth:`predict`, from the encoded matrix (rows, len(space.names))."""
        dmatrix = xgboost.DMatrix(x, feature_names=self.space.names)
        out = {}
        for name in self.factors:
            value = self.point(name, x, dmatrix)
            half = self.quantile[name] * local_scale(self._booster(name, "scale").predict(dmatrix), self.scale_floor[name])
            out[name] = Prediction(value, value - half, value + half)
        return out

    def point(self, name: str, x: np.ndarray, dmatrix: xgboost.DMatrix | None = None) -> np.ndarray:
        """Factor ``name``'s point prediction, base + trees, for the matrix ``x``."""
        dmatrix = dmatrix if dmatrix is not None else xgboost.DMatrix(x, feature_names=self.space.names)
        return self.base[name].predict(x) + self._booster(name).predict(dmatrix)

    def raw_scale(self, name: str, x: np.ndarray) -> np.ndarray:
        """The scale booster's output (before the floor) for the matrix ``x``."""
        return self._booster(name, "scale").predict(xgboost.DMatrix(x, feature_names=self.space.names))

    def units(self) -> dict[str, str]:
        return {name: factor_unit(spec) for name, spec in self.factors.items()}

    def _booster(self, name: str, kind: str = "point") -> xgboost.Booster:
        key = f"{name}:{kind}"
        if key not in self._loaded:
            booster = booster_from_bytes(self.boosters[name] if kind == "point" else self.scales[name])
            # One thread: the model predicts a few rows inside a one-CPU Ray task; XGBoost's default
            # (every core) spends more on OpenMP start-up and contention than on the trees.
            booster.set_param({"nthread": 1})
            self._loaded[key] = booster
        return self._loaded[key]

    # -- storage ------------------------------------------------------------------------------

    def description(self) -> dict[str, Any]:
        """model.json's content without model_id."""
        return {
            "format": FORMAT, "task": TASK, "medhier": __version__,
            "factors": {n: {"measurement": s.measurement, "kind": s.kind, "unit": factor_unit(s)} for n, s in self.factors.items()},
            "features": self.space.to_dict(), "feature_names": self.space.names,
            "base_kind": self.base_kind, "base": {n: m.to_dict() for n, m in self.base.items()},
            "xgboost": self.params, "rounds": self.rounds,
            "intervals": {"method": "split-conformal, locally weighted", "coverage": self.coverage,
                          "quantile": self.quantile, "scale_floor": self.scale_floor},
            "facts": self.facts,
        }

    def _digest(self) -> str:
        h = hashlib.sha256(json.dumps(self.description(), sort_keys=True, allow_nan=True).encode())
        for name in sorted(self.boosters):
            h.update(name.encode() + b"\0" + hashlib.sha256(self.boosters[name]).digest())
            h.update(hashlib.sha256(self.scales[name]).digest())
        return h.hexdigest()[:16]

    def save(self, uri: str, storage_cfg: StorageConfig) -> None:
        """Write the folder: boosters first, model.json last (a reader sees a complete model or none)."""
        for name in self.factors:
            storage.write_bytes(storage.join(uri, "boosters", f"{name}.ubj"), self.boosters[name], storage_cfg)
            storage.write_bytes(storage.join(uri, "boosters", f"{name}.scale.ubj"), self.scales[name], storage_cfg)
        text = json.dumps({"model_id": self.model_id, **self.description()}, indent=1, allow_nan=True)
        storage.write_text(storage.join(uri, MODEL_FILE), text, storage_cfg)

    @classmethod
    def load(cls, uri: str, storage_cfg: StorageConfig) -> PredictionModel:
        """Read and verify a model folder; ModelError names what is wrong."""
        uri = storage.normalize(uri)
        try:
            meta = json.loads(storage.read_bytes(storage.join(uri, MODEL_FILE), storage_cfg))
        except FileNotFoundError:
            raise FileNotFoundError(f"model {uri!r}: no {MODEL_FILE} (give the `medhier plaque fit` output's model/ folder)") from None
        except ValueError as exc:
            raise ModelError(f"model {uri}: {MODEL_FILE} is not JSON ({exc})") from None
        if meta.get("task") != TASK or meta.get("format") != FORMAT:
            raise ModelError(f"model {uri}: not a plaque prediction model of format {FORMAT} "
                             f"(task {meta.get('task')!r}, format {meta.get('format')!r})")
        try:
            boosters = {n: storage.read_bytes(storage.join(uri, "boosters", f"{n}.ubj"), storage_cfg) for n in meta["factors"]}
            scales = {n: storage.read_bytes(storage.join(uri, "boosters", f"{n}.scale.ubj"), storage_cfg) for n in meta["factors"]}
        except FileNotFoundError as exc:
            raise ModelError(f"model {uri}: a booster is missing ({exc})") from None
        except KeyError as exc:
            raise ModelError(f"model {uri}: {MODEL_FILE} lacks {exc}") from None
        model = cls(
            factors={n: FactorSpec(f["measurement"], f["kind"]) for n, f in meta["factors"].items()},
            space=FeatureSpace.from_dict(meta["features"]), base_kind=meta["base_kind"],
            base={n: LinearModel.from_dict(m) for n, m in meta["base"].items()}, boosters=boosters, scales=scales,
            rounds={n: int(r) for n, r in meta["rounds"].items()},
            quantile={n: float(w) for n, w in meta["intervals"]["quantile"].items()},
            scale_floor={n: float(w) for n, w in meta["intervals"]["scale_floor"].items()},
            coverage=float(meta["intervals"]["coverage"]), params=meta["xgboost"], facts=meta.get("facts", {}),
        )
        if model.model_id != meta.get("model_id"):
            raise ModelError(f"model {uri}: content does not match its model_id {meta.get('model_id')!r} "
                             f"(got {model.model_id}): a file was changed or cut short")
        return model


def model_folder(uri: str, storage_cfg: StorageConfig) -> str:
    """``uri`` itself when it holds model.json, else its model/ folder when that does (a
    ``medhier plaque fit`` output)."""
    uri = storage.normalize(uri)
    inner = storage.join(uri, "model")
    if not storage.exists(storage.join(uri, MODEL_FILE), storage_cfg) and storage.exists(storage.join(inner, MODEL_FILE), storage_cfg):
        return inner
    return uri


def load_model(uri: str, storage_cfg: StorageConfig) -> PredictionModel:
    """The model of a fit output or of a model folder, verified (:meth:`PredictionModel.load`)."""
    return PredictionModel.load(model_folder(uri, storage_cfg), storage_cfg)
