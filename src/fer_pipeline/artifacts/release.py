"""release/model.json: the release manifest. `fer export` writes it; `fer predict` and
`fer serve` read it (classes, test-time augmentation, temperature), and the model card is
rendered from it alone, so what the card states is what the manifest says.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field

from fer_pipeline.artifacts.base import Artifact
from fer_pipeline.artifacts.evaluation import METRICS, ClassScores, Source, metric_model


class Preprocessing(StrEnum):
    """How the model scales the raw 0..255 pixels (params models.<name>.preprocessing); the
    scaling is inside the model, so callers always send raw pixels."""

    RESCALE = "rescale"
    STANDARDIZE = "standardize"
    BASE = "base"

    def describe(self) -> str:
        return {Preprocessing.RESCALE: "pixels divided by 255 (x/255, 0..1)",
                Preprocessing.STANDARDIZE: "each image standardized to mean 0 and standard "
                                           "deviation 1 (blind to brightness and contrast)",
                Preprocessing.BASE: "the base network's own (caffe: the ImageNet channel means "
                                    "subtracted, no scaling)"}[self]


class InputSpec(Artifact):
    shape: list[int | None]
    dtype: str
    pixels: str
    faces: str


# Face detection's fixed parts: fer_pipeline.predict detects with them, the manifest states them.
CASCADE_FILE = "haarcascade_frontalface_default.xml"   # OpenCV's bundled frontal-face cascade
MIN_FACE_PX, MIN_FACE_FRACTION = 24, 12    # smallest face searched: max(24 px, side / 12)


class Detection(Artifact):
    """What `fer predict` and `fer serve` do to find faces in a photo (params predict.*)."""

    detector: str
    min_face_side: str
    roll_angles: list[float] = Field(description="degrees the photo is turned by for a second "
                                                 "search when the upright pass finds no face "
                                                 "([]: tilted faces are not searched)")

    @classmethod
    def haar(cls, roll_angles: list[float]) -> Detection:
        """Detection as fer_pipeline.predict does it, with these roll angles."""
        return cls(detector=f"OpenCV's {CASCADE_FILE}, on the upright photo first",
                   min_face_side=f"max({MIN_FACE_PX} px, 1/{MIN_FACE_FRACTION} of the shorter "
                                 f"image side)", roll_angles=list(roll_angles))


class TrainingFacts(Artifact):
    epochs_run: int | None
    best_epoch: int | None
    train_seconds: float | None
    trainable_params: int | None


class OnnxCheck(Artifact):
    data: str
    images: int
    top1_agreement: float
    max_abs_diff: float
    tolerance: float


class MixedPrecisionCheck(Artifact):
    """A model trained under a mixed policy is released as a float32 copy: how closely the two
    agree on the test split (one view)."""

    trained_policy: str
    images: int
    top1_agreement: float
    max_abs_diff: float
    accuracy_as_trained: float
    accuracy_float32: float


class OnnxFile(Artifact):
    file: str
    opset: int
    md5: str
    bytes: int
    runtime: str
    check: OnnxCheck
    from_mixed_precision: MixedPrecisionCheck | None = None


class ReleaseCalibration(Artifact):
    temperature: float
    fitted_on: str
    tta: str
    bins: int
    test_ece: float | None
    test_ece_calibrated: float | None
    test_nll: float | None
    test_nll_calibrated: float | None


class CleanFacts(Artifact):
    input: int
    dropped: int
    dropped_by_reason: dict[str, int]


class DataFacts(Artifact):
    """What the data stages reported (reports/clean, reports/split), for the card."""

    clean_train: CleanFacts | None = None
    train_per_class: dict[str, int] | None = None


ROBUSTNESS_PREFIX = "robust_"

# The release's metrics and corruption suite: fields from the declared metric list.
ReleaseMetrics = metric_model(
    "ReleaseMetrics", "The released model's metrics: the METRICS entries marked `release`.",
    [(m.key, m) for m in METRICS if m.release])
ReleaseRobustness = metric_model(
    "ReleaseRobustness", "The corruption suite: the robust_* metrics without their prefix.",
    [(m.key.removeprefix(ROBUSTNESS_PREFIX), m) for m in METRICS
     if m.source is Source.ROBUSTNESS])


class ReleaseManifest(Artifact):
    """release/model.json."""

    name: str = Field(description="the registered model name")
    model: str = Field(description="the model's key in params.yaml models")
    arch: str
    registered_version: str | None
    exported_at: str
    git_commit: str
    keras: str
    classes: list[str] = Field(description="class names in the model's output order")
    input: InputSpec
    tta: str = Field(description="test-time augmentation the metrics were measured with, and "
                                 "that predict applies")
    metrics: ReleaseMetrics  # type: ignore[valid-type]
    per_class: dict[str, ClassScores] | None
    training: TrainingFacts
    data_md5: dict[str, str] = Field(description="md5 of the val and test splits, by path")
    data_md5_train: str | None
    recipe: dict[str, Any] = Field(description="models.<model> of params.yaml at export")
    trainable_params: int
    model_md5: str
    model_bytes: int
    onnx: OnnxFile | None
    calibration: ReleaseCalibration | None
    robustness: ReleaseRobustness | None  # type: ignore[valid-type]
    # What the model card states about how the model was made and what it handles.
    pretrained: bool | None = Field(None, description="started from pretrained weights "
                                                      "(training metrics); null: not recorded")
    pretrained_weights: str | None = Field(None, description="which: imagenet or a file")
    preprocessing: Preprocessing | None = Field(None, description="how the model scales pixels")
    detection: Detection | None = None
    confusion: list[list[int]] | None = Field(None, description="test confusion counts, rows "
                                                                "actual, columns predicted")
    data: DataFacts | None = None

