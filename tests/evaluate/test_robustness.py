"""The corruption suite: deterministic, shape- and range-preserving corruptions whose strength
grows with severity, and a suite that finds the corruption a model is weakest against."""

from __future__ import annotations

import numpy as np
import pytest

from fer_pipeline.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from fer_pipeline.evaluate.metrics import robustness_suite


def faces(n: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.integers(40, 216, (n, 48, 48, 1)).astype(np.float32)
    x[:, 14:34, 14:34] = 230.0     # a bright block: structure that blur, shifts and occlusion touch
    return x


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_is_seeded_and_grows_with_severity(name):
    x = faces()
    outs = [corrupt(x, name, s, seed=3) for s in SEVERITIES]
    for out in outs:
        assert out.shape == x.shape and out.dtype == np.float32
        assert out.min() >= 0 and out.max() <= 255
    assert np.array_equal(outs[1], corrupt(x, name, 2, seed=3))      # deterministic
    change = [float(np.abs(o - x).mean()) for o in outs]
    assert 0 < change[0] < change[1] < change[2], change


def test_unknown_names_and_severities_are_refused():
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(faces(), "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(faces(), "blur", 4)


def test_the_suite_names_the_worst_corruption():
    """A 'model' that reads one pixel's brightness: perfect on clean images, broken by
    darkening, untouched by JPEG-free geometric changes of a flat image."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    x = np.where(y[:, None, None, None] == 1, 200.0, 60.0) * np.ones((300, 48, 48, 1), np.float32)

    def predict(batch: np.ndarray) -> np.ndarray:
        bright = batch[:, 24, 24, 0] > 100
        return np.stack([~bright, bright], axis=1).astype(np.float32)

    rob = robustness_suite(predict, x, y, ["dark", "shift"], [1, 2, 3], max_images=200, seed=0)
    m = rob.metrics
    assert m["robust_n"] == 200 and m["robust_clean_accuracy"] == 1.0
    assert m["robust_shift"] == 1.0 and m["robust_dark"] < 0.9
    assert m["robust_worst_corruption"] == "dark"
    assert m["robust_worst_drop"] == pytest.approx(1.0 - m["robust_dark"])
    assert m["robust_mean_accuracy"] == pytest.approx((m["robust_dark"] + 1.0) / 2)
    assert len(rob.rows) == 6
