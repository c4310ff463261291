"""Probe the study's custom CNN: which open choices let it learn in 10 epochs as the study's did.

Trains `models.custom_cnn` (params.yaml, no profile) with `-S` overrides through the project's
own `train_model`, on the split arrays capped per class (train and val both from the pipeline's
split: val is never the test folder), and prints one row: the overrides, images, validation
accuracy per epoch, the best, trainable params, seconds per epoch, precision. No MLflow.

    python experiments/custom_cnn_probe.py --cap 600 --epochs 6 -S models.custom_cnn.dense_bn=true
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402

from fer_pipeline import params as P  # noqa: E402
from fer_pipeline.arrays import PROCESSED_DIR, load_split, save_split, split_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="custom_cnn")
    ap.add_argument("--cap", type=int, default=0, help="train images per class (0: all); val "
                    "gets a quarter of it")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("-S", "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--processed", type=Path, default=ROOT / PROCESSED_DIR)
    ap.add_argument("--out", type=Path, help="append the row as JSON to this file")
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from fer_pipeline.train.precision import resolve_policy
    from fer_pipeline.train.stage import train_model

    overrides = {f"models.{args.model}.epochs": args.epochs, **P.parse_overrides(args.sets)}
    p = P.load(ROOT / "params.yaml", overrides)
    mp = p.model(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="fer-cnn-probe-"))
    train = load_split(split_path(args.processed, "train"))
    val = load_split(split_path(args.processed, "val"))
    if args.cap:
        train = common.capped(train, args.cap)
        val = common.capped(val, max(1, args.cap // 4), seed=1)
    save_split(split_path(tmp, "train"), train)
    save_split(split_path(tmp, "val"), val)
    t0, c0 = time.perf_counter(), time.process_time()
    res = train_model(args.model, mp, p.train, None, processed_dir=tmp, models_dir=tmp / "models",
                      reports_dir=tmp / "reports", state_dir=tmp / "state")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = list(csv.DictReader(res.history_path.open()))
    m = res.metrics
    row = {"overrides": args.sets, "cap": args.cap, "train": len(train), "val": len(val),
           "epochs": m["epochs_run"], "val_acc": round(m["val_accuracy"], 4),
           "val_curve": [round(float(r["val_accuracy"]), 4) for r in rows],
           "train_curve": [round(float(r["accuracy"]), 4) for r in rows],
           "params": m["trainable_params"], "s_per_epoch": round(m["seconds_per_epoch"], 1),
           "wall_s": round(wall), "cpu_s": round(cpu),
           "machine": common.machine(policy=resolve_policy(p.train.precision))}
    print(json.dumps(row), flush=True)
    if args.out:
        with args.out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
