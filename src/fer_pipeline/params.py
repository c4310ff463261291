"""params.yaml, typed: the one reader of the file, for the CLI, flows, benchmarks and tests.

`load(path, overrides)` reads params.yaml once into frozen dataclasses. Every section and key
is declared here: an unknown key at any depth fails with its dotted name and the closest valid
one (`registy` -> "did you mean registry?"), and so does an override (`models.fernt.epochs=1`
cannot create a model). Dataclass defaults equal params.yaml's values (a test checks it); the
file states them all. This module imports nothing from the stages.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fer_pipeline.errors import ParamsError

DEFAULT_PARAMS = Path("params.yaml")
ARCHS = ("custom_cnn", "vgg16", "resnet50", "fernet")
TRANSFER_ARCHS = ("vgg16", "resnet50")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
BACKENDS = ("tensorflow", "jax")         # Keras backends train runs on (fer_pipeline.backend)
TTA_MODES = ("none", "flip", "flip_crops")
RUNTIMES = ("auto", "onnx", "keras")   # predict.runtime


def _choice(name: str, value: Any, allowed: Iterable[str]) -> None:
    if value not in allowed:
        raise ParamsError(f"{name} must be one of {sorted(allowed)}, got {value!r}")


# ---- data stages ----------------------------------------------------------------------------

@dataclass(frozen=True)
class DataParams:
    raw_dir: str = "data/raw/fer2013"
    classes: list[str] = field(
        default_factory=lambda: ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"])
    splits: list[str] = field(default_factory=lambda: ["train", "test"])
    image_size: int = 48
    max_per_class: int | None = None
    max_test_per_class: int | None = None   # a smaller cap on the test folder (null: max_per_class)

    def __post_init__(self) -> None:
        for key in ("max_per_class", "max_test_per_class"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ParamsError(f"data.{key} must be null or >= 1, got {value}")


@dataclass(frozen=True)
class ValidateParams:
    allowed_extensions: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png"])
    class_count_min: dict[str, int] = field(default_factory=lambda: {"train": 300, "test": 80})
    class_count_max: dict[str, int] = field(default_factory=lambda: {"train": 10000, "test": 2500})
    max_bad_file_fraction: float = 0.01
    blank_std_threshold: float = 2.0
    max_duplicate_fraction: float = 0.1


@dataclass(frozen=True)
class CleanParams:
    keep_extensions: list[str] = field(default_factory=lambda: ["jpeg", "jpg", "png"])
    color_policy: str = "convert"
    size_policy: str = "drop"
    blank_std_threshold: float = 2.0
    drop_duplicates: bool = True
    drop_label_conflicts: bool = True
    drop_test_leak: bool = True

    def __post_init__(self) -> None:
        _choice("color_policy", self.color_policy, {"convert", "drop"})
        _choice("size_policy", self.size_policy, {"drop", "resize"})


@dataclass(frozen=True)
class SplitParams:
    val_fraction: float = 0.2
    seed: int = 42

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ParamsError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


# ---- training -------------------------------------------------------------------------------

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
    # Photometric robustness (the corruptions evaluate measures); 0 = off, as in the study.
    brightness: float = 0.0        # max brightness shift, fraction of the 0..255 range
    blur: float = 0.0              # max Gaussian-blur strength (keras RandomGaussianBlur factor)
    noise: float = 0.0             # max std of additive Gaussian noise, grey levels (0..255),
    #                                drawn per image from [0, noise]
    # Mixing images of a batch (targets mixed alike): alpha of the Beta(alpha, alpha) weight;
    # 0 = off; both on: one of the two per batch, at random.
    mixup: float = 0.0             # the whole images blended
    cutmix: float = 0.0            # a rectangle of another image pasted in

    def __post_init__(self) -> None:
        _choice("fill_mode", self.fill_mode, {"constant", "nearest", "reflect", "wrap"})
        if self.mixup < 0 or self.cutmix < 0:
            raise ParamsError(f"augmentation.mixup and .cutmix must be >= 0 (0 = off), got "
                              f"{self.mixup} and {self.cutmix}")

    @property
    def enabled(self) -> bool:
        return bool(self.rotation or self.width_shift or self.height_shift or self.shear
                    or self.zoom or self.horizontal_flip or self.contrast or self.random_erasing
                    or self.brightness or self.blur or self.noise or self.mixes)

    @property
    def mixes(self) -> bool:
        """mixup or CutMix on: the targets are mixed too (one-hot, not class indices)."""
        return bool(self.mixup or self.cutmix)

    def summary(self) -> str:
        """The augmentations that are on, in words ("no augmentation" when none)."""
        on = [f"{k.replace('_', ' ')} {v:g}" for k, v in dataclasses.asdict(self).items()
              if not isinstance(v, (bool, str)) and v]
        if self.horizontal_flip:
            on.insert(0, "flip")
        return "augmented: " + " ".join(on) if on else "no augmentation"


@dataclass(frozen=True)
class ReduceLRParams:
    factor: float = 0.2
    patience: int = 6
    min_delta: float = 1e-4
    min_lr: float = 0.0


@dataclass(frozen=True)
class DistillParams:
    """Knowledge distillation: each training target becomes (1 - weight) * one-hot + weight *
    the teachers' probability for the same image, the image augmented as usual. The
    probabilities are computed once by `teach@<model>` (`fer teach`): each teacher's mean over
    `tta` views, averaged over teachers, then p ** (1/temperature) renormalized. weight 0 =
    off (the study)."""

    weight: float = 0.0                  # share of the teachers' probabilities in each target
    teachers: list[str] = field(default_factory=list)   # trained .keras files under teachers/
    tta: str = "flip"                    # views each teacher averages over: none | flip | flip_crops
    temperature: float = 1.0             # > 1 softens the teachers' answers, < 1 sharpens

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ParamsError(f"distill.weight must be in [0, 1] (0 = off), got {self.weight}")
        if self.weight and not self.teachers:
            raise ParamsError(f"distill.weight is {self.weight} but distill.teachers is empty: "
                              f"list the teacher models (.keras files under teachers/)")
        _choice("distill.tta", self.tta, TTA_MODES)
        if self.temperature <= 0:
            raise ParamsError(f"distill.temperature must be > 0, got {self.temperature}")

    @property
    def on(self) -> bool:
        return self.weight > 0


@dataclass(frozen=True)
class ModelParams:
    """One model's recipe. Defaults: the study's custom CNN; keys a recipe does not need
    (weight decay, schedules, transfer options) default to "off"."""

    arch: str = "custom_cnn"
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adam"                 # adam | adamw | sgd (momentum 0.9, nesterov) | rmsprop
    learning_rate: float = 1e-3
    weight_decay: float = 0.0               # decoupled weight decay (adamw, sgd)
    lr_schedule: str = "plateau"            # plateau (ReduceLROnPlateau, the study) | cosine
    warmup_epochs: int = 0                  # cosine: linear warm-up epochs
    label_smoothing: float = 0.0            # cross-entropy label smoothing
    blocks_per_stage: int | list[int] = 2   # fernet: conv blocks per resolution stage (one number
                                            # for all, or one per stage of conv_filters)
    width: float = 1.0                      # multiplier on conv filters and dense units (tests)
    conv_filters: list[int] = field(default_factory=lambda: [32, 64, 128, 512])
    dense_units: list[int] = field(default_factory=lambda: [887])
    dropout: float = 0.5
    bn_momentum: float = 0.99               # BatchNormalization moving-statistics momentum (Keras default)
    ema: float = 0.0                        # exponential moving average of the weights: 0 = off, else
                                            # its momentum per step; validation and the kept model use it
    members: int = 1                        # fernet: networks trained side by side in one model, each
                                            # on its own loss; the model's output is their mean
                                            # probability (an ensemble in one file)
    input_size: int = 224                   # transfer models: side the 48x48 input is resized to
    weights: str | None = None              # imagenet | null | path to a local .h5/.keras file
    freeze_base: bool = True                # transfer models: base frozen, only the head trains
    feature_norm: bool = False              # transfer models: BatchNormalization on the pooled features
    preprocessing: str = "rescale"          # rescale (x/255, the study) | standardize (per image: mean 0,
                                            # std 1; blind to brightness/contrast) | base (network's own)
    augmentation: AugmentParams = field(default_factory=AugmentParams)
    distill: DistillParams = field(default_factory=DistillParams)
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
        _choice("preprocessing", self.preprocessing, {"rescale", "standardize", "base"})
        _choice("monitor", self.monitor, {"val_accuracy", "val_loss"})
        if not 0.0 <= self.bn_momentum < 1.0:
            raise ParamsError(f"bn_momentum must be in [0, 1), got {self.bn_momentum}")
        if not 0.0 <= self.ema < 1.0:
            raise ParamsError(f"ema must be in [0, 1) (0 = off), got {self.ema}")
        if self.members < 1:
            raise ParamsError(f"members must be >= 1, got {self.members}")
        if self.members > 1 and self.arch != "fernet":
            raise ParamsError(f"members > 1 (an ensemble in one model) is built for arch fernet "
                              f"only, not {self.arch}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ParamsError("epochs and batch_size must be >= 1")
        blocks = self.blocks_per_stage
        if isinstance(blocks, list) and len(blocks) != len(self.conv_filters):
            raise ParamsError(f"blocks_per_stage lists {len(blocks)} stages but conv_filters "
                              f"has {len(self.conv_filters)}: give one count per stage or one number")
        if min(self.stage_blocks(), default=1) < 1:
            raise ParamsError(f"blocks_per_stage must be >= 1 per stage, got {blocks}")
        if self.arch in TRANSFER_ARCHS and self.input_size < 32:
            raise ParamsError(f"input_size must be >= 32 for {self.arch}, got {self.input_size}")

    @property
    def is_transfer(self) -> bool:
        return self.arch in TRANSFER_ARCHS

    def stage_blocks(self) -> list[int]:
        """Conv blocks of each stage of `conv_filters` (fernet)."""
        b = self.blocks_per_stage
        return list(b) if isinstance(b, list) else [b] * len(self.conv_filters)

    def scaled(self, n: int) -> int:
        """Filters or units after the width multiplier (at least one)."""
        return max(1, round(n * self.width))

    def summary(self) -> str:
        """The recipe in a few words for the comparison table: what a profile traded away (width,
        learning rate, input size, what trains) shows next to the accuracy it bought."""
        parts = [f"{self.members} x width {self.width:g}" if self.members > 1
                 else f"width {self.width:g}", f"{self.optimizer} {self.learning_rate:g}",
                 f"batch {self.batch_size}"]
        if self.lr_schedule == "cosine":
            parts.append("cosine")
        if self.is_transfer:
            parts.append(f"{self.input_size} px")
            parts.append("base frozen" if self.freeze_base else "base trained")
            if self.preprocessing == "base":
                parts.append("caffe preprocessing")
            if self.feature_norm:
                parts.append("features normed")
        elif self.arch != "fernet" or self.dense_units:
            units = [self.scaled(u) for u in self.dense_units]
            parts.append(f"dense {'+'.join(map(str, units)) or 'none'} dropout {self.dropout:g}")
        else:                                   # fernet: GAP -> dropout -> classifier
            parts.append(f"dropout {self.dropout:g}")
        if self.arch == "fernet" and self.stage_blocks() != [2] * len(self.conv_filters):
            parts.append(f"convs per stage {'-'.join(map(str, self.stage_blocks()))}")
        if self.bn_momentum != 0.99:
            parts.append(f"BN momentum {self.bn_momentum:g}")
        if self.ema:
            parts.append(f"EMA {self.ema:g}")
        if self.preprocessing == "standardize":
            parts.append("per-image standardized")
        if self.class_weights:
            parts.append("class weights")
        if self.distill.on:
            parts.append(f"distilled from {len(self.distill.teachers)} teacher(s), weight "
                         f"{self.distill.weight:g}")
        parts.append(self.augmentation.summary())
        return ", ".join(parts)

    @property
    def uses_feature_cache(self) -> bool:
        return (self.is_transfer and self.freeze_base and self.cache_features
                and not self.augmentation.enabled)


@dataclass(frozen=True)
class TrainParams:
    precision: str = "auto"                 # auto | float32 | mixed_bfloat16 | mixed_float16
    backend: str = "tensorflow"             # Keras backend: tensorflow | jax (env KERAS_BACKEND wins)
    seed: int = 42
    models_dir: str = "models"              # models/<name>/model.keras
    reports_dir: str = "reports/train"      # reports/train/<name>/{metrics.json,history.csv}
    state_dir: str = ".cache/train"         # resume state, outside DVC outs
    verbose: int = 0                        # keras fit verbosity (0: only our per-epoch line)

    def __post_init__(self) -> None:
        _choice("precision", self.precision, PRECISIONS)
        _choice("backend", self.backend, BACKENDS)


@dataclass(frozen=True)
class MlflowParams:
    tracking_uri: str = "sqlite:///mlflow.db"   # env MLFLOW_TRACKING_URI wins over this
    experiment: str = "fer-emotion"
    log_model: bool = True
    probe_timeout_s: float = 3.0


# ---- evaluation and registry ----------------------------------------------------------------

@dataclass(frozen=True)
class RobustnessParams:
    """evaluate's corruption suite (fer_pipeline.corruptions): accuracy per corruption."""

    enabled: bool = True
    corruptions: list[str] = field(default_factory=lambda: [
        "dark", "bright", "contrast", "blur", "noise", "jpeg", "rotation", "shift", "occlusion"])
    severities: list[int] = field(default_factory=lambda: [1, 2, 3])
    max_images: int | None = 2000        # a seeded random subset of test (None: all)
    seed: int = 0

    def __post_init__(self) -> None:
        # Corruption names are checked by evaluate against fer_pipeline.corruptions before any
        # work (importing it here would make it a dep of every stage).
        for s in self.severities:
            _choice("evaluate.robustness.severities[]", s, (1, 2, 3))
        if self.max_images is not None and self.max_images < 1:
            raise ParamsError("evaluate.robustness.max_images must be >= 1 or null")


