"""Test images of faces from the fixtures, shared by the predict and serve tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def rolled_face(name: str, degrees: float) -> np.ndarray:
    """A fixture face upscaled to 200 px with a margin, on a 320x320 canvas turned by `degrees`
    (counter-clockwise); at +-30 the upright cascade misses it and the roll search finds it."""
    face = cv2.imread(str(FIXTURES / name), cv2.IMREAD_GRAYSCALE)
    face = cv2.resize(cv2.copyMakeBorder(face, 8, 8, 8, 8, cv2.BORDER_REPLICATE), (200, 200),
                      interpolation=cv2.INTER_CUBIC)
    canvas = cv2.copyMakeBorder(face, 60, 60, 60, 60, cv2.BORDER_REPLICATE)
    h, w = canvas.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    return cv2.warpAffine(canvas, m, (w, h), borderMode=cv2.BORDER_REPLICATE)
