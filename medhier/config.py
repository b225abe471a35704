"""Typed configuration: defaults in code < YAML file < ``section.key=value`` overrides.

Every section is a dataclass; :func:`load_config` builds a :class:`Config` and checks every key
and type against the defaults, so a typo or a wrong type fails at start-up with a message that
names the key, not an hour into a run.  Through Ray, pass ``cfg.to_dict()`` and rebuild it on the
worker with :meth:`Config.from_dict`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

import yaml

from medhier.io import storage
from medhier.io.storage import StorageConfig, StorageConfigError

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DicomConfig",
    "ModelConfig",
    "CovariateSpec",
    "FactorSpec",
    "PlaqueConfig",
    "PredictConfig",
    "PreprocessConfig",
    "RuntimeConfig",
    "ScoreConfig",
    "SegConfig",
    "ServeConfig",
    "StorageConfig",
    "TaxonomyConfig",
    "TrackingConfig",
    "TrainConfig",
    "TuneConfig",
    "WINDOW_PRESETS",
    "load_config",
]


class ConfigError(ValueError):
    """A configuration key is unknown, mistyped or out of range; the message names the key."""


# Radiology's usual CT windows (center, width) in Hounsfield units.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "bone": (400.0, 1800.0),
    "spine": (300.0, 1500.0),
    "soft_tissue": (40.0, 400.0),
    "brain": (40.0, 80.0),
    "lung": (-600.0, 1500.0),
    "liver": (60.0, 160.0),
    "mediastinum": (50.0, 350.0),
}


@dataclass
class TaxonomyConfig:
    """The class hierarchy: main class -> its subclasses, in display order."""

    classes: dict[str, list[str]] = field(
        default_factory=lambda: {
            "normal": ["normal"],
            "fracture": ["compression", "burst"],
            "lesion": ["benign", "malignant"],
        }
    )
    # Leaves ("main/sub") from least to most severe; the study roll-up reports the most severe.
    # Empty = the order of `classes`.
    severity: list[str] = field(default_factory=list)

    def validate(self, name: str) -> None:
        # Deferred on purpose: the platform loads this module and must not load a task package;
        # the taxonomy's own rules check the section.
        from medhier.classify.taxonomy import Taxonomy, TaxonomyError

        try:
            Taxonomy.from_config(self, where=name)
        except TaxonomyError as exc:
            raise ConfigError(str(exc)) from None


@dataclass
class DicomConfig:
    """How DICOM pixels become a displayable [0, 1] image."""

    # Per-modality window: a preset name (see WINDOW_PRESETS) or [center, width].
    windows: dict[str, Any] = field(default_factory=dict)
    # Where the VOI window comes from, first match wins: the per-modality window above, the
    # file's own WindowCenter/Width (or VOI LUT), the percentiles of the image, its min/max.
    window_order: list[str] = field(default_factory=lambda: ["config", "file", "percentile"])
    file_window_index: int = 0  # which of several file windows to use
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    frames: Literal["middle", "first", "all"] = "middle"
    # Guard against decompression bombs: rows * columns * samples * decoded frames.
    max_pixels: int = 64 * 1024 * 1024
    # Salt for the pseudonymous patient key. Empty: $MEDHIER_PATIENT_SALT, else a fixed default.
    # Never written out with the resolved config.
    patient_salt: str = ""

    def validate(self, name: str) -> None:
        for modality, spec in self.windows.items():
            window_from_spec(spec, where=f"{name}.windows.{modality}")
        allowed = ("config", "file", "percentile", "minmax")
        for source in self.window_order:
            if source not in allowed:
                raise ConfigError(
                    f"{name}.window_order: unknown source {source!r}; choose from {allowed}"
                )
        if not self.window_order:
            raise ConfigError(f"{name}.window_order: must name at least one source")
        if self.file_window_index < 0:
            raise ConfigError(f"{name}.file_window_index: must be >= 0")
        if len(self.percentiles) != 2 or not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ConfigError(
                f"{name}.percentiles: need [low, high] with 0 <= low < high <= 100, "
                f"got {self.percentiles}"
            )
        _positive(name, "max_pixels", self.max_pixels)


def window_from_spec(spec: Any, where: str) -> tuple[float, float]:
    """A window spec (preset name or [center, width]) -> (center, width) in output units."""
    if isinstance(spec, str):
        if spec not in WINDOW_PRESETS:
            raise ConfigError(
                f"{where}: unknown window preset {spec!r}; presets: {sorted(WINDOW_PRESETS)} "
                "or give [center, width]"
            )
        return WINDOW_PRESETS[spec]
    if (
        isinstance(spec, (list, tuple))
        and len(spec) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec)
    ):
        center, width = float(spec[0]), float(spec[1])
        if width <= 0:
            raise ConfigError(f"{where}: window width must be > 0, got {width}")
        return center, width
    raise ConfigError(f"{where}: expected a preset name or [center, width], got {spec!r}")


@dataclass
class DataConfig:
    """The archive, its labels and the preprocessed cache."""

    archive: str = ""  # local folder or s3://bucket/prefix
    labels: str = ""  # CSV or Parquet manifest; empty = <archive>/labels.csv when it exists
    cache: str = ""  # preprocessed cache URI; empty = <output>/cache
    # Glob patterns (on the path relative to the archive root) that are not candidate images.
    # Matching objects are counted in the listing summary, never silently dropped.
    exclude: list[str] = field(
        default_factory=lambda: ["labels.csv", "*.csv", "*.parquet", "*.json", "*.md", ".*", "*/.*"]
    )
    # Patient-level split fractions; the rest is test.
    train_fraction: float = 0.7
    val_fraction: float = 0.15
    split_seed: int = 0
    # stratified: patients are dealt into splits so that every leaf (the labels codec's classes)
    # is in every split where its patients allow (medhier/data/splits.py); hash: each patient's
    # split is a hash of its key alone (no second pass over the decoded rows, stable when the
    # archive grows).
    split: Literal["stratified", "hash"] = "stratified"
    decode_batch_size: int = 256  # files per decode task (a manifest row group)
    decode_num_cpus: float = 1.0  # CPUs reserved per decode task
    manifest_rows_per_file: int = 100_000  # listing rows per manifest Parquet file

    def validate(self, name: str) -> None:
        for key in ("train_fraction", "val_fraction"):
            value = getattr(self, key)
            if not 0 <= value <= 1:
                raise ConfigError(f"{name}.{key}: must be in [0, 1], got {value}")
        if self.train_fraction + self.val_fraction > 1:
            raise ConfigError(
                f"{name}.train_fraction + {name}.val_fraction must be <= 1, got "
                f"{self.train_fraction} + {self.val_fraction}"
            )
        _positive(name, "decode_batch_size", self.decode_batch_size)
        _positive(name, "decode_num_cpus", self.decode_num_cpus)
        _positive(name, "manifest_rows_per_file", self.manifest_rows_per_file)


@dataclass
class PreprocessConfig:
    """Image geometry, normalisation and the training augmentation (seeds 000/001)."""

    image_size: int = 224
    resize: Literal["pad", "stretch", "crop"] = "pad"  # pad keeps the aspect ratio
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # ImageNet
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # Training augmentation, applied per sample on batches on the training device.
    rotation_deg: float = 15.0
    shift: float = 0.1  # fraction of the image size
    shear_deg: float = 5.0
    zoom: list[float] = field(default_factory=lambda: [0.9, 1.1])
    hflip: float = 0.5  # probability
    vflip: float = 0.0  # probability; off by default: it changes anatomy
    blur_prob: float = 0.2
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 1.0])  # pixels

    def validate(self, name: str) -> None:
        if self.image_size < 16:
            raise ConfigError(f"{name}.image_size: must be >= 16, got {self.image_size}")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if len(values) != 3:
                raise ConfigError(f"{name}.{key}: need 3 values (one per channel), got {values}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"{name}.std: every value must be > 0, got {self.std}")
        if len(self.zoom) != 2 or not 0 < self.zoom[0] <= self.zoom[1]:
            raise ConfigError(f"{name}.zoom: need [low, high] with 0 < low <= high, got {self.zoom}")
        if len(self.blur_sigma) != 2 or not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ConfigError(
                f"{name}.blur_sigma: need [low, high] with 0 < low <= high, got {self.blur_sigma}"
            )
        for key in ("hflip", "vflip", "blur_prob"):
            value = getattr(self, key)
            if not 0 <= value <= 1:
                raise ConfigError(f"{name}.{key}: a probability in [0, 1], got {value}")
        if not 0 <= self.shift < 0.5:
            raise ConfigError(f"{name}.shift: must be in [0, 0.5), got {self.shift}")
        for key in ("rotation_deg", "shear_deg"):
            if not 0 <= getattr(self, key) <= 90:
                raise ConfigError(f"{name}.{key}: must be in [0, 90], got {getattr(self, key)}")


# Validation metrics a run can optimise (val_loss is minimised, the others maximised).
ValMetric = Literal["leaf_macro_auc", "main_macro_auc", "main_accuracy", "leaf_accuracy", "path_accuracy", "val_loss"]
MINIMISED_METRICS = frozenset({"val_loss"})


@dataclass
class ModelConfig:
    """The network (seed 000): a ResNet trunk, attention conv heads, hierarchical outputs."""

    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet50"
    # imagenet: torchvision's weights (downloaded); none: from scratch; else a state_dict file
    # (local path or s3:// URI) for clusters without internet access.
    pretrained: str = "imagenet"
    head: Literal["hierarchical", "flat"] = "hierarchical"
    attention: Literal["self", "cbam", "none"] = "self"
    head_channels: int = 256  # channels of each head's attention conv block
    hidden: int = 256  # main head FC features, concatenated into the subclass head
    dropout: float = 0.2
    finetune_depth: int = 2  # top k of the 4 ResNet stages train; 4 = the whole trunk

    def validate(self, name: str) -> None:
        if not 0 <= self.finetune_depth <= 4:
            raise ConfigError(f"{name}.finetune_depth: must be 0..4 (stages that train), got {self.finetune_depth}")
        _positive(name, "head_channels", self.head_channels)
        _positive(name, "hidden", self.hidden)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{name}.dropout: must be in [0, 1), got {self.dropout}")
        if not self.pretrained:
            raise ConfigError(f"{name}.pretrained: use imagenet, none, or a weights file path/URI")


@dataclass
class TrainConfig:
    """Ray Train (DDP) settings, optimisation and the loss."""

    epochs: int = 20
    batch_size: int = 32  # per worker
    lr_backbone: float = 1e-4
    lr_head: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay
    sub_loss_weight: float = 1.0  # lambda in CE(main) + lambda * CE(sub | true main)
    class_weights: bool = True  # balanced weights from the training split (seed 001 §5.2)
    label_smoothing: float = 0.0
    metric: ValMetric = "leaf_macro_auc"  # validation metric for `best` and early stopping
    early_stopping_patience: int = 5  # epochs without improvement; 0 = off
    num_workers: int = 2
    use_gpu: Literal["auto", "true", "false"] = "auto"  # auto: GPUs when the cluster has them
    cpus_per_worker: float = 1.0  # fractional on CPU-only machines so that Ray Data keeps CPUs
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on CPU/Ampere+, fp16 else
    channels_last: bool = True
    max_failures: int = 2  # worker failures survived by restarting from the last checkpoint
    checkpoints_to_keep: int = 2
    seed: int = 0
    prefetch_batches: int = 2
    shuffle_buffer: int = 256  # local shuffle buffer (rows) per worker
    # After training: the referral threshold is the lowest leaf probability at which the images
    # kept reach this accuracy on the validation split (the checkpoint's score.refer_below).
    refer_target_accuracy: float = 0.95
    # After training: "temperature" fits one temperature per level on the validation split;
    # "temperature_bias" also one bias per class (undoes the class weights' shift of the
    # probabilities; can change decisions); "auto" the latter from
    # medhier.classify.calibration.BIAS_MIN_IMAGES (100) validation images on.
    calibration: Literal["auto", "temperature", "temperature_bias"] = "auto"
    bootstrap_samples: int = 1000  # patient-level bootstrap resamples behind metrics.json's 95 % intervals

    def validate(self, name: str) -> None:
        for key in ("epochs", "batch_size", "num_workers", "cpus_per_worker", "checkpoints_to_keep"):
            _positive(name, key, getattr(self, key))
        for key in ("lr_backbone", "lr_head"):
            _positive(name, key, getattr(self, key))
        for key in ("weight_decay", "warmup_epochs", "sub_loss_weight", "early_stopping_patience", "max_failures", "prefetch_batches", "shuffle_buffer"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{name}.{key}: must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"{name}.label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.refer_target_accuracy <= 1:
            raise ConfigError(f"{name}.refer_target_accuracy: an accuracy in (0, 1], got {self.refer_target_accuracy}")
        if self.bootstrap_samples < 0:
            raise ConfigError(f"{name}.bootstrap_samples: must be >= 0 (0 = no intervals), got {self.bootstrap_samples}")


@dataclass
class ScoreConfig:
    """Archive scoring: the model actors, precision and the report."""

    batch_size: int = 32  # images per inference call
    # int8: CPU only; post-training static quantization calibrated on images sampled from the
    # archive, compiled (medhier/int8.py). 1.6-2x compiled bf16 on CPUs without AMX.
    precision: Literal["auto", "bf16", "fp16", "fp32", "int8"] = "auto"
    int8_calibration_images: int = 64  # images whose activation ranges set the int8 scales
    int8_check_images: int = 32  # other images on which int8 is compared with fp32
    int8_min_agreement: float = 0.95  # refuse to score when the predicted leaves agree less often
    # torch.compile (inductor, freezing) multiplies CPU throughput ~3x but compiling takes most of
    # a minute per actor: auto compiles when each actor has at least compile_min_images to score.
    compile: Literal["auto", "true", "false"] = "auto"
    compile_min_images: int = 5000
    # Compiled (and int8-quantized) models kept across runs per model id and machine type
    # (medhier/infer/compiled.py); a warm one makes auto compile at any size. "" = <output>/compiled.
    model_cache: str = ""
    actors: int = 0  # model actors; 0 = one per GPU, or one on a CPU-only cluster
    # GPU actors: auto = when the cluster has GPUs at submit time; "true" waits for them (an
    # autoscaling cluster whose GPU nodes are scaled to zero would otherwise score on CPUs).
    use_gpu: Literal["auto", "true", "false"] = "auto"
    model_version: str = ""  # label written next to model_id; empty = "epoch-<N>" of the checkpoint
    max_error_rate: float = -1.0  # fail the run (exit code 3) above this share of error files; <0 = off
    # --explain: Grad-CAM overlays for rows whose main class is not in explain_skip_mains and
    # whose leaf probability is at least explain_min_prob.
    explain_min_prob: float = 0.5
    explain_skip_mains: list[str] = field(default_factory=lambda: ["normal"])
    # Referral ("refer" in the report and the endpoint's answer): an image is referred to a human
    # reader when its calibrated leaf probability is below refer_below (null = the threshold the
    # checkpoint fitted on its validation split, train.refer_target_accuracy; 0 = never) or the
    # gap between its two most probable leaves is below refer_margin (0 = off).
    refer_below: float | None = None
    refer_margin: float = 0.0
    # Drift: each run compares its images with the checkpoint's training profile (population
    # stability index per feature) and warns above drift_warn_psi once it scored drift_min_images.
    drift_warn_psi: float = 0.25
    drift_min_images: int = 200

    def validate(self, name: str) -> None:
        _positive(name, "batch_size", self.batch_size)
        if self.refer_below is not None and not 0 <= self.refer_below <= 1:
            raise ConfigError(f"{name}.refer_below: a probability in [0, 1] (or null for the checkpoint's), got {self.refer_below}")
        if not 0 <= self.refer_margin <= 1:
            raise ConfigError(f"{name}.refer_margin: a probability gap in [0, 1], got {self.refer_margin}")
        _positive(name, "drift_warn_psi", self.drift_warn_psi)
        if self.drift_min_images < 0:
            raise ConfigError(f"{name}.drift_min_images: must be >= 0, got {self.drift_min_images}")
        _positive(name, "compile_min_images", self.compile_min_images)
        _positive(name, "int8_calibration_images", self.int8_calibration_images)
        if self.int8_check_images < 0:
            raise ConfigError(f"{name}.int8_check_images: must be >= 0, got {self.int8_check_images}")
        if not 0 <= self.int8_min_agreement <= 1:
            raise ConfigError(f"{name}.int8_min_agreement: a share in [0, 1], got {self.int8_min_agreement}")
        if self.precision == "int8" and self.use_gpu == "true":
            raise ConfigError(f"{name}.precision: int8 is a CPU path, but {name}.use_gpu is true; use bf16 or fp16 on GPUs")
        if self.actors < 0:
            raise ConfigError(f"{name}.actors: must be >= 0, got {self.actors}")
        if self.max_error_rate > 1:
            raise ConfigError(f"{name}.max_error_rate: a share in [0, 1] (or < 0 for off), got {self.max_error_rate}")


@dataclass
class ServeConfig:
    """The online endpoint (``medhier serve``, Ray Serve)."""

    route: str = "/"  # POST <route>predict
    port: int = 8000
    host: str = "127.0.0.1"  # 0.0.0.0 to listen on every interface
    min_replicas: int = 1
    max_replicas: int = 1  # autoscaling between min and max on ongoing requests
    target_ongoing_requests: float = 8.0
    max_batch_size: int = 16  # requests answered by one forward pass (@serve.batch)
    batch_wait_timeout_s: float = 0.01
    max_upload_mb: float = 64.0  # larger uploads get HTTP 413
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0

    def validate(self, name: str) -> None:
        if not self.route.startswith("/"):
            raise ConfigError(f"{name}.route: must start with '/', got {self.route!r}")
        for key in ("port", "min_replicas", "max_replicas", "max_batch_size", "max_upload_mb", "target_ongoing_requests"):
            _positive(name, key, getattr(self, key))
        if self.max_replicas < self.min_replicas:
            raise ConfigError(f"{name}.max_replicas: must be >= min_replicas ({self.min_replicas}), got {self.max_replicas}")
        if self.batch_wait_timeout_s < 0 or self.replica_cpus < 0 or self.replica_gpus < 0:
            raise ConfigError(f"{name}: batch_wait_timeout_s, replica_cpus and replica_gpus must be >= 0")


@dataclass
class TuneConfig:
    """Ray Tune search: the space as plain specs, ASHA, concurrency."""

    # Dotted config key -> one of {choice: [...]}, {uniform: [low, high]},
    # {loguniform: [low, high]}, {randint: [low, high]} (inclusive).
    space: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "model.finetune_depth": {"choice": [0, 1, 2, 3, 4]},
            "train.lr_backbone": {"loguniform": [1e-5, 1e-3]},
            "train.lr_head": {"loguniform": [1e-4, 1e-2]},
        }
    )
    num_samples: int = 8
    metric: Literal[""] | ValMetric = ""  # empty = train.metric
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: int = 2
    max_concurrent_trials: int = 0  # 0 = from the cluster's GPUs (or CPUs) and a trial's needs
    trial_max_failures: int = 1  # a failed trial restarts from its last checkpoint this often
    seed: int = 0  # sampling seed: the same seed draws the same trials

    def validate(self, name: str) -> None:
        _positive(name, "num_samples", self.num_samples)
        _positive(name, "grace_period", self.grace_period)
        if self.reduction_factor < 2:
            raise ConfigError(f"{name}.reduction_factor: must be >= 2, got {self.reduction_factor}")
        if self.max_concurrent_trials < 0 or self.trial_max_failures < 0:
            raise ConfigError(f"{name}: max_concurrent_trials and trial_max_failures must be >= 0")


@dataclass
class PlaqueConfig:
    """Longitudinal plaque change (seed 003): which series are which sequence, registration."""

    # Sequence name -> case-insensitive glob patterns on SeriesDescription. The first sequence
    # (in this order) with a matching pattern claims a series, so list the specific before the
    # general (CE-T1w before T1w).
    sequences: dict[str, list[str]] = field(
        default_factory=lambda: {
            # [-_ ] anchors "CE" as a word: "T1W ... SLICE" is no contrast-enhanced series
            "CE-T1w": ["*CE[-_ ]T1*", "*T1*[-_ ]CE", "*T1*[-_ ]CE[-_ ]*", "*T1*POST*", "*POST*T1*", "*T1*GAD*", "*T1*+C*"],
            "T1w": ["*T1*"],
            "T2w": ["*T2*"],
            "TOF": ["*TOF*", "*MRA*"],
        }
    )
    reference: str = "T1w"  # the sequence every other one is registered to; its grid is the visit's
    register: bool = True  # false: the sequences are already registered (same scanner session, no motion)
    min_visits: int = 2  # visits a patient needs for change rates; fewer are counted in the summary
    # DICOM SEG segment -> plaque label: label name -> case-insensitive glob patterns on the
    # segment's label (then its coded property), in paint order: overlapping segments are painted
    # in this order, later over earlier (medhier.io.seg). outer_wall is painted with the wall value.
    seg_labels: dict[str, list[str]] = field(
        default_factory=lambda: {
            "outer_wall": ["*outer*wall*", "*vessel*wall*", "wall"],
            "lumen": ["*lumen*"],
            "lipid_core": ["*lipid*", "*necrotic*", "*LRNC*"],
            "haemorrhage": ["*haemorrhage*", "*hemorrhage*", "*IPH*"],
            "calcification": ["*calc*"],
            "fibrous_cap": ["*cap*"],
        }
    )

    def validate(self, name: str) -> None:
        if not self.sequences:
            raise ConfigError(f"{name}.sequences: name at least one sequence with its SeriesDescription patterns")
        for seq, patterns in self.sequences.items():
            if not patterns or not all(isinstance(p, str) and p for p in patterns):
                raise ConfigError(f"{name}.sequences.{seq}: need a list of non-empty patterns, got {patterns!r}")
        if self.reference not in self.sequences:
            close = difflib.get_close_matches(self.reference, list(self.sequences), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{name}.reference: {self.reference!r} is not one of {name}.sequences {list(self.sequences)}{hint}")
        for label, patterns in self.seg_labels.items():
            if not patterns or not all(isinstance(p, str) and p for p in patterns):
                raise ConfigError(f"{name}.seg_labels.{label}: need a list of non-empty patterns, got {patterns!r}")
        if self.min_visits < 2:
            raise ConfigError(f"{name}.min_visits: change needs at least 2 visits, got {self.min_visits}")


@dataclass
class FactorSpec:
    """One change factor (``predict.factors.<name>``): the per-visit measurement whose change per
    year it is, as an absolute rate (the measurement's unit per year) or a relative one (% of the
    first visit's value per year; volumes only)."""

    measurement: str = ""
    kind: Literal["absolute", "relative"] = "absolute"


@dataclass
class CovariateSpec:
    """One column of the patients table (``predict.covariates.<column>``)."""

    type: Literal["numeric", "categorical", "boolean"] = "numeric"
    unit: str = ""  # documentation only ("years", "kg", "mmHg"); numeric values are taken as given
    categories: list[str] = field(default_factory=list)  # categorical: every allowed value, in order


def _factor(measurement: str, kind: str = "absolute") -> FactorSpec:
    return FactorSpec(measurement, kind)  # type: ignore[arg-type]


@dataclass
class PredictConfig:
    """The plaque task's change factors and prediction model (seed 003): which rates, which
    inputs, the gradient-boosted trees (XGBoost on Ray Train), their search space, the intervals."""

    # Factor name -> the measurement (medhier.plaque.measure.MEASUREMENTS) whose change per year it
    # is; relative: % of the earlier visit's value per year (null when that value is 0).
    factors: dict[str, FactorSpec] = field(
        default_factory=lambda: {
            "wall_thickening_mm_per_year": _factor("max_wall_thickness_mm"),
            "stenosis_change_pct_per_year": _factor("stenosis_area_pct"),
            "lipid_growth_mm3_per_year": _factor("lipid_core_volume_mm3"),
            "haemorrhage_change_mm3_per_year": _factor("haemorrhage_volume_mm3"),
            "cap_thickness_change_mm_per_year": _factor("min_cap_thickness_mm"),
            "lipid_growth_pct_per_year": _factor("lipid_core_volume_mm3", "relative"),
        }
    )
    # The earlier visit's measurements the model sees (never the later visit's).
    features: list[str] = field(
        default_factory=lambda: [
            "vessel_length_mm", "lumen_volume_mm3", "vessel_volume_mm3", "wall_volume_mm3", "lipid_core_volume_mm3",
            "haemorrhage_volume_mm3", "calcification_volume_mm3", "fibrous_cap_volume_mm3", "reference_lumen_area_mm2",
            "min_lumen_area_mm2", "stenosis_area_pct", "stenosis_diameter_pct", "mean_nwi", "max_nwi",
            "mean_wall_thickness_mm", "max_wall_thickness_mm", "min_cap_thickness_mm",
        ]
    )
    # The patients table's columns besides its key (patient_key, or patient_id hashed on read):
    # seed 003's structured record. Unknown columns and values of the wrong type fail at start-up.
    covariates: dict[str, CovariateSpec] = field(
        default_factory=lambda: {
            "sex": CovariateSpec("categorical", "", ["F", "M"]),
            "age_years": CovariateSpec("numeric", "years"),
            "weight_kg": CovariateSpec("numeric", "kg"),
            "smoking": CovariateSpec("categorical", "", ["never", "former", "current"]),
            "drinking": CovariateSpec("categorical", "", ["none", "moderate", "heavy"]),
            "systolic_bp_mmhg": CovariateSpec("numeric", "mmHg"),
            "diastolic_bp_mmhg": CovariateSpec("numeric", "mmHg"),
            "glucose_mmol_l": CovariateSpec("numeric", "mmol/L"),
            "heart_rate_bpm": CovariateSpec("numeric", "bpm"),
            "statin": CovariateSpec("boolean"),
            "antihypertensive": CovariateSpec("boolean"),
        }
    )
    coverage: float = 0.9  # prediction intervals (split-conformal on the validation split)
    # What the trees start from: ridge = the ridge baseline's prediction (the trees learn what a
    # linear model misses), mean = the training mean (plain boosting).
    base: Literal["ridge", "mean"] = "ridge"
    ridge_alpha: float = 1.0  # L2 penalty of the ridge (baseline and base) on standardised inputs
    # XGBoost (tree_method hist, squared error), one booster per factor.
    num_boost_round: int = 1000
    early_stopping_rounds: int = 40  # on the validation split; 0 = off
    max_depth: int = 3
    learning_rate: float = 0.05
    min_child_weight: float = 5.0
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    reg_lambda: float = 1.0
    num_workers: int = 1  # Ray Train workers (data-parallel XGBoost)
    cpus_per_worker: float = 1.0  # also XGBoost's threads per worker
    seed: int = 0
    # `medhier plaque tune`: dotted predict.* key -> {choice|uniform|loguniform|randint: [...]};
    # tune.num_samples, tune.seed, tune.max_concurrent_trials and tune.trial_max_failures apply.
    space: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "predict.max_depth": {"choice": [2, 3, 4, 6]},
            "predict.learning_rate": {"loguniform": [0.01, 0.3]},
            "predict.min_child_weight": {"loguniform": [1.0, 30.0]},
            "predict.subsample": {"uniform": [0.5, 1.0]},
        }
    )

    def validate(self, name: str) -> None:
        # Deferred on purpose: the platform loads this module and must not load a task package;
        # the measurement columns are the plaque task's.
        from medhier.plaque.measure import MEASUREMENTS

        if not self.factors:
            raise ConfigError(f"{name}.factors: name at least one change factor")
        for factor, spec in self.factors.items():
            where = f"{name}.factors.{factor}"
            if not factor.isidentifier():
                raise ConfigError(f"{where}: a factor name is a column name (letters, digits, _), got {factor!r}")
            _known(f"{where}.measurement", spec.measurement, MEASUREMENTS)
            if spec.kind == "relative" and MEASUREMENTS[spec.measurement][0] != "mm3":
                raise ConfigError(f"{where}: relative rates are for volumes (mm3), {spec.measurement} is in {MEASUREMENTS[spec.measurement][0]}")
        if not self.features and not self.covariates:
            raise ConfigError(f"{name}: the model needs inputs: {name}.features or {name}.covariates")
        for feature in self.features:
            _known(f"{name}.features", feature, MEASUREMENTS)
        if len(set(self.features)) != len(self.features):
            raise ConfigError(f"{name}.features: names a measurement twice")
        for column, spec in self.covariates.items():
            where = f"{name}.covariates.{column}"
            if column in ("patient_key", "patient_id", "issuer_of_patient_id") or column in MEASUREMENTS:
                raise ConfigError(f"{where}: {column!r} is a key or measurement column, not a covariate")
            if spec.type == "categorical" and (not spec.categories or len(set(spec.categories)) != len(spec.categories)):
                raise ConfigError(f"{where}.categories: a categorical covariate lists its distinct values, got {spec.categories!r}")
            if spec.type != "categorical" and spec.categories:
                raise ConfigError(f"{where}.categories: only for categorical covariates ({column} is {spec.type})")
        if not 0 < self.coverage < 1:
            raise ConfigError(f"{name}.coverage: a probability in (0, 1), got {self.coverage}")
        for key in ("num_boost_round", "max_depth", "learning_rate", "num_workers", "cpus_per_worker"):
            _positive(name, key, getattr(self, key))
        for key in ("early_stopping_rounds", "ridge_alpha", "min_child_weight", "reg_lambda"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{name}.{key}: must be >= 0, got {getattr(self, key)}")
        for key in ("subsample", "colsample_bytree"):
            if not 0 < getattr(self, key) <= 1:
                raise ConfigError(f"{name}.{key}: a fraction in (0, 1], got {getattr(self, key)}")


def _known(where: str, value: str, known: dict) -> None:
    if value not in known:
        close = difflib.get_close_matches(value, list(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(known)}"
        raise ConfigError(f"{where}: {value!r} is not a measurement{hint}")


@dataclass
class SegConfig:
    """The plaque segmentation model (``medhier plaque train-seg``, ``segment``): what it sees,
    the network, its loss and the augmentation on the training device. A checkpoint carries this
    section: a model always runs with the settings it was trained with."""

    # plaque.sequences names, one input channel each, in this order (the reference's grid)
    sequences: list[str] = field(default_factory=lambda: ["T1w", "T2w", "TOF", "CE-T1w"])
    context: int = 0  # neighbouring slices on each side as extra channels (2.5-D); 0 = 2-D
    spacing_mm: float = 0.5  # in-plane pixel spacing the model sees (slices resampled to it)
    image_size: int = 64  # in-plane pixels the model sees: the grid's centre, cropped or zero-padded
    percentiles: list[float] = field(default_factory=lambda: [1.0, 99.0])  # per-volume scaling to [0, 1]
    arch: Literal["unet", "segresnet"] = "unet"  # MONAI's UNet or SegResNet, 2-D
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # features per level (SegResNet: the first)
    res_units: int = 1  # residual units per UNet level
    dropout: float = 0.0
    lr: float = 3e-3  # AdamW peak learning rate (warm-up and cosine decay from train.*)
    dice_weight: float = 1.0  # DiceCELoss: lambda_dice
    ce_weight: float = 1.0  # DiceCELoss: lambda_ce
    # DiceCELoss's per-label weight (CE and Dice) from the training split's voxels per label
    # (medhier.plaque.seg_step.class_weights), so the plaque components (~0.1 % of the voxels)
    # are not drowned by background, lumen and wall: "inverse_sqrt_fg" weighs a label by
    # sqrt(commonest foreground label's voxels / its voxels), the background as that commonest
    # label; "inverse_sqrt" by sqrt(commonest label's voxels / its voxels), background included
    # (raises the components most, but the vessel grows into the background: lumen and outer wall
    # Dice drop on small runs); both capped at max_class_weight. "none": 1 each, and better on
    # every structure from 64 phantom patients on. See benchmarks/RESULTS.md (issue 19).
    class_weights: Literal["none", "inverse_sqrt", "inverse_sqrt_fg"] = "none"
    max_class_weight: float = 50.0  # cap on a label's weight relative to the commonest label's (>= 1)
    metric: Literal["val_dice", "val_loss"] = "val_dice"  # picks best/ and stops early
    rotation_deg: float = 10.0  # augmentation: uniform rotation in [-r, r]
    scale: list[float] = field(default_factory=lambda: [0.9, 1.1])  # isotropic zoom range
    hflip: float = 0.5  # probability (carotids are left or right)
    vflip: float = 0.5  # probability (anterior-posterior)
    intensity_scale: float = 0.1  # per sequence gain U(1 - a, 1 + a)
    intensity_shift: float = 0.05  # per sequence offset U(-b, b), in normalised units
    batch_size: int = 64  # slices per forward pass when segmenting (segment job, evaluation)
    overlays: int = 6  # test slices drawn in the evaluation's overlay PNG

    def validate(self, name: str) -> None:
        if not self.sequences or len(set(self.sequences)) != len(self.sequences):
            raise ConfigError(f"{name}.sequences: name one or more distinct plaque.sequences, got {self.sequences}")
        if not 0 <= self.context <= 4:
            raise ConfigError(f"{name}.context: slices on each side, 0..4, got {self.context}")
        for key in ("spacing_mm", "lr", "batch_size"):
            _positive(name, key, getattr(self, key))
        if self.image_size < 16 or self.image_size % 16:
            raise ConfigError(f"{name}.image_size: a multiple of 16 (four 2x poolings), at least 16, got {self.image_size}")
        if len(self.percentiles) != 2 or not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ConfigError(f"{name}.percentiles: need [low, high] with 0 <= low < high <= 100, got {self.percentiles}")
        if not 2 <= len(self.channels) <= 5 or any(c <= 0 for c in self.channels):
            raise ConfigError(f"{name}.channels: 2 to 5 positive feature counts, got {self.channels}")
        if self.res_units < 0 or self.overlays < 0:
            raise ConfigError(f"{name}.res_units and {name}.overlays: must be >= 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{name}.dropout: must be in [0, 1), got {self.dropout}")
        if self.dice_weight < 0 or self.ce_weight < 0 or self.dice_weight + self.ce_weight == 0:
            raise ConfigError(f"{name}.dice_weight, ce_weight: >= 0 and not both 0")
        if not self.max_class_weight >= 1:
            raise ConfigError(f"{name}.max_class_weight: a cap relative to the commonest label's weight, >= 1, got {self.max_class_weight}")
        if not 0 <= self.rotation_deg <= 45:
            raise ConfigError(f"{name}.rotation_deg: must be in [0, 45], got {self.rotation_deg}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ConfigError(f"{name}.scale: need [low, high] with 0 < low <= high, got {self.scale}")
        for key in ("hflip", "vflip"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"{name}.{key}: a probability in [0, 1], got {getattr(self, key)}")
        if not 0 <= self.intensity_scale < 1 or self.intensity_shift < 0:
            raise ConfigError(f"{name}.intensity_scale in [0, 1) and {name}.intensity_shift >= 0")


@dataclass
class TrackingConfig:
    """Experiment tracking with MLflow (the optional extra ``medhier[tracking]``); off unless
    ``uri`` is set. See medhier.train.tracking."""

    # empty: off; http(s)://host:port (an MLflow server); sqlite:///path.db; or a local folder
    # (e.g. mlruns: an SQLite store mlruns/mlflow.db with artifacts in mlruns/artifacts)
    uri: str = ""
    experiment: str = "medhier"  # MLflow experiment the runs go to (created when missing)

    def validate(self, name: str) -> None:
        scheme = self.uri.split("://", 1)[0] if "://" in self.uri else ""
        if scheme and scheme not in ("http", "https", "sqlite", "file"):
            raise ConfigError(f"{name}.uri: {self.uri!r}: expected http(s)://host:port, sqlite:///path or a local folder")
        if not self.experiment.strip():
            raise ConfigError(f"{name}.experiment: must not be empty")


@dataclass
class RuntimeConfig:
    """How medhier talks to Ray."""

    ray_address: str = ""  # empty: an existing cluster from RAY_ADDRESS, else a local instance
    # Logical CPUs for a local instance; 0 = 1.5 x the cores (see runtime.default_local_cpus).
    local_num_cpus: int = 0
    progress: bool = True  # Ray Data progress bars

    def validate(self, name: str) -> None:
        if self.local_num_cpus < 0:
            raise ConfigError(f"{name}.local_num_cpus: must be >= 0, got {self.local_num_cpus}")


@dataclass
class Config:
    """All sections of one run. Build with :func:`load_config`."""

    storage: StorageConfig = field(default_factory=StorageConfig)
    taxonomy: TaxonomyConfig = field(default_factory=TaxonomyConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    plaque: PlaqueConfig = field(default_factory=PlaqueConfig)
    seg: SegConfig = field(default_factory=SegConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    # Keys whose values never leave the process (resolved configs, checkpoints, logs).
    REDACTED: typing.ClassVar[tuple[str, ...]] = ("dicom.patient_salt",)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with every value (secrets included): for passing to Ray workers only."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Rebuild (and re-validate) a config from :meth:`to_dict` or parsed YAML."""
        cfg = _build(cls, data, "")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            try:
                getattr(self, f.name).validate(f.name)
            except StorageConfigError as exc:
                raise ConfigError(str(exc)) from None

    def to_public_dict(self) -> dict[str, Any]:
        """Like :meth:`to_dict` but with secrets redacted: what gets written next to outputs."""
        data = self.to_dict()
        for dotted in self.REDACTED:
            section, key = dotted.split(".")
            if data[section].get(key):
                data[section][key] = "<redacted>"
        return data

    def to_yaml(self) -> str:
        """The resolved config (secrets redacted) as YAML, for writing next to every output."""
        return yaml.safe_dump(self.to_public_dict(), sort_keys=False)


def load_config(
    path: str | None = None,
    overrides: typing.Sequence[str] = (),
    text: str | None = None,
) -> Config:
    """Defaults < YAML (a local path, an s3:// URI, or ``text``) < ``section.key=value`` overrides.

    Raises :class:`ConfigError` naming the offending key or override.
    """
    data: dict[str, Any] = {}
    if path:
        try:  # a config may live in S3 next to the data
            text = storage.read_bytes(path).decode("utf-8")
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path!r} not found") from exc
    if text:
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path or '<text>'} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path or '<text>'}: top level must be a mapping of sections")
        data = loaded or {}
    for item in overrides:
        _apply_override(data, item)
    return Config.from_dict(data)


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or "." not in key or not key.replace(".", "").replace("_", "").isalnum():
        raise ConfigError(
            f"override {item!r}: expected section.key=value, e.g. preprocess.image_size=128"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    *parents, last = key.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node = child
    node[last] = value


def _build(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against type ``tp`` (coercing only lossless cases) and build it.

    Long: one dispatch over every kind of type a section field can have (dataclass, optional,
    literal, tuple, list, dict, scalar), each with its own error, reads best in one place."""
    label = where or "config"
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{label}: expected a mapping, got {type(value).__name__} {value!r}")
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp) if f.init]
        unknown = [k for k in value if k not in names]
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(names)}"
            prefix = f"{where}." if where else ""
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}")
        kwargs = {
            k: _build(hints[k], v, f"{where}.{k}" if where else k) for k, v in value.items()
        }
        return tp(**kwargs)

    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and str(value).lower() in choices:  # YAML reads `false` as a bool
            value = str(value).lower()
        if value not in choices:
            raise ConfigError(f"{label}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            try:
                return _build(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{label}: {value!r} matches none of the allowed types ({'; '.join(errors)})")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{label}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = get_args(tp) or (Any,)
        return [_build(item_tp, v, f"{label}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{label}: expected a mapping, got {type(value).__name__} {value!r}")
        key_tp, item_tp = get_args(tp) or (Any, Any)
        return {
            _build(key_tp, k, f"{label} key"): _build(item_tp, v, f"{label}.{k}")
            for k, v in value.items()
        }
    if tp is Any:
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{label}: expected null, got {value!r}")
        return None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{label}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{label}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" as a string
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{label}: expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{label}: expected a string, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{label}: unsupported config type {tp!r}")  # a bug in a section definition


def _positive(section: str, key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{section}.{key}: must be > 0, got {value}")
