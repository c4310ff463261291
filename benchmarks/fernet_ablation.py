"""Ablation of the fifth model's recipe, measured on the validation split only.

Each variant switches one idea of `models.fernet` off (the same params `dvc exp run -S
models.fernet.<key>=...` changes) and trains with the project's own `train_model` on a
reduced budget (a per-class cap of the training split and fewer epochs), so the table fits
in minutes on a CPU. Runs go to the MLflow experiment `fer-ablation`. The test set is never
read.

    python benchmarks/fernet_ablation.py --cap 1000 --epochs 8     # appends to results.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from fer_pipeline.data.arrays import SplitArrays, load_split, save_split, split_path
from fer_pipeline.evaluate.metrics import predict_proba
from fer_pipeline.train.config import AugmentParams, load_train_config

RESULTS = Path(__file__).with_name("results.md")


def capped(arrays: SplitArrays, cap: int, seed: int = 0) -> SplitArrays:
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.permutation(np.flatnonzero(arrays.y == c))[:cap]
                           for c in np.unique(arrays.y)])
    keep.sort()
    return SplitArrays(arrays.x[keep], arrays.y[keep], arrays.ids[keep], arrays.origin[keep],
                       arrays.classes)


def variants(base):
    r = dataclasses.replace
    return {
        "full recipe": base,
        "- label smoothing": r(base, label_smoothing=0.0),
        "- random erasing": r(base, augmentation=r(base.augmentation, random_erasing=0.0)),
        "- all augmentation": r(base, augmentation=AugmentParams()),
        "- AdamW + cosine (Adam + ReduceLROnPlateau, the study)":
            r(base, optimizer="adam", lr_schedule="plateau", learning_rate=1e-3, weight_decay=0.0),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cap", type=int, default=1000, help="training images per class")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--only", nargs="*", help="variant names to run")
    args = ap.parse_args()

    from fer_pipeline.train.stage import train_model

    cfg = load_train_config()
    base = dataclasses.replace(cfg.model("fernet"), epochs=args.epochs,
                               warmup_epochs=min(1, args.epochs - 1))
    tmp = Path(tempfile.mkdtemp(prefix="fer-ablation-"))
    save_split(split_path(tmp, "train"), capped(load_split("data/processed/train.npz"), args.cap))
    val = load_split("data/processed/val.npz")
    save_split(split_path(tmp, "val"), val)
    mlflow_params = dataclasses.replace(cfg.mlflow, experiment="fer-ablation")
    os.environ.setdefault("FER_PIPELINE_RUN_ID", f"ablation-{datetime.now():%Y%m%d-%H%M}")
    rows = []
    for name, mp in variants(base).items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        res = train_model("fernet_ablation", mp, cfg.train, mlflow_params, processed_dir=tmp,
                          models_dir=tmp / "models", reports_dir=tmp / "reports",
                          state_dir=tmp / "state")
        import keras

        model = keras.saving.load_model(res.model_path)
        flip = predict_proba(model, val.x, tta="flip").probs.argmax(1)
        rows.append((name, res.metrics["val_accuracy"], float((flip == val.y).mean()),
                     time.perf_counter() - t0))
        print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    full = rows[0][1] if rows and rows[0][0] == "full recipe" else None
    lines = [f"\n## {datetime.now():%Y-%m-%d %H:%M} - fernet ablation - commit {commit}\n",
             f"- command: `python benchmarks/fernet_ablation.py --cap {args.cap} --epochs {args.epochs}`",
             f"- {args.cap} training images per class (of the train split), {args.epochs} epochs, "
             f"full validation split ({len(val)} images); test set not read\n",
             "| variant | val acc | val acc, flip TTA | vs full recipe | wall s |", "|---|---|---|---|---|"]
    for name, acc, acc_flip, secs in rows:
        delta = f"{(acc - full) * 100:+.1f} pt" if full is not None else ""
        lines.append(f"| {name} | {acc:.4f} | {acc_flip:.4f} | {delta} | {secs:.0f} |")
    text = "\n".join(lines) + "\n"
    with RESULTS.open("a") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