@dataclass(frozen=True)
class EvaluateParams:
    test_path: str = "data/processed/test.npz"   # the only reader of the test split
    val_path: str = "data/processed/val.npz"     # which models are comparable; re-scoring
    reports_dir: str = "reports/evaluate"
    batch_size: int = 256                        # inference batch (and the speed measurement)
    tta: str = "flip_crops"                      # none | flip (image + mirror) | flip_crops (10 views)
    calibrate: bool = True                       # fit a temperature on val; ECE/NLL before/after
    robustness: RobustnessParams = field(default_factory=RobustnessParams)

    def __post_init__(self) -> None:
        _choice("tta", self.tta, TTA_MODES)
        if self.batch_size < 1:
            raise ParamsError("batch_size must be >= 1")


@dataclass(frozen=True)
class RegistryParams:
    enabled: bool = True                 # register the champion in the MLflow model registry
    model_name: str = "fer-emotion"      # registered model name
    champion_alias: str = "champion"     # the version `fer predict` loads by default
    previous_alias: str = "previous"     # the champion it replaced (rollback target)
    promote: bool = True                 # false: register and record, never move the alias
    min_improvement: float = 0.0         # val accuracy a candidate must beat the champion by


@dataclass(frozen=True)
class PredictParams:
    """`fer predict` on photo collections (not a pipeline stage: no DVC deps)."""

    max_file_mb: float = 50.0            # larger files are reported, not read
    max_pixels: int = 50_000_000         # width x height above this: reported (decompression bombs)
    batch_files: int = 32                # files whose faces go to the model in one call
    release_dir: str = "release"         # the bundled model (fer export); used without --model
                                         # when no tracking store has a champion
    runtime: str = "auto"                # release model: auto (onnx if bundled and onnxruntime
                                         # is installed, else keras) | onnx | keras

    min_confidence: float = 0.4          # a face whose top probability (temperature-scaled) is
                                         # below this is flagged "uncertain": true
    roll_angles: list[float] = field(default_factory=lambda: [15.0, -15.0, 30.0, -30.0])
                                         # degrees the image is turned by for a second search when
                                         # the upright pass finds no face ([]: none)

    def __post_init__(self) -> None:
        _choice("predict.runtime", self.runtime, RUNTIMES)
        if not 0.0 <= self.min_confidence < 1.0:
            raise ParamsError(f"predict.min_confidence must be in [0, 1), got {self.min_confidence}")
        for a in self.roll_angles:
            if not -90.0 <= a <= 90.0 or a == 0.0:
                raise ParamsError(f"roll_angles must each be in [-90, 90] and not 0, got {a:g}")


