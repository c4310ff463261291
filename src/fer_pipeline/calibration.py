"""Calibration: do the probabilities a model shows mean what they say?

Base module (numpy + scipy). Evaluate measures expected calibration error (ECE, equal-width
confidence bins), negative log-likelihood and a reliability table on the test set, and fits one
temperature on the *validation* set (the same test-time augmentation as the test figures);
`fer predict`, `fer serve` and the release apply that temperature to every probability they
show. Temperature scaling divides the log-probabilities by T and renormalises: the top class
never changes, so accuracy is untouched; T > 1 softens an over-confident model.
"""

from __future__ import annotations

import numpy as np

BINS = 15                 # the usual ECE bin count (Guo et al., 2017)
T_RANGE = (0.05, 20.0)    # search interval for the temperature
EPS = 1e-12


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(probs) / T), row-wise; T = 1 returns probs unchanged."""
    probs = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0:
        return probs.astype(np.float32)
    z = np.log(np.clip(probs, EPS, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class."""
    p = np.asarray(probs, dtype=np.float64)[np.arange(len(y)), np.asarray(y, dtype=np.int64)]
    return float(-np.log(np.clip(p, EPS, 1.0)).mean())


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = BINS) -> list[dict[str, float]]:
    """Per equal-width bin of top-1 confidence: its range, image count, mean confidence and
    accuracy (empty bins have count 0 and None figures)."""
    probs = np.asarray(probs)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        m = idx == b
        rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(m.sum()),
                     "confidence": float(conf[m].mean()) if m.any() else None,
                     "accuracy": float(correct[m].mean()) if m.any() else None})
    return rows


def ece(probs: np.ndarray, y: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: sum over bins of (share of images) x |accuracy - confidence|."""
    n = max(len(y), 1)
    return float(sum(r["count"] / n * abs(r["accuracy"] - r["confidence"])
                     for r in reliability(probs, y, bins) if r["count"]))


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The T in T_RANGE minimising the NLL of apply_temperature(probs, T) on (probs, y)."""
    from scipy.optimize import minimize_scalar

    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0))
    y = np.asarray(y, dtype=np.int64)

    def loss(log_t: float) -> float:
        z = logp / np.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        return float(-(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1))).mean())

    res = minimize_scalar(loss, bounds=tuple(np.log(T_RANGE)), method="bounded",
                          options={"xatol": 1e-4})
    return float(np.exp(res.x))


def coverage_curve(probs: np.ndarray, y: np.ndarray,
                   thresholds: tuple[float, ...] = tuple(np.round(np.arange(0, 1.0, 0.05), 2))
                   ) -> list[dict[str, float]]:
    """For each confidence threshold: the share of faces kept (top probability >= it) and the
    accuracy on them: what `predict.min_confidence` trades."""
    probs = np.asarray(probs)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y)
    rows = []
    for t in thresholds:
        keep = conf >= t
        rows.append({"threshold": float(t), "coverage": float(keep.mean()),
                     "accuracy": float(correct[keep].mean()) if keep.any() else None})
    return rows
