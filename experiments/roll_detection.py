"""Faces rolled in the photo: what `fer predict` finds and gets right, with and without the roll search.

The Haar cascade of `fer predict` is trained on upright faces. Each validation face (48x48) is
upscaled 3x onto a 288x288 canvas (edges repeated), the canvas turned by 0/10/20/30 degrees
(random sign per image, seeded), and the canvas goes through the product's own path
(`prepare` + `classify_prepared`, the release bundle with its test-time augmentation and
temperature): once with `predict.roll_angles: []` (the upright pass only) and once with the
params' angles. A face counts as found when a box lies on the canvas centre at face size; the
end-to-end accuracy counts a missed face as wrong. Validation images only (the test split is
evaluate's).

    PYTHONPATH=benchmarks python experiments/roll_detection.py --n 1000   # appends to experiments/journal.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common
import numpy as np

from fer_pipeline import params as P
from fer_pipeline.arrays import PROCESSED_DIR, load_split, split_path
from fer_pipeline.predict import classify_prepared, load_release, prepare

SCALE, PAD = 3, 72


def canvas(face: np.ndarray, degrees: float) -> np.ndarray:
    import cv2

    big = cv2.resize(face.reshape(48, 48).astype(np.uint8), (48 * SCALE, 48 * SCALE),
                     interpolation=cv2.INTER_CUBIC)
    img = cv2.copyMakeBorder(big, PAD, PAD, PAD, PAD, cv2.BORDER_REPLICATE)
    h, w = img.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def centre_face(result, side: int):
    """The face (an artifacts.answers.FaceAnswer) whose box is on the canvas centre at about the
    face's size, if any."""
    for f in result.faces or []:
        b = f.box
        if (abs(b.x + b.w / 2 - side / 2) < 40 and abs(b.y + b.h / 2 - side / 2) < 40
                and 70 < b.w < 320):
            return f
    return None


def run(args) -> str:
    import cv2

    cv2.setNumThreads(1)
    params = P.load(args.params)
    angles = params.predict.roll_angles
    val = load_split(split_path(args.processed, "val"))
    rng = np.random.default_rng(args.seed)
    idx = rng.permutation(len(val.x))[:args.n]
    x, y = val.x[idx], val.y[idx]
    signs = rng.choice((-1.0, 1.0), len(idx))
    clf = load_release(args.release)
    classes = clf.classes
    # the classifier alone on the 48x48 crops: the ceiling of the end-to-end figure
    probs = clf.predict(x.astype(np.float32))
    ceiling = float((probs.argmax(1) == y).mean())
    rows = []
    for deg in args.degrees:
        row = {"deg": deg}
        for mode, roll in (("upright", []), ("roll", angles)):
            t0 = time.perf_counter()
            found = right = 0
            rolls = []
            for start in range(0, len(idx), 32):
                chunk = [prepare(f"v{i}", lambda i=i, d=deg: canvas(x[i], d * signs[i]), True, roll)
                         for i in range(start, min(start + 32, len(idx)))]
                for k, res in enumerate(classify_prepared(clf, chunk)):
                    face = centre_face(res, 48 * SCALE + 2 * PAD)
                    if face is None:
                        continue
                    found += 1
                    right += face.emotion == classes[int(y[start + k])]
                    if face.roll:   # found by the roll search: how upright is its crop
                        rolls.append(abs(face.roll - deg * signs[start + k]))
            row[mode] = {"found": found / len(idx), "acc_found": right / max(found, 1),
                         "by_search": len(rolls) / len(idx),
                         "end_to_end": right / len(idx),
                         "roll_err": float(np.median(rolls)) if rolls else float("nan"),
                         "ms": 1000 * (time.perf_counter() - t0) / len(idx)}
            print(deg, mode, {k: round(v, 4) for k, v in row[mode].items()}, flush=True)
        rows.append(row)
    lines = [
        f"- machine: {common.machine()}; the release bundle ({clf.source}, tta {clf.tta}, "
        f"temperature {clf.temperature:g}); {len(idx)} validation images (seed {args.seed}); "
        f"roll angles searched: {angles}",
        f"- the classifier alone on the same 48x48 crops (no detection): accuracy {ceiling:.4f}",
        "",
        "| face rolled by (deg) | found, upright pass | found, + roll search (of which by the "
        "search) | accuracy on found, upright / + roll | end-to-end accuracy, upright / + roll | "
        "tilt left in the search's crops (median, deg) | ms per image, upright / + roll |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        u, s = r["upright"], r["roll"]
        lines.append(f"| {r['deg']:g} | {u['found']:.3f} | {s['found']:.3f} ({s['by_search']:.3f}) "
                     f"| {u['acc_found']:.4f} "
                     f"/ {s['acc_found']:.4f} | {u['end_to_end']:.4f} / **{s['end_to_end']:.4f}** | "
                     f"{s['roll_err']:.1f} | {u['ms']:.0f} / {s['ms']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="validation images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--degrees", type=float, nargs="+", default=[0, 10, 20, 30])
    ap.add_argument("--release", type=Path, default=common.ROOT / "release")
    ap.add_argument("--processed", type=Path, default=common.ROOT / PROCESSED_DIR)
    ap.add_argument("--params", type=Path, default=common.ROOT / "params.yaml")
    ap.add_argument("--results", type=Path, default=common.RESULTS, help="file to append to")
    args = ap.parse_args()
    body = run(args)
    print(common.append_results("faces rolled in the photo: `fer predict` with and without the "
                                "roll search", body, results=args.results))


if __name__ == "__main__":
    main()
