"""Choose `evaluate.tta` on the validation split (never on test).

Scores a trained model on data/processed/val.npz with each test-time augmentation mode and
appends the table to benchmarks/results.md; the best mode is what `evaluate.tta` should say.

    python benchmarks/tta_on_val.py --model fernet
"""

from __future__ import annotations

import argparse
import subprocess
import time
from datetime import datetime
from pathlib import Path

from fer_pipeline.data.arrays import load_split
from fer_pipeline.evaluate.metrics import predict_proba

RESULTS = Path(__file__).with_name("results.md")
MODES = ("none", "flip", "flip_crops")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fernet")
    ap.add_argument("--models-dir", default="models")
    args = ap.parse_args()

    import keras

    model = keras.saving.load_model(Path(args.models_dir) / args.model / "model.keras")
    val = load_split("data/processed/val.npz")
    rows = []
    for mode in MODES:
        t0 = time.perf_counter()
        pred = predict_proba(model, val.x, tta=mode).probs.argmax(1)
        rows.append((mode, float((pred == val.y).mean()), time.perf_counter() - t0))
        print(rows[-1], flush=True)
    best = max(rows, key=lambda r: r[1])[0]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    lines = [f"\n## {datetime.now():%Y-%m-%d %H:%M} - TTA chosen on validation ({args.model}) "
             f"- commit {commit}\n",
             f"- command: `python benchmarks/tta_on_val.py --model {args.model}`; "
             f"{len(val)} validation images; test set not read\n",
             "| `evaluate.tta` | val acc | seconds |", "|---|---|---|"]
    lines += [f"| {m}{' (best)' if m == best else ''} | {a:.4f} | {s:.1f} |" for m, a, s in rows]
    text = "\n".join(lines) + "\n"
    with RESULTS.open("a") as fh:
        fh.write(text)
    print(text)
    print(f"best on validation: evaluate.tta={best}")


if __name__ == "__main__":
    main()
