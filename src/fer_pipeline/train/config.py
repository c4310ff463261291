"""Typed `train`, `models.<name>` and `mlflow` sections of params.yaml.

Built with `fer_pipeline.params.build`, so an unknown or mistyped key fails at start-up with
its dotted name. Defaults here equal the study's recipe; params.yaml states them explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fer_pipeline.params import ParamsError, build, load_params

ARCHS = {"custom_cnn", "vgg16", "resnet50", "fernet"}
TRANSFER_ARCHS = {"vgg16", "resnet50"}
PRECISIONS = {"auto", "float32", "mixed_bfloat16", "mixed_float16"}


def _choice(name: str, value: Any, allowed: set[str]) -> None:
    if value not in allowed:
        raise ParamsError(f"{name} must be one of {sorted(allowed)}, got {value!r}")


@dataclass(frozen=True)
class AugmentParams:
    rotation: float = 0.0          # max rotation, degrees
    width_shift: float = 0.0       # max horizontal shift, fraction of width
    height_shift: float = 0.0      # max vertical shift, fraction of height
    shear: float = 0.0             # max shear factor (keras RandomShear x/y factor)
    zoom: float = 0.0              # max zoom in/out, fraction
    horizontal_flip: bool = False
    fill_mode: str = "nearest"     # constant | nearest | reflect | wrap
    contrast: float = 0.0          # max random contrast change, fraction
    random_erasing: float = 0.0    # probability of erasing one random rectangle (2-33% of area)

    def __post_init__(self) -> None:
        _choice("augmentation.fill_mode", self.fill_mode,
                {"constant", "nearest", "reflect", "wrap"})

    @property
    def enabled(self) -> bool:
        return bool(self.rotation or self.width_shift or self.height_shift or self.shear
                    or self.zoom or self.horizontal_flip or self.contrast or self.random_erasing)


@dataclass(frozen=True)
class ReduceLRParams:
    factor: float = 0.2
    patience: int = 6
    min_delta: float = 1e-4
    min_lr: float = 0.0


@dataclass(frozen=True)
class ModelParams:
    arch: str = "custom_cnn"
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adam"                 # adam | adamw | sgd (momentum 0.9, nesterov) | rmsprop
    learning_rate: float = 1e-3
    weight_decay: float = 0.0               # decoupled weight decay (adamw, sgd)
    lr_schedule: str = "plateau"            # plateau (ReduceLROnPlateau, the study) | cosine
    warmup_epochs: int = 0                  # cosine: linear warm-up epochs
    label_smoothing: float = 0.0            # cross-entropy label smoothing
    blocks_per_stage: int = 2               # fernet: conv blocks per resolution stage
    width: float = 1.0                      # multiplier on conv filters and dense units (tests)
    conv_filters: list[int] = field(default_factory=lambda: [32, 64, 128, 512])
    dense_units: list[int] = field(default_factory=lambda: [887])
    dropout: float = 0.5
    input_size: int = 224                   # transfer models: side the 48x48 input is resized to
    weights: str | None = None              # imagenet | null | path to a local .h5/.keras file
    freeze_base: bool = True                # transfer models: base frozen, only the head trains
    preprocessing: str = "rescale"          # rescale (x/255, the study) | base (network's own)
    augmentation: AugmentParams = field(default_factory=AugmentParams)
    class_weights: bool = False             # balanced class weights over the training split
    monitor: str = "val_accuracy"           # best-model / early-stopping criterion
    early_stopping_patience: int = 10
    reduce_lr: ReduceLRParams = field(default_factory=ReduceLRParams)
    cache_features: bool = True             # frozen base + no augmentation: base runs once

    def __post_init__(self) -> None:
        _choice("arch", self.arch, ARCHS)
        _choice("optimizer", self.optimizer, {"adam", "adamw", "sgd", "rmsprop"})
        _choice("lr_schedule", self.lr_schedule, {"plateau", "cosine"})
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ParamsError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _choice("preprocessing", self.preprocessing, {"rescale", "base"})
        _choice("monitor", self.monitor, {"val_accuracy", "val_loss"})
        if self.epochs < 1 or self.batch_size < 1:
            raise ParamsError("epochs and batch_size must be >= 1")
        if self.arch in TRANSFER_ARCHS and self.input_size < 32:
            raise ParamsError(f"input_size must be >= 32 for {self.arch}, got {self.input_size}")

    @property
    def is_transfer(self) -> bool:
        return self.arch in TRANSFER_ARCHS

    @property
    def uses_feature_cache(self) -> bool:
        return (self.is_transfer and self.freeze_base and self.cache_features
                and not self.augmentation.enabled)


@dataclass(frozen=True)
class TrainParams:
    precision: str = "auto"                 # auto | float32 | mixed_bfloat16 | mixed_float16
    seed: int = 42
    models_dir: str = "models"              # models/<name>/model.keras
    reports_dir: str = "reports/train"      # reports/train/<name>/{metrics.json,history.csv}
    state_dir: str = ".cache/train"         # resume state, outside DVC outs
    shuffle_buffer: int = 20000
    verbose: int = 0                        # keras fit verbosity (0: only our per-epoch line)

    def __post_init__(self) -> None:
        _choice("train.precision", self.precision, PRECISIONS)


@dataclass(frozen=True)
class MlflowParams:
    tracking_uri: str = "sqlite:///mlflow.db"   # env MLFLOW_TRACKING_URI wins over this
    experiment: str = "fer-emotion"
    log_model: bool = True
    probe_timeout_s: float = 3.0


@dataclass(frozen=True)
class TrainConfig:
    train: TrainParams
    models: dict[str, ModelParams]
    mlflow: MlflowParams

    def model(self, name: str) -> ModelParams:
        if name not in self.models:
            raise ParamsError(f"no models.{name} in params (have: {', '.join(self.models)})")
        return self.models[name]


def from_raw(extra: dict[str, Any]) -> TrainConfig:
    models_raw = extra.get("models") or {}
    if not isinstance(models_raw, dict):
        raise ParamsError("models must be a mapping of name -> model params")
    return TrainConfig(
        train=build(TrainParams, extra.get("train"), "train"),
        models={k: build(ModelParams, v, f"models.{k}") for k, v in models_raw.items()},
        mlflow=build(MlflowParams, extra.get("mlflow"), "mlflow"),
    )


def load_train_config(path: str | Path = "params.yaml") -> TrainConfig:
    return from_raw(load_params(path).extra)
