"""What training hands on: the model file (`models/<name>/model.keras`) and the MLflow model.

Both are public because evaluate's tests build trained-model fixtures the same way the stage
does. The `.keras` file is written atomically (a crash never leaves half a model for DVC to
cache); the MLflow model carries a signature, an input example and pinned pip requirements.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fer_pipeline.io import atomic_path


def save_model(model, path: str | Path) -> None:
    """Save `model` to `path` atomically. Keras picks the format from the suffix, and
    `atomic_path`'s temp name keeps it (`.keras`)."""
    with atomic_path(path) as tmp:
        model.save(tmp)


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


def log_model(model, x_example: np.ndarray) -> str:
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
