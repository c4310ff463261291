"""Teacher probabilities for distillation: `fer teach --model NAME` (dvc stage `teach@NAME`).

Trained models (the teachers, params `teach`) score the train split once, averaged over
test-time views and over teachers, and the result is cached as data/teacher/NAME.npz, which
`train@NAME` mixes into its targets (`models.NAME.distill`). A model that does not distill
gets a file with no rows, written without loading anything: one file per model is what lets
dvc.yaml give each `train@NAME` its own dep, so new teachers retrain only the students.

Cached, not computed per step: a teacher's forward pass on every augmented batch would cost a
third of the student's training time per teacher. The file names the rows by image id, so a
student trained on another split fails instead of learning from misaligned targets.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fer_pipeline import io, tta
from fer_pipeline.arrays import SplitArrays, load_split
from fer_pipeline.errors import FerError, MissingInputError
from fer_pipeline.params import DistillParams, TeachParams

TEACHER_DIR = Path("data/teacher")   # dvc.yaml's teach@<name> outs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SoftLabels:
    probs: np.ndarray          # (N, C) float32, rows sum to 1
    ids: np.ndarray            # (N,) image ids of the split they were computed on
    classes: list[str]
    teachers: list[str]

    def aligned_to(self, split: SplitArrays, path: str | Path) -> np.ndarray:
        """The probabilities in `split`'s row order; fails by path and reason when the file
        was made for another split or class list."""
        if list(split.classes) != self.classes:
            raise FerError(f"{path}: teacher classes {self.classes} differ from the train "
                           f"split's {list(split.classes)}; rerun `fer teach`")
        index = {str(i): k for k, i in enumerate(self.ids)}
        missing = [str(i) for i in split.ids if str(i) not in index]
        if missing:
            raise FerError(f"{path}: no teacher probabilities for {len(missing)} of "
                           f"{len(split)} train images (e.g. {missing[0]}): the split changed "
                           f"since `fer teach` ran; rerun it (`dvc repro teach`)")
        return self.probs[[index[str(i)] for i in split.ids]]


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


def teach_model(name: str, distill: DistillParams, params: TeachParams,
                split_file: str | Path, out_dir: str | Path = TEACHER_DIR) -> Path:
    """teach@NAME: the teachers' probabilities for NAME's training split, or (distillation
    off) a file with no rows."""
    out = teacher_path(out_dir, name)
    if not distill.on:
        with io.atomic_path(out) as tmp:
            np.savez(tmp, probs=np.zeros((0, 0), np.float32), ids=np.array([], dtype=str),
                     classes=np.array([], dtype=str), teachers=np.array([], dtype=str))
        log.info("%s: distill.weight is 0, no teachers: %s has no rows", name, out)
        return out
    if not params.teachers:
        raise FerError(f"models.{name}.distill.weight is {distill.weight} but teach.teachers "
                       f"is empty: list the teacher models (.keras) there")
    teach(params.teachers, split_file, out, params.tta, params.temperature)
    return out


def sharpen(probs: np.ndarray, temperature: float) -> np.ndarray:
    """p ** (1/T), renormalized: T > 1 softens (the teachers' "dark knowledge" on the wrong
    classes weighs more), T < 1 sharpens, T = 1 leaves p as is."""
    logp = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    logp -= logp.max(axis=1, keepdims=True)
    p = np.exp(logp)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def teach(teachers: list[str | Path], split_file: str | Path, out: str | Path,
          tta_mode: str = "flip", temperature: float = 1.0, batch_size: int = 256) -> SoftLabels:
    """Score `split_file` with every teacher (mean over `tta_mode` views), average the
    teachers, apply `temperature`, write `out` atomically."""
    if not teachers:
        raise FerError("no teachers: list trained model files (.keras) in distill.teachers")
    missing = [str(t) for t in teachers if not Path(t).is_file()]
    if missing:
        raise MissingInputError(f"teacher model(s) not found: {', '.join(missing)}")
    if temperature <= 0:
        raise FerError(f"temperature must be > 0, got {temperature}")
    import keras

    split = load_split(split_file)
    views = tta.views(split.x, tta_mode)
    total = np.zeros((len(split), len(split.classes)), dtype=np.float64)
    for i, path in enumerate(teachers, 1):
        t0 = time.perf_counter()
        model = keras.saving.load_model(path, compile=False)
        if int(model.output_shape[-1]) != len(split.classes):
            raise FerError(f"{path}: predicts {model.output_shape[-1]} classes, the split has "
                           f"{len(split.classes)}")
        p = np.mean([model.predict(v.astype(np.float32), batch_size=batch_size, verbose=0)
                     for v in views], axis=0)
        total += p
        log.info("teacher %d/%d %s: %d images x %d views in %.0f s, accuracy on them %.4f",
                 i, len(teachers), path, len(split), len(views), time.perf_counter() - t0,
                 float((p.argmax(1) == split.y).mean()))
    probs = sharpen(total / len(teachers), temperature)
    labels = SoftLabels(probs, split.ids, list(split.classes), [str(t) for t in teachers])
    with io.atomic_path(out) as tmp:
        np.savez(tmp, probs=probs, ids=split.ids.astype(str),
                 classes=np.asarray(split.classes, dtype=str),
                 teachers=np.asarray(labels.teachers, dtype=str), tta=tta_mode,
                 temperature=temperature)
    log.info("teacher probabilities: %s (%d rows, mean top probability %.3f, agreement with "
             "the labels %.4f)", out, len(probs), float(probs.max(1).mean()),
             float((probs.argmax(1) == split.y).mean()))
    return labels
