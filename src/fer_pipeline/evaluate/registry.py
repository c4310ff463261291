"""MLflow side of evaluation: per-run evaluation logging and the model registry.

Scheme: registered model `registry.model_name` (default fer-emotion); its versions are the
Keras-flavor models that training logged (so the registry points at the trained artifact and
its run, no copy). Alias `champion` = the version `fer predict` and serving use; when it moves,
the version it left gets alias `previous` (rollback: point `champion` back at it) and the
registered model's tag `champion_history` records every move (`v3:custom_cnn:2026-11-27T22:00Z`).
A champion whose model is already registered reuses that version: re-running evaluate with
nothing changed registers nothing and moves no alias.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from fer_pipeline.params import RegistryParams

log = logging.getLogger(__name__)

HISTORY_TAG = "champion_history"
HISTORY_MAX_CHARS = 4000


def log_evaluation(run_id: str | None, name: str, metrics: dict[str, float], figures: dict[str, Any],
                   per_class: list[dict[str, Any]], tags: dict[str, str]) -> str:
    """Log the evaluation into the model's training run (resumed); a new run if it is gone."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            mlflow.get_run(run_id)
        except MlflowException:  # another tracking store, or the run was deleted
            log.warning("%s: training run %s not found in this tracking store; logging the "
                        "evaluation to a new run", name, run_id)
            run_id = None
    kwargs = {"run_id": run_id} if run_id else {"run_name": f"{name}-evaluation"}
    with mlflow.start_run(**kwargs) as run:
        mlflow.log_metrics(metrics)
        for artifact, fig in figures.items():
            if fig is not None:
                mlflow.log_figure(fig, artifact)
        mlflow.log_table(pd.DataFrame(per_class), "evaluation/per_class.json")
        mlflow.set_tags({"model_name": name, "evaluated": "true", **tags})
        return run.info.run_id


@dataclass
class RegistryOutcome:
    model_name: str
    champion: str
    version: str | None
    new_version: bool          # a version was created by this call
    alias_moved: bool          # the champion alias changed by this call
    previous_version: str | None
    message: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _same_model(mv: Any, model_uri: str) -> bool:
    model_id = getattr(mv, "model_id", None)
    return mv.source == model_uri or bool(model_id and model_uri == f"models:/{model_id}")


def register_champion(rp: RegistryParams, champion: str, model_uri: str,
                      version_tags: dict[str, str] | None = None) -> RegistryOutcome:
    """Make `model_uri` the version under alias `champion`; idempotent."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    name = rp.model_name
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description="FER-2013 emotion classifier. Input: float32 (N, 48, 48, 1) raw "
                              "grayscale pixels 0..255; output: (N, 7) class probabilities.")
    try:
        current = client.get_model_version_by_alias(name, rp.champion_alias)
    except MlflowException:
        current = None

    if current is not None and _same_model(current, model_uri):
        msg = (f"{name} v{current.version} (`{champion}`) is already @{rp.champion_alias}: "
               f"nothing registered")
        log.info(msg)
        return RegistryOutcome(name, champion, str(current.version), False, False, None, msg)

    existing = [mv for mv in client.search_model_versions(f"name='{name}'")
                if _same_model(mv, model_uri)]
    if existing:
        mv = max(existing, key=lambda v: int(v.version))
        new = False
    else:
        mv = mlflow.register_model(model_uri, name, tags=version_tags or {})
        new = True
    previous = None
    if current is not None:
        client.set_registered_model_alias(name, rp.previous_alias, current.version)
        previous = str(current.version)
    client.set_registered_model_alias(name, rp.champion_alias, mv.version)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%MZ")
    history = client.get_registered_model(name).tags.get(HISTORY_TAG, "")
    history = ",".join(filter(None, [history, f"v{mv.version}:{champion}:{stamp}"]))
    while len(history) > HISTORY_MAX_CHARS:
        history = history.split(",", 1)[1]
    client.set_registered_model_tag(name, HISTORY_TAG, history)
    msg = (f"{name} v{mv.version} (`{champion}`, {'new version' if new else 'existing version'}) "
           f"is now @{rp.champion_alias}"
           + (f"; v{previous} is @{rp.previous_alias}" if previous else ""))
    log.info(msg)
    return RegistryOutcome(name, champion, str(mv.version), new, True, previous, msg)
