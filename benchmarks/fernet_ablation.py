"""Ablation of the fifth model's recipe, measured on the validation split only.

Each variant switches one idea of `models.fernet` off with the same overrides `dvc exp run -S
models.fernet.<key>=...` takes, and trains with the project's own `train_model` on a reduced
budget (a per-class cap of the training split and fewer epochs), so the table fits in minutes
on a CPU. Runs go to the MLflow experiment `fer-ablation` (`--no-mlflow`: none). The test set
is never read.

    python benchmarks/fernet_ablation.py --cap 1000 --epochs 8     # appends to results.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from datetime import datetime
from pathlib import Path

import common

from fer_pipeline import params as P
from fer_pipeline.arrays import PROCESSED_DIR, load_split, save_split, split_path
from fer_pipeline.evaluate.metrics import predict_proba

M = "models.fernet"
VARIANTS: dict[str, dict] = {
    "full recipe": {},
    "- label smoothing": {f"{M}.label_smoothing": 0.0},
    "- random erasing": {f"{M}.augmentation.random_erasing": 0.0},
    "- all augmentation": {f"{M}.augmentation": {}},
    "- AdamW + cosine (Adam + ReduceLROnPlateau, the study)": {
        f"{M}.optimizer": "adam", f"{M}.lr_schedule": "plateau", f"{M}.learning_rate": 1e-3,
        f"{M}.weight_decay": 0.0},
}



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cap", type=int, default=1000, help="training images per class")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--only", nargs="*", help="variant names to run")
    ap.add_argument("--params", type=Path, default=common.ROOT / "params.yaml")
    ap.add_argument("-S", "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for every variant (e.g. models.fernet.width=0.25)")
    ap.add_argument("--processed", type=Path, default=PROCESSED_DIR)
    ap.add_argument("--no-mlflow", action="store_true", help="train without MLflow tracking")
    ap.add_argument("--results", type=Path, default=common.RESULTS, help="file to append to")
    args = ap.parse_args()

    from fer_pipeline.train.stage import train_model

    base = {f"{M}.epochs": args.epochs, f"{M}.warmup_epochs": min(1, args.epochs - 1),
            **P.parse_overrides(args.sets)}
    variants = {name: P.load(args.params, {**base, **ov}) for name, ov in VARIANTS.items()
                if not args.only or name in args.only}   # every variant checked before training
    tmp = Path(tempfile.mkdtemp(prefix="fer-ablation-"))
    save_split(split_path(tmp, "train"),
               common.capped(load_split(split_path(args.processed, "train")), args.cap))
    val = load_split(split_path(args.processed, "val"))
    save_split(split_path(tmp, "val"), val)
    os.environ.setdefault("FER_PIPELINE_RUN_ID", f"ablation-{datetime.now():%Y%m%d-%H%M}")
    rows = []
    for name, p in variants.items():
        t0 = time.perf_counter()
        mlflow = None if args.no_mlflow else dataclasses.replace(p.mlflow, experiment="fer-ablation")
        res = train_model("fernet_ablation", p.model("fernet"), p.train, mlflow, processed_dir=tmp,
                          models_dir=tmp / "models", reports_dir=tmp / "reports",
                          state_dir=tmp / "state")
        import keras

        model = keras.saving.load_model(res.model_path)
        flip = predict_proba(model, val.x, tta="flip").probs.argmax(1)
        rows.append((name, res.metrics["val_accuracy"], float((flip == val.y).mean()),
                     time.perf_counter() - t0))
        print(rows[-1], flush=True)
    full = rows[0][1] if rows and rows[0][0] == "full recipe" else None
    lines = [f"- {args.cap} training images per class (of the train split), {args.epochs} epochs, "
             f"full validation split ({len(val)} images); test set not read\n",
             "| variant | val acc | val acc, flip TTA | vs full recipe | wall s |",
             "|---|---|---|---|---|"]
    for name, acc, acc_flip, secs in rows:
        delta = f"{(acc - full) * 100:+.1f} pt" if full is not None else ""
        lines.append(f"| {name} | {acc:.4f} | {acc_flip:.4f} | {delta} | {secs:.0f} |")
    print(common.append_results("fernet ablation", "\n".join(lines), results=args.results))


if __name__ == "__main__":
    main()
