"""Ablation of the fifth model's recipe, measured on the validation split only.

Each variant changes `models.fernet` with the same overrides `dvc exp run -S
models.fernet.<key>=...` takes, and trains with the project's own `train_model` on a reduced
budget (a per-class cap of the training split and fewer epochs), so the table fits in minutes
on a CPU. Two sets: `recipe` switches one idea of the recipe off; `robust` adds the
photometric augmentations (the robustness levers) one by one and together; `levers` adds the
champion's candidate levers (EMA, mixup, cutmix) one at a time. `--suite N` also
runs evaluate's corruption suite (params' `evaluate.robustness`) on N validation images, so a
lever is judged on clean validation accuracy *and* its worst drop. Runs go to the MLflow
experiment `fer-ablation` (`--no-mlflow`: none). The test set is never read.

    python benchmarks/fernet_ablation.py --cap 1000 --epochs 8     # appends to results.md
    python benchmarks/fernet_ablation.py --variants robust --suite 1000 --cap 1500 --epochs 8
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
# Levers for the CPU champion (issue 14): each added alone to the recipe as set.
LEVERS: dict[str, dict] = {
    "recipe as set": {},
    "+ EMA 0.999": {f"{M}.ema": 0.999},
    "+ mixup 0.2": {f"{M}.augmentation.mixup": 0.2},
    "+ cutmix 1.0": {f"{M}.augmentation.cutmix": 1.0},
}
# Robustness levers (issue 15): the suite's photometric corruptions as training augmentation.
A = f"{M}.augmentation"
ROBUST: dict[str, dict] = {
    "recipe as set": {},
    "+ noise 16": {f"{A}.noise": 16.0},
    "+ blur": {f"{A}.blur": 1.0},
    "+ brightness 0.4, contrast 0.5": {f"{A}.brightness": 0.4, f"{A}.contrast": 0.5},
    "+ all photometric": {f"{A}.noise": 16.0, f"{A}.blur": 1.0, f"{A}.brightness": 0.4,
                          f"{A}.contrast": 0.5},
}
SETS = {"recipe": VARIANTS, "robust": ROBUST, "levers": LEVERS}



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cap", type=int, default=1000,
                    help="training images per class (0: the whole train split)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--variants", dest="variant_set", choices=sorted(SETS), default="recipe",
                    help="which variants: recipe ideas off, or robustness levers on")
    ap.add_argument("--suite", type=int, default=0, metavar="N",
                    help="also the corruption suite on N validation images (0: off)")
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
    variants = {name: P.load(args.params, {**base, **ov})
                for name, ov in SETS[args.variant_set].items()
                if not args.only or name in args.only}   # every variant checked before training
    tmp = Path(tempfile.mkdtemp(prefix="fer-ablation-"))
    print(f"workspace (models kept): {tmp}", flush=True)
    train = common.capped(load_split(split_path(args.processed, "train")), args.cap or None)
    save_split(split_path(tmp, "train"), train)
    n_train = len(train)
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
        suite = suite_metrics(model, val, p.evaluate, args.suite)
        rows.append((name, res.metrics["val_accuracy"], float((flip == val.y).mean()),
                     time.perf_counter() - t0, suite))
        print(rows[-1], flush=True)
    first = rows[0][1] if rows else None
    rp = next(iter(variants.values())).evaluate.robustness
    cap = f"{args.cap} training images per class (of the train split)" if args.cap else \
        "the whole train split"
    lines = [f"- set `{args.variant_set}`: {cap} ({n_train} images), {args.epochs} epochs, "
             f"full validation split ({len(val)} images); test set not read; overrides for "
             f"every variant: {' '.join(args.sets) or 'none'}"]
    if args.suite:
        lines.append(f"- corruption suite on {min(args.suite, len(val))} validation images "
                     f"(seed {rp.seed}), no TTA, mean over severities {rp.severities}")
    cols = ["suite clean", "suite mean", "worst drop", *rp.corruptions] if args.suite else []
    lines += ["", ("| variant | val acc | val acc, flip TTA | vs first row | wall s | "
                   + "".join(f"{c} | " for c in cols)).rstrip(),
              "|---|---|---|---|---|" + "---|" * len(cols)]
    for name, acc, acc_flip, secs, suite in rows:
        cells = ([f"{suite['robust_clean_accuracy']:.4f}", f"{suite['robust_mean_accuracy']:.4f}",
                  f"{suite['robust_worst_drop'] * 100:.1f} pt ({suite['robust_worst_corruption']})",
                  *(f"{suite[f'robust_{c}']:.4f}" for c in rp.corruptions)] if suite else [])
        lines.append(f"| {name} | {acc:.4f} | {acc_flip:.4f} | {(acc - first) * 100:+.1f} pt | "
                     f"{secs:.0f} |" + "".join(f" {c} |" for c in cells))
    title = "fernet ablation" + {"robust": " (robustness levers)",
                                 "levers": " (champion levers)"}.get(args.variant_set, "")
    print(common.append_results(title, "\n".join(lines), results=args.results))


def suite_metrics(model, val, ev: P.EvaluateParams, n: int) -> dict | None:
    """Evaluate's corruption suite (its params, its batch size) on `n` validation images
    (None when n is 0)."""
    if not n:
        return None
    from fer_pipeline.evaluate.metrics import robustness_suite

    rp = ev.robustness
    return robustness_suite(lambda xb: model.predict(xb, batch_size=ev.batch_size, verbose=0),
                            val.x, val.y, rp.corruptions, rp.severities, n, rp.seed).metrics


if __name__ == "__main__":
    main()