@dataclass(frozen=True)
class ServeParams:
    """`fer serve`: the HTTP service and its web page (predict.* limits apply per image too)."""

    host: str = "127.0.0.1"              # bind address; 0.0.0.0 exposes it to the network
    port: int = 8000
    max_request_mb: float = 20.0         # a larger request body is refused (413)
    max_images: int = 16                 # images per request (a batch)
    timeout_s: float = 30.0              # a request taking longer is answered 503


# ---- the root -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    clean: CleanParams = field(default_factory=CleanParams)
    split: SplitParams = field(default_factory=SplitParams)
    train: TrainParams = field(default_factory=TrainParams)
    models: dict[str, ModelParams] = field(default_factory=dict)
    mlflow: MlflowParams = field(default_factory=MlflowParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    registry: RegistryParams = field(default_factory=RegistryParams)
    predict: PredictParams = field(default_factory=PredictParams)
    serve: ServeParams = field(default_factory=ServeParams)

    def model(self, name: str) -> ModelParams:
        if name not in self.models:
            raise ParamsError(f"no models.{name} in params{_did_you_mean(name, self.models)} "
                              f"(have: {', '.join(self.models) or 'none'})")
        return self.models[name]


# ---- building typed objects from YAML -------------------------------------------------------

def _did_you_mean(key: str, valid: Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _dotted(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def build(cls: type, raw: Any, where: str = "") -> Any:
    """Dataclass `cls` from a mapping; unknown keys and wrong types fail by dotted name."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{where or 'params'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            prefix = f"{where}." if where else ""
            raise ParamsError(f"unknown key {_dotted(where, str(key))}"
                              f"{_did_you_mean(str(key), names, prefix)}")
    kwargs = {k: _coerce(hints[k], v, _dotted(where, k)) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except ParamsError as exc:   # a check in __post_init__: name the key by its full path
        text = str(exc)
        joined = f"{where}.{text}" if text.split(" ", 1)[0] in names else f"{where}: {text}"
        raise ParamsError(joined if where else text) from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = {}
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ParamsError as exc:
                errors[arg] = str(exc)
        # the arm of the value's own shape (a list for a list) says what is wrong inside it
        shaped = [e for a, e in errors.items() if (typing.get_origin(a) is list) == isinstance(value, list)]
        raise ParamsError((shaped or list(errors.values()) or [f"{where}: bad value {value!r}"])[0])
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{where} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ParamsError(f"{where} must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ParamsError(f"{where} must be {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"params.py: unsupported type {tp!r} for {where}")  # a bug here, not input


# ---- overrides (`key=value`, as `dvc exp run -S` takes them) ----------------------------------

def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """["a.b=1", "c=[x, y]"] -> {"a.b": 1, "c": ["x", "y"]}; values are YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ParamsError(f"override {item!r} must look like KEY=VALUE (e.g. models.fernet.epochs=1)")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ParamsError(f"override {item!r}: value is not valid YAML ({exc})") from None
    return out


def check_override_key(raw: Mapping[str, Any], dotted: str) -> None:
    """Fail unless `dotted` names a declared key: a dataclass field, or an existing entry of a
    mapping section (`models.<name>` must already exist, so a typo cannot create a model)."""
    tp: Any = Params
    node: Any = raw
    where = ""
    for key in dotted.split("."):
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if key not in hints:
                raise ParamsError(f"unknown key {_dotted(where, key)}"
                                  f"{_did_you_mean(key, hints, f'{where}.' if where else '')}")
            tp = hints[key]
        elif typing.get_origin(tp) is dict:
            have = list(node) if isinstance(node, Mapping) else []
            if key not in have:
                raise ParamsError(f"unknown key {_dotted(where, key)}"
                                  f"{_did_you_mean(key, have, f'{where}.')} (have: "
                                  f"{', '.join(map(str, have)) or 'none'})")
            tp = typing.get_args(tp)[1]
        else:
            raise ParamsError(f"cannot set {dotted}: {where} is not a mapping")
        node = node.get(key) if isinstance(node, Mapping) else None
        where = _dotted(where, key)


def set_dotted(raw: Any, dotted: str, value: Any) -> None:
    """raw["a"]["b"]["c"] = value for "a.b.c", creating missing mappings (unchecked)."""
    keys = dotted.split(".")
    node = raw
    for key in keys[:-1]:
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, Mapping):
            raise ParamsError(f"cannot set {dotted}: {key} is not a mapping")
    node[keys[-1]] = value


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any] | Iterable[str] | None
                    ) -> dict[str, Any]:
    """A copy of `raw` with the overrides set; every key is checked first."""
    if overrides is not None and not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    out = copy.deepcopy(dict(raw))
    for key, value in (overrides or {}).items():
        try:
            check_override_key(out, key)
        except ParamsError as exc:
            raise ParamsError(f"override {key}={value!r}: {exc}") from None
        set_dotted(out, key, value)
    return out


# ---- loading --------------------------------------------------------------------------------

def load_raw(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """params.yaml as plain YAML (for writers that keep its layout); `load` validates it."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path} (run from the project root or pass "
                          f"--params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping at the top level")
    return raw


def from_dict(raw: Mapping[str, Any], overrides: Mapping[str, Any] | Iterable[str] | None = None
              ) -> Params:
    return build(Params, apply_overrides(raw, overrides))


def load(path: str | Path = DEFAULT_PARAMS,
         overrides: Mapping[str, Any] | Iterable[str] | None = None) -> Params:
    """The typed params of `path` with `overrides` ({dotted: value} or ["k=v"]) applied."""
    try:
        return from_dict(load_raw(path), overrides)
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None


def to_dict(obj: Any) -> Any:
    """Plain data (for logging params to MLflow, writing a params file)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
