"""Ablation of the fifth model's recipe, measured on the validation split only.

Each variant changes `models.fernet` with the same overrides `dvc exp run -S
models.fernet.<key>=...` takes, and trains with the project's own `train_model` on a reduced
budget (a per-class cap of the training split and fewer epochs), so the table fits in minutes
on a CPU. Two sets: `recipe` switches one idea of the recipe off; `robust` adds the
photometric augmentations (the robustness levers) one by one and together; `levers` adds the
champion's candidate levers (EMA, mixup, cutmix, a two-member ensemble) one at a time. `--suite N` also
runs evaluate's corruption suite (params' `evaluate.robustness`) on N validation images, so a
lever is judged on clean validation accuracy *and* its worst drop. Runs go to the MLflow
experiment `fer-ablation` (`--no-mlflow`: none). The test set is never read.

Run from the project root with benchmarks/ on the path (for `common`); the table is appended to
experiments/journal.md (`--results` elsewhere):

    export PYTHONPATH=benchmarks
    python experiments/fernet_ablation.py --cap 1000 --epochs 8
    python experiments/fernet_ablation.py --variants robust --suite 1000 --cap 1500 --epochs 8
    python experiments/fernet_ablation.py --variants levers --cap 0 --epochs 24 --only '+ EMA 0.999' \
        --score release/model.keras --suite 2000 -S models.fernet.width=0.5   # full budget
    python experiments/fernet_ablation.py --variants robust --only --score a.keras b.keras --suite 2000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import datetime
from pathlib import Path

import common
import numpy as np

from fer_pipeline import params as P
from fer_pipeline.arrays import PROCESSED_DIR, SplitArrays, load_split, save_split, split_path
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
# Levers that might raise the CPU champion's clean accuracy, each added alone to the recipe as
# set. The refit row changes the data, not a param: it trains on train + one half of val
# (stratified, seeded) for the same epochs and is scored on the other half, which every row is
# also scored on.
REFIT = "+ refit on train + val half A"
LEVERS: dict[str, dict] = {
    "recipe as set": {},
    "+ EMA 0.999": {f"{M}.ema": 0.999},
    "+ mixup 0.2": {f"{M}.augmentation.mixup": 0.2},
    "+ cutmix 1.0": {f"{M}.augmentation.cutmix": 1.0},
    REFIT: {},
    # a small ensemble at about the champion's training cost: two members at width 0.75 are
    # 1.125x the FLOPs of one at 1.0, so the full-recipe row trains 40 epochs instead of 45
    "2 members x width 0.75": {f"{M}.members": 2, f"{M}.width": 0.75},
}
# Robustness levers, to shrink the corruption suite's worst drop without losing clean accuracy:
# the suite's photometric corruptions as training augmentation, and per-image standardization,
# which makes dark/bright/contrast (affine maps of the pixels) invisible to the network by
# construction.
A = f"{M}.augmentation"
STD = {f"{M}.preprocessing": "standardize"}
ROBUST: dict[str, dict] = {
    "recipe as set": {},
    # params.yaml's defaults since 2026-11-30 are standardize + noise 16: the rows below that
    # add them were measured against this earlier recipe (experiments/journal.md, 2026-11-29)
    "- standardize, noise (x/255, no noise: the recipe before 2026-11-30)":
        {f"{M}.preprocessing": "rescale", f"{A}.noise": 0.0},
    "+ noise 16": {f"{A}.noise": 16.0},
    "+ blur": {f"{A}.blur": 1.0},
    "+ brightness 0.4, contrast 0.5": {f"{A}.brightness": 0.4, f"{A}.contrast": 0.5},
    "+ all photometric": {f"{A}.noise": 16.0, f"{A}.blur": 1.0, f"{A}.brightness": 0.4,
                          f"{A}.contrast": 0.5},
    "+ standardize": STD,
    "+ standardize, noise 16": {**STD, f"{A}.noise": 16.0},
    "+ standardize, noise 16, blur 1.0, rotation 20": {**STD, f"{A}.noise": 16.0,
                                                       f"{A}.blur": 1.0, f"{A}.rotation": 20},
    # the last row's two geometric/blur levers apart: which one cost its clean accuracy
    "+ standardize, noise 16, rotation 30": {**STD, f"{A}.noise": 16.0, f"{A}.rotation": 30},
    "+ standardize, noise 16, blur 0.5": {**STD, f"{A}.noise": 16.0, f"{A}.blur": 0.5},
    # on params.yaml's recipe since 2026-11-30 (standardize + noise 16): rotation and blur
    # together (the full-recipe row: journal.md 2026-12-04), and the same with the head's
    # dropout off, to give back the capacity the stronger augmentation takes
    "+ rotation 20, blur 0.5": {f"{A}.rotation": 20, f"{A}.blur": 0.5},
    "+ rotation 20, blur 0.5, dropout 0": {f"{A}.rotation": 20, f"{A}.blur": 0.5,
                                          f"{M}.dropout": 0.0},
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
    ap.add_argument("--only", nargs="*",
                    help="variant names to run (absent: every variant of the set; `--only` with "
                         "no name: none, only the --score models)")
    ap.add_argument("--score", nargs="*", type=Path, default=[], metavar="MODEL",
                    help="also score saved .keras models (e.g. an earlier full-budget run) as "
                         "the first rows, on the same images, without training")
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
                if args.only is None or name in args.only}   # every variant checked before training
    tmp = Path(tempfile.mkdtemp(prefix="fer-ablation-"))
    print(f"workspace (models kept): {tmp}", flush=True)
    train = common.capped(load_split(split_path(args.processed, "train")), args.cap or None)
    save_split(split_path(tmp, "train"), train)
    val = load_split(split_path(args.processed, "val"))
    save_split(split_path(tmp, "val"), val)
    half_a, half_b = val_halves(val)
    os.environ.setdefault("FER_PIPELINE_RUN_ID", f"ablation-{datetime.now():%Y%m%d-%H%M}")
    ev = next(iter(variants.values())).evaluate if variants else P.load(args.params).evaluate
    rp = ev.robustness

    def score(name: str, model, secs: tuple[float, float] | None, kept: str,
              refit: bool = False) -> None:
        """One table row: full val (not for a refit model: half A was trained on), flip TTA,
        half B (every row), the suite on val (not for a refit model)."""
        probs = predict_proba(model, val.x, tta="none").probs.argmax(1)
        flip = predict_proba(model, val.x, tta="flip").probs.argmax(1)
        rows.append({"name": name, "val": None if refit else float((probs == val.y).mean()),
                     "flip": None if refit else float((flip == val.y).mean()),
                     "half_b": float((probs[half_b] == val.y[half_b]).mean()),
                     "flip_b": float((flip[half_b] == val.y[half_b]).mean()),
                     "secs": secs, "kept": kept,   # (wall, CPU) seconds of training
                     "suite": None if refit else suite_metrics(model, val, ev, args.suite)})
        print(rows[-1], flush=True)

    import keras

    rows: list[dict] = []
    for path in args.score:
        score(f"saved model `{path.name}` ({path.parent.name})",
              keras.saving.load_model(path, compile=False), None, "-")
    for name, p in variants.items():
        t0, c0 = time.perf_counter(), time.process_time()
        data = tmp
        if name == REFIT:
            data = tmp / "refit"
            save_split(split_path(data, "train"), concat(train, common.subset(val, half_a)))
            save_split(split_path(data, "val"), common.subset(val, half_b))
        mlflow = None if args.no_mlflow else p.mlflow.model_copy(update={"experiment": "fer-ablation"})
        res = train_model("fernet_ablation", p.model("fernet"), p.train, mlflow, processed_dir=data,
                          models_dir=data / "models", reports_dir=data / "reports",
                          state_dir=data / "state")
        kept = f"{res.metrics['best_epoch']}/{res.metrics['epochs_run']}"
        secs = (time.perf_counter() - t0, time.process_time() - c0)
        score(name, keras.saving.load_model(res.model_path), secs, kept, refit=name == REFIT)

    base_row = next((r for r in rows if r["val"] is not None), None)
    cap = f"{args.cap} training images per class (of the train split)" if args.cap else \
        "the whole train split"
    trained = (f"set `{args.variant_set}`: {cap} ({len(train)} images), {args.epochs} epochs, "
               f"overrides for every variant: {' '.join(args.sets) or 'none'}") if variants \
        else "no training: saved models scored"
    lines = [f"- {trained}; full validation split ({len(val)} images); test set not read",
             f"- val half B: {len(half_b)} of the validation images (stratified, seed 0); the "
             f"refit row trains on train + the other {len(half_a)} and is scored on B only; "
             "kept = the epoch the stage kept (by val accuracy) / epochs run; wall s and CPU s: "
             "training's wall-clock and process CPU seconds (a VM's wall clock need not follow "
             "the work: compare variants by CPU seconds)"]
    if args.suite:
        lines.append(f"- corruption suite on {min(args.suite, len(val))} validation images "
                     f"(seed {rp.seed}), no TTA, mean over severities {rp.severities}")
    cols = ["suite clean", "suite mean", "worst drop", *rp.corruptions] if args.suite else []
    lines += ["", ("| variant | val acc | val acc, flip TTA | vs first row | val half B | "
                   "half B, flip | kept | wall s | CPU s | " + "".join(f"{c} | " for c in cols)
                   ).rstrip(),
              "|---|---|---|---|---|---|---|---|---|" + "---|" * len(cols)]
    for r in rows:
        suite = r["suite"]
        cells = ([f"{suite['robust_clean_accuracy']:.4f}", f"{suite['robust_mean_accuracy']:.4f}",
                  f"{suite['robust_worst_drop'] * 100:.1f} pt ({suite['robust_worst_corruption']})",
                  *(f"{suite[f'robust_{c}']:.4f}" for c in rp.corruptions)] if suite else
                 ["-"] * len(cols))
        vs = (f"{(r['val'] - base_row['val']) * 100:+.1f} pt" if r["val"] is not None else
              f"{(r['half_b'] - base_row['half_b']) * 100:+.1f} pt (B)") if base_row else "-"
        lines.append(f"| {r['name']} | {fmt(r['val'])} | {fmt(r['flip'])} | {vs} | "
                     f"{r['half_b']:.4f} | {r['flip_b']:.4f} | {r['kept']} | "
                     + ("- | - |" if r["secs"] is None else
                        f"{r['secs'][0]:.0f} | {r['secs'][1]:.0f} |")
                     + "".join(f" {c} |" for c in cells))
    title = "fernet ablation" + {"robust": " (robustness levers)",
                                 "levers": " (champion levers)"}.get(args.variant_set, "")
    print(common.append_results(title, "\n".join(lines), results=args.results))


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def val_halves(val: SplitArrays, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two stratified halves of the validation split (index arrays, seeded)."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for c in np.unique(val.y):
        idx = rng.permutation(np.flatnonzero(val.y == c))
        a.append(idx[: len(idx) // 2])
        b.append(idx[len(idx) // 2:])
    return np.sort(np.concatenate(a)), np.sort(np.concatenate(b))


def concat(a: SplitArrays, b: SplitArrays) -> SplitArrays:
    return SplitArrays(np.concatenate([a.x, b.x]), np.concatenate([a.y, b.y]),
                       np.concatenate([a.ids, b.ids]), np.concatenate([a.origin, b.origin]),
                       a.classes)


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
