"""What training hands on: the model file (`models/<name>/model.keras`) and the MLflow model.

Both are public because evaluate's tests build trained-model fixtures the same way the stage
does. The `.keras` file is written atomically (a crash never leaves half a model for DVC to
cache); the MLflow model carries a signature, an input example and pinned pip requirements.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fer_pipeline import keras_mlflow
from fer_pipeline.io import atomic_path


def save_model(model, path: str | Path) -> None:
    """Save `model` to `path` atomically. Keras picks the format from the suffix, and
    `atomic_path`'s temp name keeps it (`.keras`)."""
    with atomic_path(path) as tmp:
        model.save(tmp)


def log_model(model, x_example: np.ndarray) -> str:
    """Log `model` (Keras flavor) to the active MLflow run; returns its model URI."""
    return keras_mlflow.log_model(model, x_example)
