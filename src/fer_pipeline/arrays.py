"""The split arrays: the one hand-off between the split stage and training/evaluation.

Each split is one compressed-free `.npz` (uint8 images load in well under a second):
  x       uint8  (N, H, W, 1)   grayscale images, 0..255, not rescaled
  y       int64  (N,)           class index into `classes`
  ids     str    (N,)           path relative to the raw dataset root, e.g. train/angry/Training_1.jpg
  origin  str    (N,)           Training | PublicTest | PrivateTest (from the file name)
  classes str    (C,)           class names, index order
The test split also carries boolean flags (N,) of problems that clean reports but keeps:
  flag_duplicate, flag_blank, flag_leak, flag_label_conflict
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fer_pipeline.errors import MissingInputError
from fer_pipeline.io import atomic_path

PROCESSED_DIR = Path("data/processed")
SPLITS = ("train", "val", "test")
TEST_FLAGS = ("flag_duplicate", "flag_blank", "flag_leak", "flag_label_conflict")


@dataclass
class SplitArrays:
    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    origin: np.ndarray
    classes: list[str]
    flags: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.y.shape[0])


def split_path(directory: str | Path, split: str) -> Path:
    return Path(directory) / f"{split}.npz"


def save_split(path: str | Path, arrays: SplitArrays) -> None:
    with atomic_path(path) as tmp:  # a reader never sees half a file
        np.savez(
            tmp,
            x=arrays.x.astype(np.uint8),
            y=arrays.y.astype(np.int64),
            ids=arrays.ids.astype(str),
            origin=arrays.origin.astype(str),
            classes=np.asarray(arrays.classes, dtype=str),
            **{k: v.astype(bool) for k, v in arrays.flags.items()},
        )


def load_split(path: str | Path) -> SplitArrays:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(
            f"split arrays not found: {path}. Run `dvc repro split` (or `fer split`) first."
        )
    with np.load(path, allow_pickle=False) as npz:
        flags = {k: npz[k] for k in TEST_FLAGS if k in npz.files}
        return SplitArrays(
            x=npz["x"], y=npz["y"], ids=npz["ids"], origin=npz["origin"],
            classes=[str(c) for c in npz["classes"]], flags=flags,
        )
