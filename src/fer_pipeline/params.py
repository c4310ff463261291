"""params.yaml, typed: the one reader of the file, for the CLI, flows, benchmarks and tests.

The schema is pydantic v2 (already a dependency of Prefect and MLflow, maintained, and it
emits the JSON Schema editors use: docs/schemas/params.schema.json). Every section is a strict,
frozen model that forbids unknown keys; a model's recipe is chosen by its `arch` (a
discriminated union), so a key of another architecture (`blocks_per_stage` on vgg16) fails
naming the arch that has it. Errors name the dotted key and the closest valid one (`registy`
-> "did you mean registry?"); overrides (`models.fernt.epochs=1`) are checked the same way.
Defaults are the study's; params.yaml states what a run chooses. This module imports nothing
from the stages.
"""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from fer_pipeline.errors import ParamsError

DEFAULT_PARAMS = Path("params.yaml")
SCHEMA_PATH = Path("docs/schemas/params.schema.json")

Precision = Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"]
Backend = Literal["tensorflow", "jax"]          # Keras backends train runs on (fer_pipeline.backend)
TTA = Literal["none", "flip", "flip_crops"]
Runtime = Literal["auto", "onnx", "keras"]      # predict.runtime
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
BACKENDS: tuple[str, ...] = Backend.__args__
TTA_MODES: tuple[str, ...] = TTA.__args__


class _Checked(type(BaseModel)):
    """A section built directly (`PredictParams(roll_angles=[0])`, in tests and benchmarks)
    fails with a ParamsError too. Only a direct call passes here: nested sections are built
    by pydantic's validator, whose errors `describe` words from the root."""

    def __call__(cls, *args: Any, **data: Any) -> Any:
        try:
            return super().__call__(*args, **data)
        except ValidationError as exc:
            raise ParamsError(describe(exc, data, cls)) from None


