"""Teacher probabilities for distillation: `fer teach --model NAME` (dvc stage `teach@NAME`).

Trained models (the teachers, `models.NAME.distill.teachers`) score the train split once,
averaged over test-time views and over teachers, and the result is cached as
data/teacher/NAME.npz (format: soft_labels.py), which `train@NAME` mixes into its targets
(`models.NAME.distill`). A model that does not distill
gets a file with no rows, written without loading anything: one file per model is what lets
dvc.yaml give each `train@NAME` its own dep, so new teachers retrain only the students.

Cached, not computed per step: a teacher's forward pass on every augmented batch would cost a
third of the student's training time per teacher. The file names the rows by image id, so a
student trained on another split fails instead of learning from misaligned targets.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from fer_pipeline import tta
from fer_pipeline.arrays import load_split
from fer_pipeline.errors import FerError, MissingInputError
from fer_pipeline.params import DistillParams
from fer_pipeline.soft_labels import TEACHER_DIR, SoftLabels, save_soft_labels, teacher_path

log = logging.getLogger(__name__)


def teach_model(name: str, distill: DistillParams, split_file: str | Path,
                out_dir: str | Path = TEACHER_DIR) -> Path:
    """teach@NAME: the teachers' probabilities for NAME's training split, or (distillation
    off) a file with no rows."""
    out = teacher_path(out_dir, name)
    if not distill.on:
        save_soft_labels(out, SoftLabels(np.zeros((0, 0), np.float32), np.array([], dtype=str),
                                         [], []))
        log.info("%s: distill.weight is 0, no teachers: %s has no rows", name, out)
        return out
    teach(distill.teachers, split_file, out, distill.tta, distill.temperature)
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
    teachers, apply `temperature` (> 0: DistillParams checks it), write `out` atomically."""
    if not teachers:
        raise FerError("no teachers: list trained model files (.keras) in "
                       "models.<name>.distill.teachers")
    missing = [str(t) for t in teachers if not Path(t).is_file()]
    if missing:
        raise MissingInputError(f"teacher model(s) not found: {', '.join(missing)} (see "
                                f"teachers/README.md)")
    import keras

    split = load_split(split_file)
    total = np.zeros((len(split), len(split.classes)), dtype=np.float64)
    for i, path in enumerate(teachers, 1):
        t0 = time.perf_counter()
        model = keras.saving.load_model(path, compile=False)
        if int(model.output_shape[-1]) != len(split.classes):
            raise FerError(f"{path}: predicts {model.output_shape[-1]} classes, the split has "
                           f"{len(split.classes)}")
        p = tta.mean_probs(lambda v, m=model: m.predict(v, batch_size=batch_size, verbose=0),
                           split.x, tta_mode)
        total += p
        log.info("teacher %d/%d %s: %d images (tta %s) in %.0f s, accuracy on them %.4f",
                 i, len(teachers), path, len(split), tta_mode, time.perf_counter() - t0,
                 float((p.argmax(1) == split.y).mean()))
    probs = sharpen(total / len(teachers), temperature)
    labels = SoftLabels(probs, split.ids, list(split.classes), [str(t) for t in teachers])
    save_soft_labels(out, labels)
    log.info("teacher probabilities: %s (%d rows, mean top probability %.3f, agreement with "
             "the labels %.4f)", out, len(probs), float(probs.max(1).mean()),
             float((probs.argmax(1) == split.y).mean()))
    return labels
