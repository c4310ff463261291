"""Test-set metrics from predicted probabilities (numpy + scikit-learn only).

`predict_proba` runs a Keras model with optional test-time augmentation; everything else works
on arrays, so it is the same for every model and backend.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import f1_score, precision_recall_fscore_support

from fer_pipeline.arrays import TEST_FLAGS
from fer_pipeline.tta import mean_probs


@dataclass
class Prediction:
    probs: np.ndarray          # (N, C) float32
    seconds: float             # wall time of the plain (non-augmented) pass
    images_per_second: float


def predict_proba(model: Any, x: np.ndarray, batch_size: int = 256, tta: str = "none") -> Prediction:
    """Class probabilities of `model` on raw pixels x (N, H, W, 1), 0..255.

    tta="flip" averages the probabilities of each image and its horizontal mirror (faces are
    roughly symmetric; the study trains some models with horizontal flips); "flip_crops" adds
    four crops shifted by SHIFT px (edge-padded) and their mirrors: 10 views, like ten-crop.
    The speed reported is that of the plain pass: images/s of the model itself at this batch
    size.
    """
    seconds: list[float] = []

    def timed(view: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = model.predict(view, batch_size=batch_size, verbose=0)
        seconds.append(time.perf_counter() - t0)
        return out

    probs = mean_probs(timed, x, tta)       # raises on an unknown mode, before any work
    return Prediction(probs, seconds[0], len(probs) / max(seconds[0], 1e-9))


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm  # rows: actual, columns: predicted


def row_normalize(cm: np.ndarray) -> np.ndarray:
    sums = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, sums, out=np.zeros(cm.shape, dtype=float), where=sums > 0)


def _acc(y: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> float | None:
    return float((y[mask] == pred[mask]).mean()) if mask.any() else None


def clean_mask(flags: dict[str, np.ndarray], n: int) -> np.ndarray:
    """True for test images that clean flagged with no problem (kept, but reported apart)."""
    mask = np.ones(n, dtype=bool)
    for key in TEST_FLAGS:
        if key in flags:
            mask &= ~np.asarray(flags[key], dtype=bool)
    return mask


def compute_metrics(y: np.ndarray, probs: np.ndarray, classes: list[str],
                    origin: np.ndarray | None = None,
                    flags: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Flat `test_*` numbers plus a `per_class` table; None where a subset is empty."""
    n_classes = len(classes)
    y = np.asarray(y, dtype=np.int64)
    pred = probs.argmax(axis=1)
    top2 = np.argsort(-probs, axis=1)[:, :2]
    labels = list(range(n_classes))
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=labels,
                                                             zero_division=0)
    origin = np.asarray(origin if origin is not None else np.full(len(y), ""), dtype=str)
    clean = clean_mask(flags or {}, len(y))
    out: dict[str, Any] = {
        "test_accuracy": float((pred == y).mean()),
        "test_macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "test_weighted_f1": float(f1_score(y, pred, labels=labels, average="weighted",
                                           zero_division=0)),
        "test_top2_accuracy": float((top2 == y[:, None]).any(axis=1).mean()),
        "test_accuracy_public": _acc(y, pred, origin == "PublicTest"),
        "test_accuracy_private": _acc(y, pred, origin == "PrivateTest"),
        "test_accuracy_clean": _acc(y, pred, clean),
        "test_n": int(len(y)),
        "test_n_public": int((origin == "PublicTest").sum()),
        "test_n_private": int((origin == "PrivateTest").sum()),
        "test_n_clean": int(clean.sum()),
    }
    out["per_class"] = {
        c: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
            "support": int(support[i])}
        for i, c in enumerate(classes)
    }
    return out


@dataclass
class Calibration:
    temperature: float
    metrics: dict[str, float]             # test_ece, test_nll (+ _calibrated), temperature
    before: list[dict[str, Any]]          # reliability bins on test, raw probabilities
    after: list[dict[str, Any]]           # the same, temperature-scaled
    coverage: list[dict[str, Any]]        # threshold -> share kept, accuracy (scaled probs)


def calibration_metrics(y_test: np.ndarray, test_probs: np.ndarray, y_val: np.ndarray,
                        val_probs: np.ndarray) -> Calibration:
    """Temperature fitted on validation only; ECE (15 bins) and NLL on test before and after."""
    from fer_pipeline import calibration as C

    t = C.fit_temperature(val_probs, y_val)
    scaled = C.apply_temperature(test_probs, t)
    metrics = {"temperature": t, "test_ece": C.ece(test_probs, y_test),
               "test_ece_calibrated": C.ece(scaled, y_test), "test_nll": C.nll(test_probs, y_test),
               "test_nll_calibrated": C.nll(scaled, y_test),
               "val_ece_calibrated": C.ece(C.apply_temperature(val_probs, t), y_val)}
    return Calibration(t, metrics, C.reliability(test_probs, y_test),
                       C.reliability(scaled, y_test), C.coverage_curve(scaled, y_test))


@dataclass
class Robustness:
    rows: list[dict[str, Any]]            # corruption, severity, accuracy
    metrics: dict[str, Any]               # robust_* (see robustness_suite)


def robustness_suite(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray,
                     corruptions: list[str], severities: list[int], max_images: int | None,
                     seed: int) -> Robustness:
    """Accuracy on a seeded subset of (x, y), clean and under each corruption and severity.

    Metrics: robust_clean_accuracy (the subset, no TTA), robust_<corruption> (mean over the
    severities), robust_mean_accuracy (mean over corruptions), robust_worst_drop (clean minus
    the worst corruption's mean) and robust_worst_corruption (its name)."""
    from fer_pipeline.corruptions import corrupt

    idx = np.sort(np.random.default_rng(seed).permutation(len(x))[:max_images or len(x)])
    xs, ys = np.asarray(x, np.float32)[idx], np.asarray(y)[idx]

    def acc(batch: np.ndarray) -> float:
        return float((np.asarray(predict(batch)).argmax(axis=1) == ys).mean())

    clean = acc(xs)
    rows, per = [], {}
    for c in corruptions:
        accs = []
        for sev in severities:
            accs.append(acc(corrupt(xs, c, sev, seed)))
            rows.append({"corruption": c, "severity": sev, "accuracy": accs[-1]})
        per[c] = float(np.mean(accs))
    worst = min(per, key=per.get) if per else None
    metrics: dict[str, Any] = {"robust_clean_accuracy": clean, "robust_n": int(len(idx))}
    metrics.update({f"robust_{c}": v for c, v in per.items()})
    if per:
        metrics.update(robust_mean_accuracy=float(np.mean(list(per.values()))),
                       robust_worst_drop=clean - per[worst], robust_worst_corruption=worst)
    return Robustness(rows, metrics)
