"""Test-time augmentation: the views of a batch of faces whose probabilities are averaged.

Base module: evaluate scores with it, and `fer predict`/`fer serve` apply the same mode as the
released model's figures were measured with (release/model.json `tta`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

MODES = ("none", "flip", "flip_crops")
SHIFT = 2


def views(x: np.ndarray, mode: str) -> list[np.ndarray]:
    """x itself first, then: "flip" its horizontal mirror (faces are roughly symmetric);
    "flip_crops" also four crops shifted by SHIFT px (edge-padded) and their mirrors: 10 views,
    like ten-crop."""
    if mode not in MODES:
        raise ValueError(f"unknown tta mode {mode!r} ({' | '.join(MODES)})")
    out = [x]
    if mode in ("flip", "flip_crops"):
        out.append(np.ascontiguousarray(x[:, :, ::-1, :]))
    if mode == "flip_crops":
        out += [np.ascontiguousarray(v) for s in _shifted(x) for v in (s, s[:, :, ::-1, :])]
    return out


def mean_probs(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
               mode: str) -> np.ndarray:
    """`predict`'s class probabilities averaged over the views of x (float32 (N, C))."""
    all_views = views(np.asarray(x, dtype=np.float32), mode)
    total = sum(np.asarray(predict(v), dtype=np.float32) for v in all_views)
    return total / len(all_views)


def _shifted(x: np.ndarray) -> list[np.ndarray]:
    """Four copies of x (N, H, W, C) shifted by SHIFT px left/right/up/down, edges repeated."""
    s, h, w = SHIFT, x.shape[1], x.shape[2]
    pad = np.pad(x, ((0, 0), (s, s), (s, s), (0, 0)), mode="edge")
    return [pad[:, s + dy:s + dy + h, s + dx:s + dx + w, :]
            for dy, dx in ((0, s), (0, -s), (s, 0), (-s, 0))]