class Section(BaseModel, metaclass=_Checked):
    """A params section: strict types (no "3" for 3, no true for 1), unknown keys refused,
    frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True,
                              use_attribute_docstrings=True)


# ---- data stages ----------------------------------------------------------------------------

class DataParams(Section):
    raw_dir: str = "data/raw/fer2013"
    """The raw images: <raw_dir>/<split>/<class>/*.jpg (a DVC-tracked folder)."""
    classes: list[str] = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
    splits: list[str] = ["train", "test"]
    image_size: int = 48
    max_per_class: Annotated[int, Field(ge=1)] | None = None
    """Cap per class and split folder (null: all): quick runs and tests."""
    max_test_per_class: Annotated[int, Field(ge=1)] | None = None
    """A smaller cap on the test folder only (null: max_per_class): every test image costs a
    pass of each model in evaluate."""


class ValidateParams(Section):
    allowed_extensions: list[str] = ["jpg", "jpeg", "png"]
    class_count_min: dict[str, int] = {"train": 300, "test": 80}
    """Hard: a class below this per split is a missing-data problem."""
    class_count_max: dict[str, int] = {"train": 10000, "test": 2500}
    """Hard: far above the known counts means a wrong folder."""
    max_bad_file_fraction: float = 0.01
    """Hard: more unreadable or wrong files than this stops the pipeline."""
    blank_std_threshold: float = 2.0
    """Soft: near-blank images (pixel std below this) are reported."""
    max_duplicate_fraction: float = 0.1
    """Soft: pixel-identical copies within a split."""


class CleanParams(Section):
    keep_extensions: list[str] = ["jpeg", "jpg", "png"]
    color_policy: Literal["convert", "drop"] = "convert"
    """Images with 3/4 channels: convert (ITU-R 601 luma) or drop."""
    size_policy: Literal["drop", "resize"] = "drop"
    """Images that are not image_size x image_size."""
    blank_std_threshold: float = 2.0
    """Pixel std below this = near-blank, dropped from train."""
    drop_duplicates: bool = True
    """Keep one copy of pixel-identical train images."""
    drop_label_conflicts: bool = True
    """Drop every copy when copies disagree on the label."""
    drop_test_leak: bool = True
    """Drop train images pixel-identical to a test image."""


class SplitParams(Section):
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    seed: int = 42


# ---- training -------------------------------------------------------------------------------

class AugmentParams(Section):
    """On-the-fly augmentation; every value 0/false = off (the study's custom CNN)."""

    rotation: float = 0.0
    """Max rotation, degrees."""
    width_shift: float = 0.0
    """Max horizontal shift, fraction of the width."""
    height_shift: float = 0.0
    """Max vertical shift, fraction of the height."""
    shear: float = 0.0
    """Max shear factor (keras RandomShear x/y factor)."""
    zoom: float = 0.0
    """Max zoom in/out, fraction."""
    horizontal_flip: bool = False
    fill_mode: Literal["constant", "nearest", "reflect", "wrap"] = "nearest"
    contrast: float = 0.0
    """Max random contrast change, fraction."""
    random_erasing: float = 0.0
    """Probability of erasing one random rectangle (2-33% of the area)."""
    brightness: float = 0.0
    """Max brightness shift, fraction of the 0..255 range (a robustness lever)."""
    blur: float = 0.0
    """Max Gaussian-blur strength (keras RandomGaussianBlur factor)."""
    noise: float = 0.0
    """Max std of additive Gaussian noise in grey levels, drawn per image from [0, noise]."""
    mixup: Annotated[float, Field(ge=0.0)] = 0.0
    """Beta(alpha, alpha) of mixup: whole images of a batch blended, targets alike (0: off)."""
    cutmix: Annotated[float, Field(ge=0.0)] = 0.0
    """Beta alpha of CutMix: a rectangle of another image pasted in (0: off; both on: one of
    the two per batch)."""

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
        on = [f"{k.replace('_', ' ')} {v:g}" for k, v in self.model_dump().items()
              if not isinstance(v, (bool, str)) and v]
        if self.horizontal_flip:
            on.insert(0, "flip")
        return "augmented: " + " ".join(on) if on else "no augmentation"


class ReduceLRParams(Section):
    """ReduceLROnPlateau on val_loss (lr_schedule plateau): the study's 0.2 after 6 epochs."""

    factor: float = 0.2
    patience: int = 6
    min_delta: float = 1e-4
    min_lr: float = 0.0


class DistillParams(Section):
    """Knowledge distillation: each training target becomes (1 - weight) * one-hot + weight *
    the teachers' probability for the same image. `teach@<model>` computes them once: each
    teacher's mean over `tta` views, averaged over teachers, then p ** (1/temperature)
    renormalized. weight 0 = off (the study)."""

    weight: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """Share of the teachers' probabilities in each target (0: off)."""
    teachers: list[str] = []
    """Trained .keras files under teachers/ (committed; see its README)."""
    tta: TTA = "flip"
    """Views each teacher averages over."""
    temperature: Annotated[float, Field(gt=0.0)] = 1.0
    """> 1 softens the teachers' answers, < 1 sharpens them."""

    @model_validator(mode="after")
    def _teachers_when_on(self) -> DistillParams:
        if self.weight and not self.teachers:
            raise ValueError(f"weight is {self.weight} but teachers is empty: list the teacher "
                             f"models (.keras files under teachers/)")
        return self

    @property
    def on(self) -> bool:
        return self.weight > 0


class ModelParams(Section):
    """What every architecture's recipe shares. Defaults: the study's custom CNN; recipe
    options it did not use (weight decay, schedules, smoothing, EMA) default to off."""

    arch: str
    epochs: Annotated[int, Field(ge=1)] = 10
    batch_size: Annotated[int, Field(ge=1)] = 64
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop"] = "adam"
    """sgd: momentum 0.9, Nesterov."""
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    """Decoupled weight decay (adamw, sgd); Keras shrinks by lr x this per step."""
    lr_schedule: Literal["plateau", "cosine"] = "plateau"
    """plateau: ReduceLROnPlateau (reduce_lr, the study); cosine: warm-up, then cosine decay."""
    warmup_epochs: int = 0
    """cosine: linear warm-up epochs."""
    label_smoothing: Fraction = 0.0
    width: float = 1.0
    """Multiplier on conv filters and dense units (tests and quick runs shrink it)."""
    dense_units: list[int] = [887]
    """Dense layers after the convolutional part (each followed by dropout)."""
    dropout: float = 0.5
    bn_momentum: Fraction = 0.99
    """BatchNormalization moving-statistics momentum (Keras default)."""
    ema: Fraction = 0.0
    """Moving average of the weights, its momentum per step (0: off); validation and the kept
    model use it."""
    preprocessing: Literal["rescale", "standardize"] = "rescale"
    """rescale: x/255 (the study); standardize: per image mean 0, std 1 (blind to brightness
    and contrast)."""
    augmentation: AugmentParams = AugmentParams()
    distill: DistillParams = DistillParams()
    class_weights: bool = False
    """Balanced class weights over the training split."""
    monitor: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    """Best-model and early-stopping criterion (the val split)."""
    early_stopping_patience: int = 10
    reduce_lr: ReduceLRParams = ReduceLRParams()

    @property
    def is_transfer(self) -> bool:
        return False

    @property
    def uses_feature_cache(self) -> bool:
        """Frozen base and no augmentation: the base runs once, the head trains on features."""
        return False

    def scaled(self, n: int) -> int:
        """Filters or units after the width multiplier (at least one)."""
        return max(1, round(n * self.width))

    def summary(self) -> str:
        """The recipe in a few words for the comparison table: what a profile traded away (width,
        learning rate, input size, what trains) shows next to the accuracy it bought."""
        parts = [self._width_words(), f"{self.optimizer} {self.learning_rate:g}",
                 f"batch {self.batch_size}"]
        if self.lr_schedule == "cosine":
            parts.append("cosine")
        parts += self._shape_words()
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

    def _width_words(self) -> str:
        return f"width {self.width:g}"

    def _shape_words(self) -> list[str]:
        units = [self.scaled(u) for u in self.dense_units]
        return [f"dense {'+'.join(map(str, units)) or 'none'} dropout {self.dropout:g}"]


class CustomCNNParams(ModelParams):
    """The study's custom CNN: conv-BN-ReLU blocks (max-pool after all but the first), dense
    layers with dropout. 17,040,031 trainable params at the defaults (study: 17,044,871)."""

    arch: Literal["custom_cnn"]
    conv_filters: list[int] = [32, 64, 128, 512]
    dense_bn: bool = False
    """BatchNormalization between each dense layer and its ReLU (the dense layer then has no
    bias): Adam's steps on an 18,432-wide flatten no longer saturate the units."""


class FerNetParams(ModelParams):
    """The fifth model, built for 48x48 faces on a CPU budget: stages of conv blocks per
    resolution, global average pooling, dropout, classifier."""

    arch: Literal["fernet"]
    conv_filters: list[int] = [32, 64, 128, 256]
    """One stage per resolution: 48, 24, 12, 6 -> 3x3 -> global average pooling."""
    blocks_per_stage: Annotated[int, Field(ge=1)] | list[Annotated[int, Field(ge=1)]] = 2
    """Conv blocks per stage: one number for all, or one per stage of conv_filters."""
    dense_units: list[int] = []
    dropout: float = 0.3
    members: Annotated[int, Field(ge=1)] = 1
    """Networks trained side by side in one model, each on its own loss; the model answers
    their mean probability (an ensemble in one file)."""

    @model_validator(mode="after")
    def _one_count_per_stage(self) -> FerNetParams:
        blocks = self.blocks_per_stage
        if isinstance(blocks, list) and len(blocks) != len(self.conv_filters):
            raise ValueError(f"blocks_per_stage lists {len(blocks)} stages but conv_filters has "
                             f"{len(self.conv_filters)}: give one count per stage or one number")
        return self

    def stage_blocks(self) -> list[int]:
        """Conv blocks of each stage of `conv_filters`."""
        b = self.blocks_per_stage
        return list(b) if isinstance(b, list) else [b] * len(self.conv_filters)

    def _width_words(self) -> str:
        return (f"{self.members} x width {self.width:g}" if self.members > 1
                else super()._width_words())

    def _shape_words(self) -> list[str]:
        words = super()._shape_words() if self.dense_units else [f"dropout {self.dropout:g}"]
        if self.stage_blocks() != [2] * len(self.conv_filters):
            words.append(f"convs per stage {'-'.join(map(str, self.stage_blocks()))}")
        return words


class TransferParams(ModelParams):
    """VGG16 / ResNet50 transfer learning: the 48x48 gray input resized and made RGB inside
    the model, a new head on the globally pooled base features."""

    arch: Literal["vgg16", "resnet50"]
    dense_units: list[int] = [256]
    input_size: Annotated[int, Field(ge=32)] = 224
    """Side the 48x48 input is resized to."""
    weights: str | None = "imagenet"
    """imagenet | null (no pretraining, recorded as pretrained=false) | path to a local
    notop .h5/.keras file."""
    freeze_base: bool = True
    """The study: base frozen, only the head trains."""
    feature_norm: bool = False
    """BatchNormalization on the pooled features (a random frozen base's are tiny)."""
    cache_features: bool = True
    """Frozen base and augmentation off: run the base once, train the head on its features."""
    preprocessing: Literal["rescale", "standardize", "base"] = "rescale"
    """rescale: x/255 (the study); standardize: per image; base: the network's own (caffe)."""

    @property
    def is_transfer(self) -> bool:
        return True

    @property
    def uses_feature_cache(self) -> bool:
        return self.freeze_base and self.cache_features and not self.augmentation.enabled

    def _shape_words(self) -> list[str]:
        words = [f"{self.input_size} px", "base frozen" if self.freeze_base else "base trained"]
        if self.preprocessing == "base":
            words.append("caffe preprocessing")
        if self.feature_norm:
            words.append("features normed")
        return words


ARCH_CLASSES: dict[str, type[ModelParams]] = {
    "custom_cnn": CustomCNNParams, "fernet": FerNetParams,
    "vgg16": TransferParams, "resnet50": TransferParams}
ARCHS = tuple(ARCH_CLASSES)
ModelSpec = Annotated[CustomCNNParams | FerNetParams | TransferParams,
                      Field(discriminator="arch")]
_MODEL = TypeAdapter(ModelSpec)


def model_params(**recipe: Any) -> ModelParams:
    """One model's recipe from keyword values, its class chosen by `arch`."""
    try:
        return _MODEL.validate_python(recipe)
    except ValidationError as exc:
        raise ParamsError(describe(exc, recipe, ModelSpec)) from None


class TrainParams(Section):
    precision: Precision = "auto"
    """auto: bf16 on CPUs with AMX/AVX512-BF16 and GPUs of compute capability 8.0+, fp16 on
    older GPUs, else float32."""
    backend: Backend = "tensorflow"
    """Keras backend (GPU workers: jax); a worker's KERAS_BACKEND wins."""
    seed: int = 42
    """Weights init, shuffling, augmentation."""
    models_dir: str = "models"
    """models/<name>/model.keras (a DVC out)."""
    reports_dir: str = "reports/train"
    """reports/train/<name>/{metrics.json,history.csv,mlflow.json}."""
    state_dir: str = ".cache/train"
    """Resume state per model, outside DVC outs; cleared on success."""
    verbose: int = 0
    """Keras fit verbosity (0: one line per epoch); logging only, not a dep."""


class MlflowParams(Section):
    """Where results are sent: not a dep of any stage."""

    tracking_uri: str = "sqlite:///mlflow.db"
    """Embedded store in the project; env MLFLOW_TRACKING_URI wins."""
    experiment: str = "fer-emotion"
    log_model: bool = True
    """Log the Keras model (signature and input example)."""
    probe_timeout_s: float = 3.0
    """An http(s) tracking server must answer /health within this."""


# ---- evaluation and registry ----------------------------------------------------------------

class RobustnessParams(Section):
    """evaluate's corruption suite (fer_pipeline.corruptions): accuracy per corruption, the
    mean over severities, without TTA."""

    enabled: bool = True
    corruptions: list[str] = ["dark", "bright", "contrast", "blur", "noise", "jpeg", "rotation",
                              "shift", "occlusion"]
    """Checked by evaluate against fer_pipeline.corruptions (importing it here would make it a
    dep of every stage)."""
    severities: list[Literal[1, 2, 3]] = [1, 2, 3]
    max_images: Annotated[int, Field(ge=1)] | None = 2000
    """The first N test images after a seeded shuffle (null: all)."""
    seed: int = 0


class EvaluateParams(Section):
    test_path: str = "data/processed/test.npz"
    """The only reader of the test split."""
    val_path: str = "data/processed/val.npz"
    """Models trained on other val data are stale, not ranked."""
    reports_dir: str = "reports/evaluate"
    batch_size: Annotated[int, Field(ge=1)] = 256
    """Inference batch; img/s in the comparison is measured at it."""
    tta: TTA = "flip_crops"
    """Test-time augmentation: none | flip (image + mirror) | flip_crops (10 views)."""
    calibrate: bool = True
    """Fit a temperature on val (same TTA; NLL); predict, serve and the release apply it."""
    robustness: RobustnessParams = RobustnessParams()


class RegistryParams(Section):
    enabled: bool = True
    """Register the champion (chosen by validation accuracy) in the MLflow model registry."""
    model_name: str = "fer-emotion"
    champion_alias: str = "champion"
    """The version `fer predict` loads by default."""
    previous_alias: str = "previous"
    """The champion it replaced (rollback target)."""
    promote: bool = True
    """false: register and record the decision, never move the alias (profiles set it)."""
    min_improvement: float = 0.0
    """Val accuracy a candidate must beat the champion's by."""


class PredictParams(Section):
    """`fer predict` on photo collections (not a pipeline stage: no DVC deps)."""

    max_file_mb: float = 50.0
    """Larger files are reported per file, not read."""
    max_pixels: int = 50_000_000
    """width x height above this is reported (decompression bombs)."""
    batch_files: int = 32
    """Files whose faces go to the model in one call."""
    release_dir: str = "release"
    """The bundled model (`fer export`): used without --model when no tracking store has a
    champion (a fresh clone)."""
    runtime: Runtime = "auto"
    """Release model: auto (model.onnx with ONNX Runtime when bundled) | onnx | keras."""
    min_confidence: Fraction = 0.4
    """A face whose top probability (after the model's temperature) is below this is flagged
    "uncertain": true."""
    roll_angles: list[float] = [15.0, -15.0, 30.0, -30.0]
    """Degrees the image is turned by for a second search when the upright pass finds no
    face; a face found so is cropped upright ([]: off)."""

    @model_validator(mode="after")
    def _angles(self) -> PredictParams:
        for a in self.roll_angles:
            if not -90.0 <= a <= 90.0 or a == 0.0:
                raise ValueError(f"roll_angles must each be in [-90, 90] and not 0, got {a:g}")
        return self


class ServeParams(Section):
    """`fer serve`: the HTTP service and its web page (predict.* limits apply per image too)."""

    host: str = "127.0.0.1"
    """Bind address; 0.0.0.0 exposes it to the network."""
    port: int = 8000
    max_request_mb: float = 20.0
    """A larger request body is refused (413)."""
    max_images: int = 16
    """Images per request."""
    timeout_s: float = 30.0
    """A slower request is answered 503."""


# ---- the root -------------------------------------------------------------------------------

class Params(Section):
    """params.yaml. Every tunable value of the pipeline, grouped per stage."""

    data: DataParams = DataParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    clean: CleanParams = CleanParams()
    split: SplitParams = SplitParams()
    train: TrainParams = TrainParams()
    models: dict[str, ModelSpec] = {}
    """The models trained (`train@<name>` for each key); `arch` chooses the recipe's schema."""
    mlflow: MlflowParams = MlflowParams()
    evaluate: EvaluateParams = EvaluateParams()
    registry: RegistryParams = RegistryParams()
    predict: PredictParams = PredictParams()
    serve: ServeParams = ServeParams()

    @property
    def validate(self) -> ValidateParams:   # `validate` is a BaseModel classmethod name
        return self.validate_

    def model(self, name: str) -> ModelParams:
        if name not in self.models:
            raise ParamsError(f"no models.{name} in params{_did_you_mean(name, self.models)} "
                              f"(have: {', '.join(self.models) or 'none'})")
        return self.models[name]


SECTIONS = ("data", "validate", "clean", "split", "train", "models", "mlflow", "evaluate",
            "registry", "predict", "serve")


# ---- errors in words ------------------------------------------------------------------------

def _did_you_mean(key: str, valid: Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _fields(tp: Any) -> dict[str, Any] | None:
    """Field name -> annotation of a section class (aliases as written in the file)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return {(f.alias or n): f.annotation for n, f in tp.model_fields.items()}
    return None


def _walk(loc: tuple, raw: Any, root: Any) -> tuple[list[str], Any, Any]:
    """The dotted path of a pydantic error location as the user wrote it: the union tags and
    type labels pydantic inserts (`fernet`, `list[int]`) are dropped. Returns (path, the
    section class at the end or None, the raw value there)."""
    path: list[str] = []
    node, tp = raw, root
    for part in loc:
        if isinstance(node, Mapping) and part in node:
            fields = _fields(tp)
            if fields is not None:
                tp = fields.get(part)
            elif tp is not None and tp is not Any:
                tp = _model_class(node[part]) if path and path[-1] == "models" else None
            node = node[part]
            path.append(str(part))
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            path[-1] = f"{path[-1]}[{part}]" if path else f"[{part}]"
            node, tp = node[part], None
        elif isinstance(node, Mapping) and part in ARCH_CLASSES:
            tp = ARCH_CLASSES[part]                        # the discriminated union's tag
        elif isinstance(node, Mapping) and _fields(tp) and part in _fields(tp):
            path.append(str(part))                          # a missing key with a default
            node, tp = None, _fields(tp)[part]
        # else: a type label of a union arm
    return path, _section_of(tp), node


def _model_class(node: Any) -> Any:
    arch = node.get("arch") if isinstance(node, Mapping) else None
    return ARCH_CLASSES.get(arch, ModelParams)


def _section_of(tp: Any) -> Any:
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _owners(key: str) -> list[str]:
    return [a for a, cls in ARCH_CLASSES.items() if key in cls.model_fields]


def _one(err: Mapping[str, Any], raw: Any, root: Any) -> str:
    loc = tuple(err["loc"])
    kind, value = err["type"], err.get("input")
    path, _, _ = _walk(loc, raw, root)
    where = ".".join(path).replace(".[", "[")
    if kind == "extra_forbidden":
        parent_path, parent, node = _walk(loc[:-1], raw, root)
        key = str(loc[-1])
        names = list(_fields(parent) or [])
        prefix = ".".join(parent_path) + "." if parent_path else ""
        owners = _owners(key) if isinstance(node, Mapping) and "arch" in node else []
        hint = (f" (arch {node.get('arch')} has no {key}; it is a key of arch "
                f"{' and '.join(owners)})" if owners else _did_you_mean(key, names, prefix))
        return f"unknown key {prefix}{key}{hint}"
    if kind == "union_tag_invalid":
        return (f"{where}.arch must be one of {list(ARCHS)}, got "
                f"{err.get('ctx', {}).get('tag')!r}{_did_you_mean(str(value.get('arch')), ARCHS)}")
    if kind == "union_tag_not_found":
        return f"{where} needs an arch: one of {list(ARCHS)}"
    if kind == "literal_error":
        return f"{where} must be one of {err['ctx']['expected']}, got {value!r}"
    if kind == "missing":
        return f"{where} is required"
    if kind in ("greater_than_equal", "greater_than", "less_than", "less_than_equal"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<",
              "less_than_equal": "<="}[kind]
        bound = next(iter(err["ctx"].values()))
        return f"{where} must be {op} {bound}, got {value!r}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        expected = {"int": "int", "float": "float", "string": "str", "bool": "bool",
                    "list": "a list", "dict": "a mapping", "model": "a mapping",
                    "model_attributes": "a mapping"}.get(kind.rsplit("_", 1)[0], kind)
        return f"{where} must be {expected}, got {value!r}"
    if kind == "value_error":
        text = str(err["msg"]).removeprefix("Value error, ")
        first = text.split(" ", 1)[0]
        _, section, _ = _walk(loc, raw, root)
        joined = "." if section is not None and first in (_fields(section) or {}) else ": "
        return f"{where}{joined}{text}" if where else text
    return f"{where}: {err['msg']}" if where else str(err["msg"])


def describe(exc: ValidationError, raw: Any, root: Any = None) -> str:
    """A ValidationError in the words of params.yaml: dotted keys, one line per problem. Of the
    arms of a union (`blocks_per_stage`: a number or a list), the value's own shape speaks."""
    errors = exc.errors()
    by_where: dict[str, list[Mapping[str, Any]]] = {}
    for err in errors:
        path, _, _ = _walk(tuple(err["loc"]), raw, root or Params)
        by_where.setdefault(".".join(path).split("[")[0], []).append(err)
    lines = []
    for errs in by_where.values():
        if len(errs) > 1:
            shaped = [e for e in errs if _is_list_arm(e) == isinstance(_input_at(e, raw, root), list)]
            errs = shaped[:1] or errs[:1]
        lines += [_one(e, raw, root or Params) for e in errs]
    return "; ".join(dict.fromkeys(lines))


def _is_list_arm(err: Mapping[str, Any]) -> bool:
    return any(isinstance(p, str) and p.startswith("list[") for p in err["loc"])


def _input_at(err: Mapping[str, Any], raw: Any, root: Any) -> Any:
    node = raw
    for part in err["loc"]:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            return node
    return node


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
    """Fail unless `dotted` names a declared key: a section field, or an existing entry of the
    models mapping (`models.<name>` must already exist, so a typo cannot create a model; its
    keys are those of its arch)."""
    tp: Any = Params
    node: Any = raw
    where = ""
    for key in dotted.split("."):
        fields = _fields(tp)
        if fields is not None:
            if key not in fields:
                prefix = f"{where}." if where else ""
                owners = _owners(key) if issubclass(tp, ModelParams) else []
                hint = (f" (arch {node.get('arch') if isinstance(node, Mapping) else '?'} has no "
                        f"{key}; it is a key of arch {' and '.join(owners)})" if owners
                        else _did_you_mean(key, fields, prefix))
                raise ParamsError(f"unknown key {prefix}{key}{hint}")
            tp = fields[key]
        elif where == "models":
            have = list(node) if isinstance(node, Mapping) else []
            if key not in have:
                raise ParamsError(f"unknown key models.{key}{_did_you_mean(key, have, 'models.')}"
                                  f" (have: {', '.join(map(str, have)) or 'none'})")
            tp = _model_class(node[key])
        else:
            raise ParamsError(f"cannot set {dotted}: {where} is not a section")
        node = node.get(key) if isinstance(node, Mapping) else None
        where = f"{where}.{key}" if where else key


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
    """A copy of `raw` with the overrides set; every key is checked first. An override of
    `models.<name>.arch` is applied first, so the other keys are checked against the new arch."""
    if overrides is not None and not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    out = copy.deepcopy(dict(raw))
    items = sorted((overrides or {}).items(), key=lambda kv: not kv[0].endswith(".arch"))
    for key, value in items:
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
    data = apply_overrides(raw, overrides)
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(describe(exc, data, Params)) from None


def load(path: str | Path = DEFAULT_PARAMS,
         overrides: Mapping[str, Any] | Iterable[str] | None = None) -> Params:
    """The typed params of `path` with `overrides` ({dotted: value} or ["k=v"]) applied."""
    try:
        return from_dict(load_raw(path), overrides)
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None


def to_dict(obj: Any) -> Any:
    """Plain data (for logging params to MLflow, writing a params file)."""
    return obj.model_dump(by_alias=True) if isinstance(obj, BaseModel) else obj


def json_schema() -> dict[str, Any]:
    """The JSON Schema of params.yaml (editors complete and check the file with it)."""
    schema = Params.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "fer-pipeline params.yaml"
    return schema


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
