"""What evaluation reports: the declared metric list, and the models of
reports/evaluate/metrics.json and reports/evaluate/champion.json.

METRICS is the one list of what is measured per model: its key, its label in the comparison
table, its unit (how it is shown), where it comes from (a scorer of evaluate/scorers.py, or
training) and which outputs carry it. From it come the fields of metrics.json (and its JSON
Schema), the columns of comparison.{md,csv}, the numbers logged to MLflow, the metrics of the
release manifest and the columns of the model card's metrics table. Adding a metric: compute
it in its scorer, add its line here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from pydantic import ConfigDict, Field, RootModel, create_model, model_serializer, model_validator

from fer_pipeline.artifacts.base import Artifact, JsonFile


class Unit(StrEnum):
    """What a value is, hence how the comparison table and the model card show it."""

    TEXT = "text"
    FLAG = "flag"            # yes / no
    INT = "int"
    COUNT = "count"          # with thousands separators
    FRACTION = "fraction"    # a share in 0..1 (accuracy, ECE): the card shows a percentage
    SCORE = "score"          # not a share (F1, NLL): the card shows 3 decimals
    SECONDS = "seconds"
    RATE = "rate"            # per second
    FACTOR = "factor"        # a scale (the temperature)
    PER_CLASS = "per_class"  # {class: precision, recall, f1, support}

    def cell(self, value: Any) -> str:
        """The value in comparison.md."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if self is Unit.COUNT:
            return f"{int(value):,}"
        if self in (Unit.SECONDS, Unit.RATE):
            return f"{float(value):,.0f}"
        if self is Unit.FACTOR:
            return f"{float(value):.2f}"
        if isinstance(value, float):
            return f"{value:.4f}"
        return str(value)

    def card(self, value: Any) -> str:
        """The value in the model card."""
        if value is None:
            return "-"
        if self is Unit.FRACTION:
            return f"{100 * float(value):.1f}%"
        if self is Unit.SCORE:
            return f"{float(value):.3f}"
        return self.cell(value)


class Source(StrEnum):
    """Where a value comes from: a scorer of evaluate/scorers.py (score_<source>), training's
    reports/train/<name>/metrics.json, params (the model's identity), or the champion rule."""

    MODEL = "model"              # params: name, arch, recipe (not in metrics.json)
    TRAINING = "training"        # reports/train/<name>/metrics.json
    ACCURACY = "accuracy"        # predictions on test (with evaluate.tta)
    ROBUSTNESS = "robustness"    # the corruption suite (evaluate.robustness.enabled)
    CALIBRATION = "calibration"  # temperature fitted on val (evaluate.calibrate)
    SPEED = "speed"              # the plain prediction pass over test
    SELECTION = "selection"      # the val-data check and the champion rule


# Scorers that params can switch off: their metrics are absent (not null) when they are.
OPTIONAL_SOURCES = (Source.ROBUSTNESS, Source.CALIBRATION)


@dataclass(frozen=True)
class Metric:
    """One measured value per model and the outputs that carry it."""

    key: str                      # metrics.json key; with "{}", a family (one key per name)
    unit: Unit
    source: Source
    doc: str
    column: str | None = None     # header in comparison.{md,csv} (None: not a column)
    mlflow: str | None = None     # MLflow metric name (None: not logged by evaluate)
    release: bool = False         # in release/model.json `metrics`
    card: str | None = None       # header in the model card's metrics table (release needed)
    nullable: bool = False        # may be null (an empty subset, an older training file)

    @property
    def family(self) -> bool:
        return "{}" in self.key

    @property
    def in_metrics_json(self) -> bool:
        return self.source is not Source.MODEL


def _scored(key: str, unit: Unit, source: Source, doc: str, **kw: Any) -> Metric:
    """A metric evaluate measures: logged to MLflow under its key unless told otherwise."""
    kw.setdefault("mlflow", key if unit not in (Unit.TEXT, Unit.FLAG) else None)
    return Metric(key, unit, source, doc, **kw)


