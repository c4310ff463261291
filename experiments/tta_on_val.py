"""Choose `evaluate.tta` on the validation split (never on test).

Scores a trained model on data/processed/val.npz with each test-time augmentation mode and
appends the table to experiments/journal.md; the best mode is what `evaluate.tta` should say.

    PYTHONPATH=benchmarks python experiments/tta_on_val.py --model fernet
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common

from fer_pipeline.arrays import PROCESSED_DIR, load_split, split_path
from fer_pipeline.evaluate.metrics import predict_proba
from fer_pipeline.params import TTA_MODES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fernet")
    ap.add_argument("--models-dir", default="models")
    ap.add_argument("--processed", type=Path, default=PROCESSED_DIR)
    ap.add_argument("--results", type=Path, default=common.RESULTS, help="file to append to")
    args = ap.parse_args()

    import keras

    model = keras.saving.load_model(Path(args.models_dir) / args.model / "model.keras")
    val = load_split(split_path(args.processed, "val"))
    rows = []
    for mode in TTA_MODES:
        t0 = time.perf_counter()
        pred = predict_proba(model, val.x, tta=mode).probs.argmax(1)
        rows.append((mode, float((pred == val.y).mean()), time.perf_counter() - t0))
        print(rows[-1], flush=True)
    best = max(rows, key=lambda r: r[1])[0]
    lines = [f"- {len(val)} validation images; test set not read\n",
             "| `evaluate.tta` | val acc | seconds |", "|---|---|---|"]
    lines += [f"| {m}{' (best)' if m == best else ''} | {a:.4f} | {s:.1f} |" for m, a, s in rows]
    print(common.append_results(f"TTA chosen on validation ({args.model})", "\n".join(lines),
                                results=args.results))
    print(f"best on validation: evaluate.tta={best}")


if __name__ == "__main__":
    main()
