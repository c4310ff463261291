"""Calibration (ECE, NLL, temperature scaling): numbers checked against cases worked by hand and
against a simulated over-confident model whose true calibration is known."""

from __future__ import annotations

import numpy as np
import pytest

from fer_pipeline import calibration as C
from fer_pipeline.evaluate.metrics import calibration_metrics


def overconfident(n: int, seed: int, temperature: float = 2.5) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from well-calibrated probabilities, then shown sharpened by 1/temperature:
    the model is over-confident by exactly `temperature`."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.2, (n, 7))
    true_p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(7, p=p) for p in true_p])
    shown = np.exp(logits * temperature)
    return (shown / shown.sum(1, keepdims=True)).astype(np.float32), y


def test_ece_and_nll_by_hand():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    y = np.array([0, 1, 0, 0])
    # bin of 0.9: 2 images, accuracy 0.5 -> gap 0.4; bin of 0.6: 2 images, accuracy 1 -> gap 0.4
    assert C.ece(probs, y) == pytest.approx(0.4)
    assert C.nll(probs, y) == pytest.approx(-(np.log(0.9) + np.log(0.1) + 2 * np.log(0.6)) / 4)
    rows = C.reliability(probs, y)
    assert len(rows) == C.BINS and sum(r["count"] for r in rows) == 4
    assert C.apply_temperature(probs, 1.0) == pytest.approx(probs)


def test_temperature_recovers_the_overconfidence_and_keeps_the_top_class():
    val, y_val = overconfident(4000, seed=1)
    test, y_test = overconfident(4000, seed=2)
    t = C.fit_temperature(val, y_val)
    assert t == pytest.approx(2.5, rel=0.1)
    scaled = C.apply_temperature(test, t)
    assert (scaled.argmax(1) == test.argmax(1)).all()
    assert scaled.sum(1) == pytest.approx(np.ones(len(test)), abs=1e-5)
    assert C.ece(test, y_test) > 0.10 and C.ece(scaled, y_test) < 0.03
    assert C.nll(scaled, y_test) < C.nll(test, y_test)


def test_calibration_metrics_fit_on_val_and_report_on_test():
    val, y_val = overconfident(3000, seed=3)
    test, y_test = overconfident(3000, seed=4)
    cal = calibration_metrics(y_test, test, y_val, val)
    m = cal.metrics
    assert m["temperature"] == pytest.approx(C.fit_temperature(val, y_val))
    assert m["test_ece_calibrated"] < m["test_ece"] and m["test_nll_calibrated"] < m["test_nll"]
    cov = {r["threshold"]: r for r in cal.coverage}
    assert cov[0.0]["coverage"] == 1.0
    # keeping only confident faces raises accuracy, and keeps fewer of them
    assert cov[0.5]["coverage"] < 1.0 and cov[0.5]["accuracy"] > cov[0.0]["accuracy"]
