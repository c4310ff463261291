"""Where a training is recorded: one MLflow run per model, or nothing (`NoRun`).

`MlflowRun` probes the tracking server when made, so an unreachable one fails in seconds,
before anything heavy. A training resumed after a crash continues its MLflow run (the id is
kept in the resume state); tags go on every session, params once. `NoRun` has the same
interface and imports nothing of MLflow: benchmarks and the GPU runner (no MLflow there) train
through the same stage with it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fer_pipeline import tracking
from fer_pipeline.params import MlflowParams

log = logging.getLogger(__name__)


class NoRun:
    """Training without tracking: every call does nothing."""

    run_id: str | None = None
    model_uri: str | None = None

    @contextlib.contextmanager
    def start(self, resume_id: str | None, info: dict[str, Any], data_files: list[Path],
              recipe: dict[str, Any]) -> Iterator[NoRun]:
        yield self

    def log_epoch(self, rows: list[dict[str, Any]]) -> None:
        pass

    def log_result(self, metrics: dict[str, Any], rows: list[dict[str, Any]], title: str,
                   history_file: Path, model: Any, x_example: np.ndarray) -> None:
        pass

    def summary(self, info: dict[str, Any]) -> dict[str, Any] | None:
        return None


class MlflowRun(NoRun):
    """One model's training in MLflow: tags, params, per-epoch metrics, the final metrics,
    the history figure and (params `mlflow.log_model`) the model."""

    def __init__(self, params: MlflowParams) -> None:
        self.params = params
        self.uri = tracking.setup_tracking(params.tracking_uri, params.experiment,
                                           params.probe_timeout_s)
        self.tags: dict[str, str] = {}
        log.info("MLflow tracking: %s, experiment %s", self.uri, params.experiment)

    @contextlib.contextmanager
    def start(self, resume_id: str | None, info: dict[str, Any], data_files: list[Path],
              recipe: dict[str, Any]) -> Iterator[MlflowRun]:
        """The run `resume_id` if it still exists, else a new one named after the model."""
        import mlflow

        if resume_id:
            try:
                mlflow.get_run(resume_id)
            except Exception:  # noqa: BLE001 - run gone (another store): start a new one
                resume_id = None
        self.tags = tracking.run_tags(data_files, {
            "model_name": info["model_name"], "arch": info["arch"],
            "pretrained": str(info["pretrained"]).lower(), "precision": info["precision"],
            "backend": info["backend"]})
        with mlflow.start_run(run_id=resume_id,
                              run_name=None if resume_id else info["model_name"]) as run:
            self.run_id = run.info.run_id
            mlflow.set_tags(self.tags)
            if not resume_id:
                params = {**tracking.flatten(recipe), **info}
                mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
            yield self

    def log_epoch(self, rows: list[dict[str, Any]]) -> None:
        """Metrics of the newest row, at step = its epoch."""
        import mlflow

        row = rows[-1]
        mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch" and np.isfinite(v)},
                           step=int(row["epoch"]))

    def log_result(self, metrics: dict[str, Any], rows: list[dict[str, Any]], title: str,
                   history_file: Path, model: Any, x_example: np.ndarray) -> None:
        import mlflow

        from fer_pipeline.plots import history_figure
        from fer_pipeline.train.artifacts import log_model

        mlflow.log_metrics({f"final_{k}": float(v) for k, v in metrics.items()
                            if isinstance(v, int | float) and not isinstance(v, bool)})
        mlflow.log_figure(history_figure(rows, title), "plots/history.png")
        mlflow.log_artifact(str(history_file), "history")
        if self.params.log_model:
            self.model_uri = log_model(model, x_example)

    def summary(self, info: dict[str, Any]) -> dict[str, Any]:
        """What mlflow.json records: where the run is (no path of this machine: the file is
        committed), and the model's facts."""
        return {"run_id": self.run_id, "model_uri": self.model_uri,
                "tracking_uri": tracking.portable_uri(self.uri),
                "experiment": self.params.experiment,
                "pipeline_run_id": self.tags.get("pipeline_run_id"), **info}