U, S = Unit, Source
# In the order of the comparison table's columns; metrics.json keys follow this order too.
METRICS: tuple[Metric, ...] = (
    Metric("model", U.TEXT, S.MODEL, "the model's key in params.yaml models", column="model"),
    Metric("arch", U.TEXT, S.MODEL, "its architecture", column="arch"),
    Metric("pretrained", U.FLAG, S.TRAINING, "started from pretrained weights",
           column="pretrained", nullable=True),
    Metric("trainable_params", U.COUNT, S.TRAINING, "trainable parameters", column="params",
           nullable=True),
    Metric("epochs_run", U.INT, S.TRAINING, "epochs trained", column="epochs", nullable=True),
    Metric("best_epoch", U.INT, S.TRAINING, "the kept epoch (1-based)", column="best epoch",
           nullable=True),
    Metric("train_images", U.INT, S.TRAINING, "training images", column="train images",
           nullable=True),
    Metric("train_seconds", U.SECONDS, S.TRAINING, "training wall time", column="train s",
           nullable=True),
    Metric("val_accuracy", U.FRACTION, S.TRAINING, "accuracy on val: what the champion rule ranks",
           column="val acc", release=True, card="validation", nullable=True),
    _scored("test_accuracy", U.FRACTION, S.ACCURACY, "accuracy on the test split",
            column="test acc", release=True, card="test"),
    _scored("test_accuracy_public", U.FRACTION, S.ACCURACY, "accuracy on FER-2013's PublicTest "
            "half (null: none in the split)", column="PublicTest acc", release=True,
            card="PublicTest", nullable=True),
    _scored("test_accuracy_private", U.FRACTION, S.ACCURACY, "accuracy on the PrivateTest half",
            column="PrivateTest acc", release=True, card="PrivateTest", nullable=True),
    _scored("test_accuracy_clean", U.FRACTION, S.ACCURACY, "accuracy on the test images clean "
            "flagged with no problem (leak, duplicate, blank, label conflict)",
            column="clean test acc", release=True, card="test without flagged images",
            nullable=True),
    _scored("test_macro_f1", U.SCORE, S.ACCURACY, "F1 averaged over classes", column="macro F1",
            release=True, card="macro F1"),
    _scored("test_weighted_f1", U.SCORE, S.ACCURACY, "F1 averaged weighted by support",
            column="weighted F1", release=True),
    _scored("test_top2_accuracy", U.FRACTION, S.ACCURACY, "the label is among the top two",
            column="top-2 acc", release=True, card="top-2"),
    _scored("test_n", U.INT, S.ACCURACY, "test images", release=True),
    _scored("test_n_public", U.INT, S.ACCURACY, "PublicTest images"),
    _scored("test_n_private", U.INT, S.ACCURACY, "PrivateTest images"),
    _scored("test_n_clean", U.INT, S.ACCURACY, "test images without clean's flags", release=True),
    _scored("robust_clean_accuracy", U.FRACTION, S.ROBUSTNESS, "accuracy on the suite's subset "
            "of test, uncorrupted, without test-time augmentation"),
    _scored("robust_n", U.INT, S.ROBUSTNESS, "images of the suite's subset"),
    _scored("robust_{}", U.FRACTION, S.ROBUSTNESS, "accuracy under one corruption (mean over "
            "its severities), one key per corruption of evaluate.robustness.corruptions"),
    _scored("robust_mean_accuracy", U.FRACTION, S.ROBUSTNESS, "mean over the corruptions",
            column="corrupted acc"),
    _scored("robust_worst_drop", U.FRACTION, S.ROBUSTNESS, "clean minus the worst corruption",
            column="worst drop"),
    _scored("robust_worst_corruption", U.TEXT, S.ROBUSTNESS, "the worst corruption's name",
            column="worst corruption"),
    _scored("test_ece", U.FRACTION, S.CALIBRATION, "expected calibration error on test (15 "
            "bins), softmax as is", column="ECE"),
    _scored("test_ece_calibrated", U.FRACTION, S.CALIBRATION, "the same, temperature-scaled",
            column="ECE scaled"),
    _scored("temperature", U.FACTOR, S.CALIBRATION, "the temperature fitted on val (min NLL)",
            column="T"),
    _scored("test_nll", U.SCORE, S.CALIBRATION, "negative log-likelihood on test"),
    _scored("test_nll_calibrated", U.SCORE, S.CALIBRATION, "the same, temperature-scaled"),
    _scored("val_ece_calibrated", U.FRACTION, S.CALIBRATION, "ECE on val after scaling"),
    _scored("images_per_second", U.RATE, S.SPEED, "one plain pass of model.predict over test at "
            "evaluate.batch_size", column="img/s", mlflow="test_images_per_second", release=True),
    _scored("per_class", U.PER_CLASS, S.ACCURACY, "precision, recall, F1 and support per class",
            mlflow="test_{stat}_{cls}"),
    Metric("stale", U.FLAG, S.SELECTION, "validated on other data than the current val split: "
           "not ranked", column="stale val data"),
    Metric("champion", U.FLAG, S.SELECTION, "the champion of this evaluation", column="champion"),
    Metric("recipe", U.TEXT, S.MODEL, "the recipe in a few words", column="recipe"),
)
del U, S
BY_KEY = {m.key: m for m in METRICS}


