"""Resume state of one model's training: `<state_dir>/<name>/`, outside DVC outs.

It holds Keras' BackupAndRestore files, the per-epoch history, the best model so far, the
MLflow run id and (transfer models) the cached frozen-base features. A fingerprint of the
params, precision and data guards it: state made for anything else is discarded. The stage
clears it after a successful finish, so a rerun after a crash continues from the last finished
epoch, in the same MLflow run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fer_pipeline import params as P
from fer_pipeline.arrays import SplitArrays
from fer_pipeline.io import atomic_path, md5_file, write_json
from fer_pipeline.params import ModelParams

log = logging.getLogger(__name__)

HISTORY_FIELDS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate",
                  "seconds", "cpu_seconds"]   # a row restored from an older state: cpu empty


def fingerprint(name: str, mp: ModelParams, seed: int, policy: str,
                data_files: list[Path]) -> str:
    """Changes with the model's params, the seed, the dtype policy and the data files' contents
    (not their paths or times: a retry on another machine resumes the same state)."""
    h = hashlib.sha256()
    h.update(json.dumps([name, P.to_dict(mp), seed, policy], sort_keys=True,
                        default=str).encode())
    for p in data_files:   # by content: a copy pulled on another machine is the same data
        h.update(f"{Path(p).name}:{md5_file(p)}".encode())
    return h.hexdigest()[:16]


def prior_best(rows: list[dict[str, Any]], monitor: str) -> float | None:
    """Best `monitor` value of the restored epochs (None before the first epoch)."""
    values = [float(r[monitor]) for r in rows]
    if not values:
        return None
    return max(values) if monitor.endswith("accuracy") else min(values)


class ResumeState:
    """The files of one model's resume state; `open` keeps them only if the fingerprint matches."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.history_file = path / "history.csv"
        self.best_model = path / "best.keras"
        self.backup_dir = path / "backup"
        self._run_file = path / "mlflow_run.json"
        self._features = path / "features.npz"

    @classmethod
    def open(cls, path: str | Path, fp: str) -> ResumeState:
        state = cls(Path(path))
        marker = state.path / "fingerprint"
        if marker.is_file() and marker.read_text() != fp:
            log.info("resume state in %s is for other params/data: starting over", state.path)
            shutil.rmtree(state.path)
        state.path.mkdir(parents=True, exist_ok=True)
        marker.write_text(fp)
        ignore = state.path.parent / ".gitignore"
        if not ignore.exists():
            ignore.write_text("*\n")
        return state

    # ---- per-epoch history ----
    def history_rows(self) -> list[dict[str, Any]]:
        if not self.history_file.is_file():
            return []
        with self.history_file.open() as fh:
            return list(csv.DictReader(fh))

    def save_history(self, rows: list[dict[str, Any]]) -> None:
        with atomic_path(self.history_file) as tmp, tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS)
            w.writeheader()
            w.writerows(rows)

    # ---- the MLflow run to continue ----
    def run_id(self) -> str | None:
        return json.loads(self._run_file.read_text())["run_id"] if self._run_file.is_file() \
            else None

    def save_run_id(self, run_id: str) -> None:
        write_json(self._run_file, {"run_id": run_id})

    # ---- frozen-base features (transfer models: the base runs once, not per epoch) ----
    def features(self, extract: Callable[[SplitArrays], np.ndarray], train: SplitArrays,
                 val: SplitArrays, label: str = "") -> tuple[np.ndarray, np.ndarray]:
        """(train, val) features: cached ones, or `extract` of each split, then cached."""
        if self._features.is_file():
            with np.load(self._features) as f:
                return f["train"], f["val"]
        t0 = time.perf_counter()
        ftr = np.asarray(extract(train), dtype=np.float32)
        fva = np.asarray(extract(val), dtype=np.float32)
        with atomic_path(self._features) as tmp:
            np.savez(tmp, train=ftr, val=fva)
        log.info("cached frozen %s features %s in %.1fs (base runs once, not per epoch)",
                 label, ftr.shape[1:], time.perf_counter() - t0)
        return ftr, fva

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

