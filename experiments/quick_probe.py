"""Probe one model of the quick profile: validation accuracy per epoch, wall and CPU time.

Trains `models.<NAME>` with profiles/quick.yaml (and extra `-S` overrides) through the
project's own `train_model`, on the split arrays capped per class the way the quick profile's
`data.max_per_class` caps the raw folders (train and val both from the train folder, 80/20), so
a trade-off of the profile (epochs, width, learning rate, what the transfer models train) is
measured in minutes without running the pipeline. No MLflow; the test split is never read.
CPU seconds sit beside wall seconds because a virtual machine's wall clock need not follow the
work (experiments/journal.md, 2026-12-07 03:52): compare variants by CPU seconds there.
`--append` also appends the row to experiments/journal.md.

    PYTHONPATH=benchmarks python experiments/quick_probe.py --model custom_cnn \
        -S models.custom_cnn.width=0.5
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import common

from fer_pipeline import params as P
from fer_pipeline.arrays import PROCESSED_DIR, load_split, save_split, split_path
from fer_pipeline.profiles import load_profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--cap", type=int, default=1500, help="images per class of the train folder "
                    "(the profile's data.max_per_class); 80%% train, 20%% val")
    ap.add_argument("-S", "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--processed", type=Path, default=PROCESSED_DIR)
    ap.add_argument("--label", default="", help="row label (default: the overrides)")
    ap.add_argument("--append", action="store_true", help="also append the row to experiments/journal.md")
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from fer_pipeline.train.stage import train_model

    overrides = {**load_profile(args.profile, common.ROOT / "profiles"),
                 **P.parse_overrides(args.sets)}
    p = P.load(common.ROOT / "params.yaml", overrides)
    mp = p.model(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="fer-quick-probe-"))
    train_cap, val_cap = round(args.cap * 0.8), round(args.cap * 0.2)
    train = common.capped(load_split(split_path(args.processed, "train")), train_cap)
    val = common.capped(load_split(split_path(args.processed, "val")), val_cap, seed=1)
    save_split(split_path(tmp, "train"), train)
    save_split(split_path(tmp, "val"), val)
    t0, c0 = time.perf_counter(), time.process_time()
    res = train_model(args.model, mp, p.train, None, processed_dir=tmp, models_dir=tmp / "models",
                      reports_dir=tmp / "reports", state_dir=tmp / "state")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = list(csv.DictReader(res.history_path.open()))
    curve = " ".join(f"{float(r['val_accuracy']):.3f}" for r in rows)
    m = res.metrics
    label = args.label or (" ".join(args.sets) or "profile as is")
    line = (f"| {args.model} | {label} | {len(train)}/{len(val)} | {m['epochs_run']} | "
            f"{m['val_accuracy']:.4f} | {curve} | {m['trainable_params']:,} | "
            f"{m['seconds_per_epoch']:.0f} | {cpu_per_epoch(m)} | {wall:.0f} | {cpu:.0f} |")
    print(line, flush=True)
    if args.append:
        header = ("| model | overrides (on profiles/quick.yaml) | train/val images | epochs | "
                  "val acc (best epoch) | val acc per epoch | trainable params | s/epoch | "
                  "CPU s/epoch | wall s | CPU s |"
                  "\n|---|---|---|---|---|---|---|---|---|---|---|")
        from fer_pipeline.train.precision import resolve_policy

        body = (f"- machine: {common.machine(policy=resolve_policy(p.train.precision))}\n\n"
                f"{header}\n{line}")
        print(common.append_results(f"quick-profile probe: {args.model}", body))


def cpu_per_epoch(m: dict) -> str:
    """The stage's mean CPU seconds per epoch ('-' where an older stage did not record it)."""
    v = m.get("cpu_seconds_per_epoch")
    return "-" if v is None else f"{v:.0f}"


if __name__ == "__main__":
    main()