def comparison_columns() -> list[Metric]:
    return [m for m in METRICS if m.column]


def card_columns() -> list[Metric]:
    return [m for m in METRICS if m.card]


class ClassScores(Artifact):
    precision: float
    recall: float
    f1: float
    support: int


_TYPES: dict[Unit, Any] = {Unit.TEXT: str, Unit.FLAG: bool, Unit.INT: int, Unit.COUNT: int,
                           Unit.PER_CLASS: dict[str, ClassScores]}


def _family_pattern(key: str, keys: tuple[str, ...]) -> str:
    """The keys of a family ("robust_{}") as a regex, JSON Schema's too, without the declared
    keys it would match (robust_n is not a corruption)."""
    head, tail = key.split("{}")
    taken = [k[len(head):len(k) - len(tail)] for k in keys
             if k != key and k.startswith(head) and k.endswith(tail)]
    ahead = f"(?!({'|'.join(map(re.escape, taken))}){re.escape(tail)}$)" if taken else ""
    return f"^{re.escape(head)}{ahead}[a-z][a-z0-9_]*{re.escape(tail)}$"


def _schema_extra(schema: dict[str, Any], cls: Any) -> None:
    schema["additionalProperties"] = False
    if cls.patterns():
        schema["patternProperties"] = {p: {"type": "number", "description": m.doc}
                                       for p, m in cls.patterns()}


