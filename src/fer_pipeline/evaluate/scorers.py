"""The evaluate stage's scorers: each measures one thing about one model and returns a typed
result with the files and figures it makes.

A scorer's metric keys are declared in fer_pipeline.artifacts.evaluation.METRICS (its
`source`); metrics.json refuses a key that is not there. A scorer's figures are saved as
images/<model>_<kind>.png and logged to MLflow as evaluation/<kind>.png; its files are
<folder>/<model>.csv. `score_model` runs them all on one model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fer_pipeline.arrays import SplitArrays
from fer_pipeline.artifacts.evaluation import METRICS, Source
from fer_pipeline.artifacts.train import TrainMetrics
from fer_pipeline.evaluate import metrics as M
from fer_pipeline.evaluate import report as R
from fer_pipeline.params import EvaluateParams, RobustnessParams

log = logging.getLogger(__name__)


@dataclass
class Score:
    """One scorer's result for one model."""

    source: Source
    metrics: dict[str, Any]                                   # METRICS keys of `source`
    figures: dict[str, Any] = field(default_factory=dict)     # kind -> matplotlib figure
    files: dict[str, Callable[[Path], None]] = field(default_factory=dict)  # folder -> writer
    summary: str = ""                                         # one log line ("" = none)


@dataclass
class AccuracyScore(Score):
    confusion: np.ndarray | None = None       # counts, rows actual
    per_class_rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CalibrationScore(Score):
    temperature: float = 1.0


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def score_training(name: str, trained: TrainMetrics, history_csv: Path) -> Score:
    """What training measured (its metrics.json, as METRICS names them) and its curves."""
    values = {m.key: getattr(trained, m.key) for m in METRICS if m.source is Source.TRAINING}
    curves = R.curves_figure(history_csv, f"{name}: training curves")
    return Score(Source.TRAINING, values, {"curves": curves} if curves is not None else {})


def score_accuracy(name: str, test: SplitArrays, probs: np.ndarray) -> AccuracyScore:
    """Accuracy, F1, top-2, the test subsets and per-class figures; the confusion matrix."""
    classes = test.classes
    m = M.compute_metrics(test.y, probs, classes, test.origin, test.flags)
    y_pred = probs.argmax(axis=1)
    cm = M.confusion(test.y, y_pred, len(classes))
    rows = R.per_class_rows(m)
    files = {kind: (lambda path: R.write_confusion_csv(path, test.y, y_pred, classes))
             for kind in ("confusion", "confusion_normalized")}   # same rows, two DVC templates
    files["per_class"] = lambda path: R.write_csv(path, rows, ["class", "precision", "recall",
                                                               "f1", "support"])
    figures = {"confusion": R.confusion_figure(cm, classes, f"{name}: confusion (counts)", False),
               "confusion_normalized": R.confusion_figure(
                   cm, classes, f"{name}: confusion (row-normalised)", True)}
    summary = (f"{name}: test acc {m['test_accuracy']:.4f} (public {_f(m['test_accuracy_public'])}"
               f", private {_f(m['test_accuracy_private'])}, clean {_f(m['test_accuracy_clean'])})"
               f", macro F1 {m['test_macro_f1']:.4f}, top-2 {m['test_top2_accuracy']:.4f}")
    return AccuracyScore(Source.ACCURACY, m, figures, files, summary, cm, rows)


def score_speed(name: str, pred: M.Prediction) -> Score:
    """Images per second of the plain pass (the model itself, at evaluate.batch_size)."""
    return Score(Source.SPEED, {"images_per_second": round(pred.images_per_second, 1)},
                 summary=f"{name}: {pred.images_per_second:.0f} img/s")


def score_calibration(name: str, test: SplitArrays, probs: np.ndarray, val: SplitArrays,
                      val_probs: np.ndarray) -> CalibrationScore:
    """Temperature fitted on val; ECE and NLL on test before and after; reliability, coverage."""
    cal = M.calibration_metrics(test.y, probs, val.y, val_probs)
    m = cal.metrics
    fig = R.reliability_figure(cal.before, cal.after, f"{name}: reliability on test "
                               f"(T={cal.temperature:.2f} fitted on val)", m["test_ece"],
                               m["test_ece_calibrated"])
    summary = (f"{name}: calibration on test: ECE {m['test_ece']:.4f} -> "
               f"{m['test_ece_calibrated']:.4f}, NLL {m['test_nll']:.4f} -> "
               f"{m['test_nll_calibrated']:.4f} with T={cal.temperature:.3f} (fitted on val)")
    return CalibrationScore(
        Source.CALIBRATION, dict(m), {"reliability": fig},
        {"coverage": lambda path: R.write_csv(path, cal.coverage, ["threshold", "coverage",
                                                                   "accuracy"])},
        summary, cal.temperature)


def score_robustness(name: str, predict: Callable[[np.ndarray], np.ndarray], test: SplitArrays,
                     rp: RobustnessParams) -> Score:
    """Accuracy on a seeded subset of test, clean and under each corruption (no TTA)."""
    rob = M.robustness_suite(predict, test.x, test.y, rp.corruptions, rp.severities,
                             rp.max_images, rp.seed)
    m = rob.metrics
    fig = R.robustness_figure(rob.rows, m["robust_clean_accuracy"], f"{name}: accuracy under "
                              f"corruptions ({m['robust_n']} test images, no TTA)")
    summary = (f"{name}: corruption suite ({m['robust_n']} images): clean "
               f"{m['robust_clean_accuracy']:.4f}, mean {m['robust_mean_accuracy']:.4f}, worst "
               f"drop {m['robust_worst_drop']:.4f} ({m['robust_worst_corruption']})"
               if "robust_mean_accuracy" in m else "")
    return Score(Source.ROBUSTNESS, m, {"robustness": fig},
                 {"robustness": lambda path: R.write_csv(path, rob.rows, ["corruption", "severity",
                                                                          "accuracy"])}, summary)


def score_model(name: str, model: Any, test: SplitArrays, val: SplitArrays | None,
                evaluate: EvaluateParams, trained: TrainMetrics, history_csv: Path) -> list[Score]:
    """Every scorer on one loaded model: the model's passes first (test with TTA, val for
    calibration when `val` is given, the corruption suite when enabled), then the numbers."""
    pred = M.predict_proba(model, test.x, evaluate.batch_size, evaluate.tta)
    val_probs = (M.predict_proba(model, val.x, evaluate.batch_size, evaluate.tta).probs
                 if val is not None else None)
    rp = evaluate.robustness
    scores = [score_training(name, trained, history_csv), score_accuracy(name, test, pred.probs)]
    if rp.enabled:
        scores.append(score_robustness(
            name, lambda xb: model.predict(xb, batch_size=evaluate.batch_size, verbose=0), test, rp))
    if val is not None and val_probs is not None:
        scores.append(score_calibration(name, test, pred.probs, val, val_probs))
    scores.append(score_speed(name, pred))
    for s in scores:
        if s.summary:
            log.info(s.summary)
    return scores
