"""Tiny synthetic FER-like data for tests, demos and benchmarks (no download needed).

Images are smooth random blobs with a class-dependent bias, so a model can learn a little
from them; they are not faces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]


def synthetic_image(rng: np.random.Generator, label: int, size: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 110 + 60 * np.sin((label + 1) * np.pi * xx) * np.cos((label % 3 + 1) * np.pi * yy)
    noise = rng.normal(0, 18, (size, size))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def make_raw_tree(root: str | Path, per_class: dict[str, int] | None = None,
                  classes: list[str] | None = None, size: int = 48, seed: int = 0,
                  ext: str = "jpg") -> Path:
    """Write <root>/<split>/<class>/<Origin>_<id>.<ext> like the Kaggle FER-2013 layout."""
    root = Path(root)
    per_class = per_class or {"train": 10, "test": 4}
    classes = classes or CLASSES
    rng = np.random.default_rng(seed)
    n = 0
    for split, count in per_class.items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                n += 1
                if split == "train":
                    origin = "Training"
                else:
                    origin = "PublicTest" if i % 2 == 0 else "PrivateTest"
                img = Image.fromarray(synthetic_image(rng, label, size), mode="L")
                img.save(folder / f"{origin}_{n}.{ext}", quality=95)
    return root


def make_arrays(n: int, size: int = 48, classes: int = 7, seed: int = 0):
    """(x uint8 (n, size, size, 1), y int64) with every class present."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = np.stack([synthetic_image(rng, int(label), size) for label in y])[..., None]
    return x, y.astype(np.int64)
