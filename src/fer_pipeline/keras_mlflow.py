"""Keras models in MLflow: log one (Keras flavor, signature, pinned requirements) and check
whether a logged model is in the current tracking store.

Base module: training logs the model it trained; evaluate logs a local `models/<name>/
model.keras` when the store it runs against lacks the model training logged (a fresh clone,
another machine's store), so neither stage imports the other.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def pip_requirements() -> list[str]:
    """Pinned explicitly: otherwise MLflow infers them by loading the model again in a
    subprocess (slow)."""
    from importlib import metadata

    import keras

    reqs = [f"keras=={keras.__version__}"]
    candidates = {"tensorflow": ["tensorflow-cpu", "tensorflow"], "jax": ["jax"],
                  "torch": ["torch"]}.get(keras.backend.backend(), [])
    for dist in candidates:
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
            break
        except metadata.PackageNotFoundError:
            continue
    return reqs


def log_model(model: Any, x_example: np.ndarray) -> str:
    """Log `model` (Keras flavor) to the active MLflow run; returns its model URI."""
    import mlflow
    import mlflow.keras
    import mlflow.keras.save as keras_save
    from mlflow.models import infer_signature

    example = x_example.astype(np.float32)
    preds = np.asarray(model.predict(example, verbose=0), dtype=np.float32)
    # MLflow 3.17's Keras flavor writes the input example before it creates the model
    # directory (FileNotFoundError on input_example.json): create the directory first.
    orig = keras_save._save_example

    def _save_example(mlflow_model, input_example, path, *args, **kwargs):
        os.makedirs(path, exist_ok=True)
        return orig(mlflow_model, input_example, path, *args, **kwargs)

    keras_save._save_example = _save_example
    try:
        info = mlflow.keras.log_model(model, name="model",
                                      signature=infer_signature(example, preds),
                                      input_example=example, pip_requirements=pip_requirements())
    finally:
        keras_save._save_example = orig
    return info.model_uri


def model_in_store(model_uri: str | None) -> bool:
    """Whether the current tracking store has `model_uri` (`models:/m-<id>` of MLflow 3,
    `runs:/<run>/...`, `models:/<name>/<version>`); False for an empty URI."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not model_uri:
        return False
    client = MlflowClient()
    try:
        if model_uri.startswith("runs:/"):
            client.get_run(model_uri[len("runs:/"):].split("/", 1)[0])
        elif model_uri.startswith("models:/m-"):
            client.get_logged_model(model_uri[len("models:/"):].split("/", 1)[0])
        elif model_uri.startswith("models:/"):
            name, _, ref = model_uri[len("models:/"):].partition("/")
            if ref.startswith("@") or "@" in name:
                n, _, alias = (name + ref).partition("@")
                client.get_model_version_by_alias(n, alias)
            else:
                client.get_model_version(name, ref)
        else:
            return True  # a plain artifact location: let the loader say if it is gone
    except MlflowException:
        return False
    return True
