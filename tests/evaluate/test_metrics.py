"""Pure metric and selection logic (no TensorFlow model, no MLflow)."""

from __future__ import annotations

import numpy as np
import pytest

from fer_pipeline.artifacts.evaluation import mlflow_metrics
from fer_pipeline.champion import choose_champion
from fer_pipeline.evaluate.metrics import (
    compute_metrics,
    confusion,
    predict_proba,
    row_normalize,
)
from fer_pipeline.params import EvaluateParams, ParamsError

CLASSES = ["a", "b", "c"]


def test_compute_metrics_subsets_and_top2():
    y = np.array([0, 1, 2, 0])
    probs = np.array([[0.7, 0.2, 0.1],     # right
                      [0.6, 0.3, 0.1],     # wrong, 2nd right
                      [0.1, 0.2, 0.7],     # right
                      [0.1, 0.6, 0.3]])    # wrong, not in top 2
    origin = np.array(["PublicTest", "PublicTest", "PrivateTest", "PrivateTest"])
    flags = {"flag_leak": np.array([False, True, False, False]),
             "flag_blank": np.array([False, False, False, True])}
    m = compute_metrics(y, probs, CLASSES, origin, flags)
    assert m["test_accuracy"] == 0.5
    assert m["test_top2_accuracy"] == 0.75
    assert m["test_accuracy_public"] == 0.5 and m["test_accuracy_private"] == 0.5
    assert m["test_accuracy_clean"] == 1.0 and m["test_n_clean"] == 2
    assert m["per_class"]["c"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    flat = mlflow_metrics(m)
    assert flat["test_f1_c"] == 1.0 and "per_class" not in flat
    # No PublicTest images: that subset is absent (None), not a crash.
    m2 = compute_metrics(y, probs, CLASSES, np.array(["PrivateTest"] * 4))
    assert m2["test_accuracy_public"] is None and "test_accuracy_public" not in mlflow_metrics(m2)


def test_confusion_rows_are_actual():
    cm = confusion(np.array([0, 0, 1]), np.array([0, 1, 1]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    assert row_normalize(cm)[0].tolist() == [0.5, 0.5, 0.0]
    assert row_normalize(cm)[2].tolist() == [0.0, 0.0, 0.0]


class _Asym:
    """Fake model: P(class 0) = mean of the left half of the image / 255."""

    def predict(self, x, batch_size=None, verbose=0):
        left = x[:, :, : x.shape[2] // 2, 0].mean(axis=(1, 2)) / 255.0
        return np.stack([left, 1 - left], axis=1)


def test_tta_flip_averages_image_and_mirror():
    x = np.zeros((2, 4, 4, 1), np.uint8)
    x[:, :, :2] = 255                      # bright left half
    plain = predict_proba(_Asym(), x, tta="none").probs
    flip = predict_proba(_Asym(), x, tta="flip").probs
    assert plain[0, 0] == pytest.approx(1.0)
    assert flip[0, 0] == pytest.approx(0.5)     # mean of (1, 0) and (0, 1)
    with pytest.raises(ParamsError):        # params reject an unknown mode ...
        EvaluateParams(tta="crops")
    with pytest.raises(ValueError):         # ... so reaching predict_proba with one is a bug
        predict_proba(_Asym(), x, tta="crops")


def test_tta_flip_crops_uses_ten_views():
    x = np.zeros((1, 8, 8, 1), np.uint8)
    x[:, :, :4] = 255
    calls = []

    class Counting(_Asym):
        def predict(self, x, batch_size=None, verbose=0):
            calls.append(x.shape)
            return super().predict(x)

    probs = predict_proba(Counting(), x, tta="flip_crops").probs
    assert len(calls) == 10 and all(c == (1, 8, 8, 1) for c in calls)
    # left/right shifts and mirrors balance out: the mean stays symmetric
    assert probs[0, 0] == pytest.approx(0.5)


def test_champion_by_validation_then_fewer_params():
    c = {"x": {"val_accuracy": 0.6, "trainable_params": 100, "test_accuracy": 0.1},
         "y": {"val_accuracy": 0.6, "trainable_params": 50, "test_accuracy": 0.0},
         "z": {"val_accuracy": 0.5, "trainable_params": 1, "test_accuracy": 0.99}}
    assert choose_champion(c) == "y"
    assert choose_champion({"n": {"val_accuracy": None}}) is None