class MetricFields(Artifact):
    """A model whose fields are METRICS entries (`listed`: (key here, metric), in list order);
    a family's keys (robust_<corruption>) are checked here and written where the family
    stands in the list."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_schema_extra)
    listed: ClassVar[tuple[tuple[str, Metric], ...]] = ()

    @classmethod
    def patterns(cls) -> list[tuple[str, Metric]]:
        keys = tuple(k for k, _ in cls.listed)
        return [(_family_pattern(k, keys), m) for k, m in cls.listed if m.family]

    @model_validator(mode="after")
    def _only_family_extras(self) -> MetricFields:
        patterns = self.patterns()
        for key, value in (self.model_extra or {}).items():
            if not any(re.match(p, key) for p, _ in patterns):
                raise ValueError(f"unknown key {key!r} (not in the declared metric list)")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{key} must be a number, got {value!r}")
        return self

    @model_serializer(mode="wrap")
    def _in_list_order(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        keys = tuple(k for k, _ in self.listed)
        out: dict[str, Any] = {}
        for key, m in self.listed:
            if m.family:
                pattern = _family_pattern(key, keys)
                out.update({k: data[k] for k in self.model_extra or {} if re.match(pattern, k)})
            elif key in data:
                out[key] = data[key]
        return out

    def family(self, key: str) -> dict[str, float]:
        """{name: value} of a family, e.g. family("robust_{}") -> {"blur": 0.58, ...}."""
        pattern = _family_pattern(key, tuple(k for k, _ in self.listed))
        head, tail = key.split("{}")
        return {k[len(head):len(k) - len(tail)]: float(v)
                for k, v in (self.model_extra or {}).items() if re.match(pattern, k)}

    def value(self, key: str) -> Any:
        return getattr(self, key, None)


def _field(m: Metric) -> tuple[Any, Any]:
    """(type, default) of a metric's field: a scorer that params can switch off gives optional
    fields (absent when off); a nullable one may be null."""
    tp = _TYPES.get(m.unit, float)
    if m.nullable:
        tp = tp | None
    if m.source in OPTIONAL_SOURCES:
        return tp | None, Field(None, description=m.doc)
    return tp, Field(..., description=m.doc)


def metric_model(name: str, doc: str, listed: list[tuple[str, Metric]]) -> type[MetricFields]:
    """A MetricFields model with one field per listed metric (families: extra keys)."""
    model = create_model(name, __base__=MetricFields, __doc__=doc,
                         **{k: _field(m) for k, m in listed if not m.family})
    model.listed = tuple(listed)
    return model


ModelEvaluation = metric_model(
    "ModelEvaluation", "One model's entry of reports/evaluate/metrics.json.",
    [(m.key, m) for m in METRICS if m.in_metrics_json])


class EvaluationMetrics(JsonFile, RootModel[dict[str, ModelEvaluation]]):  # type: ignore[valid-type]
    """reports/evaluate/metrics.json: {model name: its evaluation} (DVC metrics)."""

    def __getitem__(self, name: str) -> Any:
        return self.root[name]

    def __contains__(self, name: object) -> bool:
        return name in self.root


def mlflow_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    """The numbers evaluate logs into a model's MLflow run, under METRICS' `mlflow` names, from
    {metrics.json key: value} (per_class rows as mappings); nulls are not logged."""
    keys = tuple(BY_KEY)
    out: dict[str, float] = {}
    for m in METRICS:
        if not m.mlflow or not m.in_metrics_json:
            continue
        if m.family:
            pattern, (head, tail) = _family_pattern(m.key, keys), m.key.split("{}")
            out.update({m.mlflow.format(k[len(head):len(k) - len(tail)]): float(v)
                        for k, v in values.items() if re.match(pattern, k)})
        elif m.unit is Unit.PER_CLASS:
            for cls, row in (values.get(m.key) or {}).items():
                for stat in ("precision", "recall", "f1"):
                    out[m.mlflow.format(stat=stat, cls=cls)] = float(row[stat])
        elif values.get(m.key) is not None:
            out[m.mlflow] = float(values[m.key])
    return out


def release_metrics(ev: Any) -> dict[str, Any]:
    """The metrics the release manifest carries (METRICS' `release`), those the model has."""
    return {m.key: ev.value(m.key) for m in METRICS
            if m.release and m.key in ev.model_fields_set}


# ---- champion.json ----------------------------------------------------------------------------

class Decision(StrEnum):
    """What the promotion policy decided for the candidate (evaluate/registry.py)."""

    PROMOTED = "promoted"                  # it beat the champion (or there was none): now @champion
    KEPT = "kept"                          # it did not beat the champion by min_improvement
    NOT_ASKED = "not_asked"                # this run may not promote (profile, --model subset)
    ALREADY_CHAMPION = "already_champion"  # it already is @champion
    MANUAL = "manual"                      # `fer promote` moved the alias by hand

    @property
    def alias_stayed(self) -> bool:
        """The champion alias still points at the version it pointed at before."""
        return self in (Decision.KEPT, Decision.NOT_ASKED)


class ChampionBefore(Artifact):
    """The registry's champion when the decision was taken."""

    version: str
    model: str | None
    val_accuracy: float | None
    val_data_md5: str | None
    rescored_val_accuracy: float | None = Field(
        None, description="its accuracy on the current val split, when it was validated on "
                          "other data")


class RegistryOutcome(Artifact):
    """What one registry update did (evaluate's candidate, or `fer promote`)."""

    model_name: str
    champion: str = Field(description="the model this evaluation put forward")
    version: str | None = Field(description="its registered version")
    new_version: bool = Field(description="a version was created by this update")
    alias_moved: bool = Field(description="the champion alias changed")
    previous_version: str | None
    message: str
    decision: Decision
    reason: str
    champion_before: ChampionBefore | None = None


class ChampionRecord(Artifact):
    """reports/evaluate/champion.json: the candidate, the data it was validated on and the
    promotion decision, read by export (which model to release) and `fer run` (what a run did
    to the alias)."""

    champion: str | None = Field(description="this evaluation's candidate (null: none ranked)")
    val_accuracy: float | None
    val_data_md5: str
    stale: list[str] = Field(description="models validated on other data: not ranked")
    min_improvement: float
    decision: Decision | None = Field(description="null: the registry was not asked")
    reason: str | None
    registry: RegistryOutcome | None

    def alias_holder(self) -> str | None:
        """The model the champion alias points at after this evaluation: the candidate, or the
        champion it did not replace."""
        before = self.registry.champion_before if self.registry else None
        if self.decision is not None and self.decision.alias_stayed and before and before.model:
            return before.model
        return self.champion

    def version_of(self, model: str) -> str | None:
        """The registered version of `model` this record knows (candidate or champion before)."""
        if self.registry is None:
            return None
        if self.champion == model:
            return self.registry.version
        before = self.registry.champion_before
        return before.version if before else None
