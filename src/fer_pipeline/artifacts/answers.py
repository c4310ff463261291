"""What `fer predict` prints and `fer serve` answers: one entry per image, one per face in it.

`fer predict --format json` prints a PredictReport, `--format jsonl` one ImageAnswer per line;
`fer serve` answers POST /predict with a ServeAnswer (its images are named by `name`, the
upload's file name, instead of a path), GET /health with a Health and GET /model with a
ModelDescription. Keys a result does not have are absent, not null (an image that failed has
no `faces`), as clients have always read them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, Self

from pydantic import Field

from fer_pipeline.artifacts.base import Artifact
from fer_pipeline.artifacts.release import ReleaseManifest


class Box(Artifact):
    """Axis-aligned, in the image's pixels (a rolled face: the box around its tilted box)."""

    x: int
    y: int
    w: int
    h: int


class ImageSize(Artifact):
    width: int
    height: int


class FaceAnswer(Artifact):
    box: Box
    roll: float = Field(description="degrees the face is rolled by, counter-clockwise (0: found "
                                    "upright)")
    emotion: str = Field(description="the most probable class")
    confidence: float = Field(description="its probability (temperature-scaled)")
    uncertain: bool = Field(description="confidence below predict.min_confidence")
    probabilities: dict[str, float] = Field(description="per class, in the model's class order")


class Mode(StrEnum):
    DETECT = "detect"   # faces found by the detector
    CROP = "crop"       # a 48x48 image: taken as one face crop
    WHOLE = "whole"     # --no-detect: the whole image as one face


class ImageAnswer(Artifact):
    """One input file: its faces, or why it could not be used (`ok` false, `error`)."""

    path: str
    image_size: ImageSize | None = None
    mode: Mode | None = None
    ok: bool
    faces: list[FaceAnswer] | None = None
    message: str | None = Field(None, description="'no face found' when there is none")
    annotated: str | None = Field(None, description="the annotated image written (--annotate)")
    annotate_error: str | None = None
    error: str | None = Field(None, description="why the file could not be used")
    unexpected: bool | None = Field(None, description="the error was not a known file problem "
                                                      "(its traceback is on stderr)")


class UploadAnswer(ImageAnswer):
    """One uploaded image of a `fer serve` request, named by its file name."""

    path: str = Field(alias="name", description="the upload's file name ('body' for a raw body)")

    @classmethod
    def of(cls, answer: ImageAnswer) -> Self:
        data = answer.to_data()
        return cls.model_validate({"name": data.pop("path"), **data})


class PredictReport(Artifact):
    """`fer predict --format json`: the model used and one entry per input file."""

    model: str = Field(description="which model: a file, an MLflow URI or release:<name>/<model>")
    version: str | None = Field(description="its registered version, when it has one")
    tta: str
    temperature: float
    min_confidence: float
    classes: list[str]
    results: list[ImageAnswer]


class ModelInfo(Artifact):
    """The model `fer serve` answers with."""

    source: str
    version: str | None
    classes: list[str]
    tta: str
    temperature: float
    min_confidence: float


class ServeAnswer(Artifact):
    """POST /predict: every image of the request; `error` (the first image's) when none could
    be used, with a 4xx status."""

    error: str | None = None
    model: ModelInfo
    results: list[UploadAnswer]


class ErrorAnswer(Artifact):
    """Any refused request (size, count, timeout, a bug): never a traceback."""

    error: str


class Health(Artifact):
    status: Literal["ok"]
    model: ModelInfo


class ReleaseCard(Artifact):
    """A release's manifest and model card, as GET /model shows them."""

    manifest: ReleaseManifest
    model_card_markdown: str | None


class ModelDescription(ModelInfo):
    """GET /model."""

    input: str
    card: ReleaseCard | None
