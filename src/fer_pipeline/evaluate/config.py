"""Typed `evaluate` and `registry` sections of params.yaml (built like every other section)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fer_pipeline.params import ParamsError, build, load_params
from fer_pipeline.train.config import TrainConfig, from_raw

TTA_MODES = ("none", "flip", "flip_crops")


@dataclass(frozen=True)
class EvaluateParams:
    test_path: str = "data/processed/test.npz"   # the only reader of the test split
    reports_dir: str = "reports/evaluate"
    batch_size: int = 256                        # inference batch (and the speed measurement)
    tta: str = "none"                            # none | flip (image + mirror) | flip_crops (10 views)

    def __post_init__(self) -> None:
        if self.tta not in TTA_MODES:
            raise ParamsError(f"evaluate.tta must be one of {sorted(TTA_MODES)}, got {self.tta!r}")
        if self.batch_size < 1:
            raise ParamsError("evaluate.batch_size must be >= 1")


@dataclass(frozen=True)
class RegistryParams:
    enabled: bool = True                 # register the champion in the MLflow model registry
    model_name: str = "fer-emotion"      # registered model name
    champion_alias: str = "champion"     # the version `fer predict` loads by default
    previous_alias: str = "previous"     # the champion it replaced (rollback target)


@dataclass(frozen=True)
class EvaluateConfig:
    evaluate: EvaluateParams
    registry: RegistryParams
    train: TrainConfig
    classes: list[str]


def from_raw_params(extra: dict[str, Any], classes: list[str]) -> EvaluateConfig:
    return EvaluateConfig(
        evaluate=build(EvaluateParams, extra.get("evaluate"), "evaluate"),
        registry=build(RegistryParams, extra.get("registry"), "registry"),
        train=from_raw(extra),
        classes=list(classes),
    )


def load_evaluate_config(path: str | Path = "params.yaml") -> EvaluateConfig:
    params = load_params(path)
    return from_raw_params(params.extra, params.data.classes)
