"""Corruptions a 48x48 face crop meets in real photos, at three realistic severities each.

Base module (numpy + OpenCV): evaluate's robustness suite applies them to test images, and
training can reuse them as augmentation. Every corruption is deterministic given its seed (one
generator per corruption and severity), works on uint8-range float32 (N, 48, 48, 1) and returns
the same shape and range.

Severities (1 = mild, 3 = strong), chosen from what phone photos and a face detector produce:
- dark / bright: underexposure (x * 0.6, 0.4, 0.25) / overexposure (towards white by 30/50/70%)
- contrast: deviations from the image mean scaled by 0.6, 0.4, 0.25 (haze, flat light)
- blur: Gaussian, sigma 0.8, 1.2, 1.8 px (defocus, motion, upscaled small faces)
- noise: Gaussian sensor noise, sigma 8, 16, 24 grey levels (low light)
- jpeg: re-encoded at quality 40, 20, 10
- rotation: 10, 20, 30 degrees, random sign (head roll the detector does not undo)
- shift: 3, 5, 7 px in a random direction, edges repeated (detector box misplaced)
- occlusion: a grey square of 10, 14, 18 px at a random place (hand, hair, glasses, mask)
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np

SEVERITIES = (1, 2, 3)


def _rng(seed: int, name: str, severity: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), severity])


def _dark(x, s, rng):
    return x * (0.6, 0.4, 0.25)[s - 1]


def _bright(x, s, rng):
    return x + (255.0 - x) * (0.3, 0.5, 0.7)[s - 1]


def _contrast(x, s, rng):
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - mean) * (0.6, 0.4, 0.25)[s - 1] + mean


def _blur(x, s, rng):
    import cv2

    sigma = (0.8, 1.2, 1.8)[s - 1]
    return np.stack([cv2.GaussianBlur(img[..., 0], (0, 0), sigma)[..., None] for img in x])


def _noise(x, s, rng):
    return x + rng.normal(0.0, (8.0, 16.0, 24.0)[s - 1], x.shape)


def _jpeg(x, s, rng):
    import cv2

    q = (40, 20, 10)[s - 1]
    out = []
    for img in x:
        ok, buf = cv2.imencode(".jpg", np.clip(img[..., 0], 0, 255).astype(np.uint8),
                               [cv2.IMWRITE_JPEG_QUALITY, q])
        out.append(cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)[..., None])
    return np.stack(out).astype(np.float32)


def _warp(img: np.ndarray, m: np.ndarray) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    return cv2.warpAffine(img[..., 0], m, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)[..., None]


def _rotation(x, s, rng):
    import cv2

    deg = (10.0, 20.0, 30.0)[s - 1]
    h, w = x.shape[1:3]
    signs = rng.choice((-1.0, 1.0), len(x))
    return np.stack([_warp(img, cv2.getRotationMatrix2D((w / 2, h / 2), deg * sg, 1.0))
                     for img, sg in zip(x, signs, strict=True)])


def _shift(x, s, rng):
    px = (3.0, 5.0, 7.0)[s - 1]
    angles = rng.uniform(0, 2 * np.pi, len(x))
    return np.stack([_warp(img, np.float32([[1, 0, px * np.cos(a)], [0, 1, px * np.sin(a)]]))
                     for img, a in zip(x, angles, strict=True)])


def _occlusion(x, s, rng):
    side = (10, 14, 18)[s - 1]
    out = x.copy()
    h, w = x.shape[1:3]
    ys = rng.integers(0, h - side + 1, len(x))
    xs = rng.integers(0, w - side + 1, len(x))
    for i, (y0, x0) in enumerate(zip(ys, xs, strict=True)):
        out[i, y0:y0 + side, x0:x0 + side, :] = 128.0
    return out


CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "dark": _dark, "bright": _bright, "contrast": _contrast, "blur": _blur, "noise": _noise,
    "jpeg": _jpeg, "rotation": _rotation, "shift": _shift, "occlusion": _occlusion,
}


def corrupt(x: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """`x` (N, H, W, 1), values 0..255, under corruption `name` at `severity` (1..3)."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r} ({' | '.join(CORRUPTIONS)})")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    xf = np.asarray(x, dtype=np.float32)
    out = CORRUPTIONS[name](xf, severity, _rng(seed, name, severity))
    return np.clip(out, 0.0, 255.0).astype(np.float32)
