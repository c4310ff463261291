"""Teachers' probabilities on the train split: the hand-off between `teach@<name>` (writes)
and `train@<name>` (reads, when models.<name>.distill.weight > 0).

One .npz per model, data/teacher/<name>.npz:
  probs     float32 (N, C)  mean over the teachers of each one's mean over its views
  ids       str     (N,)    image ids of the train split they were computed on
  classes   str     (C,)    class names, index order
  teachers  str     (T,)    the teacher files; none = written with distillation off (no rows)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fer_pipeline.arrays import SplitArrays
from fer_pipeline.errors import FerError, MissingInputError
from fer_pipeline.io import atomic_path

TEACHER_DIR = Path("data/teacher")   # dvc.yaml's teach@<name> outs


@dataclass(frozen=True)
class SoftLabels:
    probs: np.ndarray          # (N, C) float32, rows sum to 1
    ids: np.ndarray            # (N,) image ids of the split they were computed on
    classes: list[str]
    teachers: list[str]

    def aligned_to(self, split: SplitArrays, path: str | Path) -> np.ndarray:
        """The probabilities in `split`'s row order; fails by path and reason when the file
        was made for another split or class list."""
        rerun = f"rerun `dvc repro teach@{Path(path).stem}`"
        if list(split.classes) != self.classes:
            raise FerError(f"{path}: teacher classes {self.classes} differ from the train "
                           f"split's {list(split.classes)}; {rerun}")
        index = {str(i): k for k, i in enumerate(self.ids)}
        missing = [str(i) for i in split.ids if str(i) not in index]
        if missing:
            raise FerError(f"{path}: no teacher probabilities for {len(missing)} of "
                           f"{len(split)} train images (e.g. {missing[0]}): the split changed "
                           f"since the teachers scored it; {rerun}")
        return self.probs[[index[str(i)] for i in split.ids]]


def save_soft_labels(path: str | Path, labels: SoftLabels) -> None:
    with atomic_path(path) as tmp:   # a reader never sees half a file
        np.savez(tmp, probs=labels.probs.astype(np.float32), ids=np.asarray(labels.ids, dtype=str),
                 classes=np.asarray(labels.classes, dtype=str),
                 teachers=np.asarray(labels.teachers, dtype=str))


def teacher_path(directory: str | Path, name: str) -> Path:
    return Path(directory) / f"{name}.npz"


def load_soft_labels(path: str | Path) -> SoftLabels:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: no teacher probabilities; make them with "
                                f"`fer teach --model {path.stem}` (`dvc repro teach@{path.stem}`)")
    with np.load(path) as z:
        labels = SoftLabels(z["probs"].astype(np.float32), z["ids"],
                            [str(c) for c in z["classes"]], [str(t) for t in z["teachers"]])
    if not labels.teachers:
        raise FerError(f"{path}: written while models.{path.stem}.distill.weight was 0 (no "
                       f"teachers); rerun `dvc repro teach@{path.stem}`")
    return labels
