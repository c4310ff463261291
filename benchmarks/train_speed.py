"""Training-speed benchmark (run by hand, never as a timed test).

1. Custom CNN (params.yaml's `models.custom_cnn`, the study's 17.0M-param model, batch 64):
   images/s of a plain Keras baseline that decodes the JPEG folders every epoch
   (`keras.utils.image_dataset_from_directory`, float32; the thing compared against, so not
   the package) vs. the project's `train_model` (in-memory uint8 arrays) with
   `train.precision: float32` and with `auto`, to separate the gains. Each `train_model` call
   trains 2 epochs of --steps steps on a subset of the train split (validation: one batch);
   epoch 1 traces the graph, epoch 2's seconds (the stage's history) are the measurement.
2. Frozen VGG16 base (weights null is equivalent for speed) at the quick-profile input size:
   seconds per epoch with `cache_features: false` (the base runs every epoch, what
   augmentation-on costs) vs. `true` (the head trains on cached features), both through
   `train_model`, plus the time outside fit (build, the one-time extraction, final metrics).

Usage: python benchmarks/train_speed.py [--steps 25] [--jpeg-dir data/raw/fer2013/train]
Appends a section to experiments/journal.md (--results elsewhere).
"""

from __future__ import annotations

import argparse
import csv
import gc
import tempfile
import time
from pathlib import Path

import common
import keras
import numpy as np

from fer_pipeline import params as P
from fer_pipeline.arrays import PROCESSED_DIR, SplitArrays, load_split, save_split, split_path
from fer_pipeline.train.precision import resolve_policy
from fer_pipeline.train.stage import TrainResult, train_model


def subset(a: SplitArrays, n: int) -> SplitArrays:
    return SplitArrays(a.x[:n], a.y[:n], a.ids[:n], a.origin[:n], a.classes)


def processed_subset(train: SplitArrays, n_train: int, n_val: int) -> Path:
    d = Path(tempfile.mkdtemp(prefix="fer-speed-"))
    save_split(split_path(d, "train"), subset(train, n_train))
    save_split(split_path(d, "val"), subset(train, n_val))   # timing only: accuracy unused
    return d


def run(p: P.Params, name: str, processed: Path) -> tuple[TrainResult, list[float], float]:
    """train_model without MLflow; (result, per-epoch seconds, wall seconds of the call)."""
    t0 = time.perf_counter()
    res = train_model(name, p.model(name), p.train, None, processed_dir=processed,
                      models_dir=processed / "models", reports_dir=processed / "reports",
                      state_dir=processed / "state")
    wall = time.perf_counter() - t0
    with res.history_path.open() as fh:
        secs = [float(r["seconds"]) for r in csv.DictReader(fh)]
    return res, secs, wall


class EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = time.perf_counter() - self.t0


def synthetic_jpeg_dir(root: Path, n: int = 3500) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(7):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n // 7):
            Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(d / f"{i}.jpg")
    return root


def baseline(mp: P.ModelParams, jpeg_dir: Path):
    """The plain-Keras reference: JPEG folder decoded every epoch, float32, Adam."""
    from fer_pipeline.train.models import build_model

    keras.mixed_precision.set_global_policy("float32")
    ds = keras.utils.image_dataset_from_directory(
        jpeg_dir, labels="inferred", label_mode="int", color_mode="grayscale",
        image_size=(48, 48), batch_size=mp.batch_size, shuffle=True, seed=0,
        verbose=False).repeat()
    keras.utils.set_random_seed(0)
    model = build_model(mp, 7).model
    model.compile(optimizer=keras.optimizers.Adam(mp.learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(ds, epochs=1, steps_per_epoch=5, verbose=0)  # trace + warm up
    return model, ds


def bench_cnn(args, train: SplitArrays) -> dict:
    params = {pol: P.load(args.params, {"models.custom_cnn.epochs": 2, "train.precision": pol,
                                        **args.overrides}) for pol in ("float32", "auto")}
    mp = params["auto"].model("custom_cnn")
    batch = mp.batch_size
    processed = processed_subset(train, args.steps * batch, batch)
    jpeg_dir = Path(args.jpeg_dir)
    if not jpeg_dir.is_dir():
        jpeg_dir = synthetic_jpeg_dir(Path(tempfile.mkdtemp()) / "jpeg")
    base_model, base_ds = baseline(mp, jpeg_dir)
    res: dict = {"batch": batch, "jpeg_dir": str(jpeg_dir),
                 "policy": resolve_policy(params["auto"].train.precision)}
    # Interleaved rounds (rotated order) so that load from other processes on a shared
    # machine hits every config alike; the best round of each config is reported.
    keys = ["baseline_fp32_folder", "ours_fp32_memory", "ours_auto"]
    rounds: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(args.rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            gc.collect()
            time.sleep(1.0)
            if key == "baseline_fp32_folder":
                keras.mixed_precision.set_global_policy("float32")
                timer = EpochTimer()
                base_model.fit(base_ds, epochs=1, steps_per_epoch=args.steps, verbose=0,
                               callbacks=[timer])
                rounds[key].append(args.steps * batch / timer.seconds)
            else:
                p = params["float32" if key == "ours_fp32_memory" else "auto"]
                out, secs, _ = run(p, "custom_cnn", processed)
                rounds[key].append(args.steps * batch / secs[-1])
                res["params"] = out.metrics["trainable_params"]
        print(f"round {r + 1}:", {k: round(v[-1], 1) for k, v in rounds.items()}, flush=True)
    for key, vals in rounds.items():
        res[key] = max(vals)
        res[key + "_all"] = [round(v) for v in vals]
    return res


def bench_cache(args, train: SplitArrays) -> dict:
    def params(cache: bool) -> P.Params:
        return P.load(args.params, {"models.vgg16.weights": None, "models.vgg16.epochs": 3,
                                    "models.vgg16.input_size": args.input_size,
                                    "models.vgg16.augmentation": {},
                                    "models.vgg16.cache_features": cache, **args.overrides})

    recompute_p, cached_p = params(False), params(True)
    processed = processed_subset(train, args.cache_images, recompute_p.model("vgg16").batch_size)
    _, recompute, _ = run(recompute_p, "vgg16", processed)
    res, cached, wall = run(cached_p, "vgg16", processed)
    return {"images": args.cache_images, "input_size": args.input_size,
            "recompute_s": float(np.median(recompute[1:])), "cached_s": float(np.median(cached[1:])),
            "outside_fit_s": wall - res.metrics["train_seconds"],
            "policy": resolve_policy(cached_p.train.precision)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=25, help="timed steps per CNN config and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--jpeg-dir", default=str(common.ROOT / "data/raw/fer2013/train"))
    ap.add_argument("--processed", type=Path, default=common.ROOT / PROCESSED_DIR)
    ap.add_argument("--params", type=Path, default=common.ROOT / "params.yaml")
    ap.add_argument("-S", "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="extra param override for every run (e.g. a smaller width, to smoke-test)")
    ap.add_argument("--input-size", type=int, default=64, help="VGG16 input side (quick profile)")
    ap.add_argument("--cache-images", type=int, default=2048)
    ap.add_argument("--only", choices=["cnn", "cache"], default=None)
    ap.add_argument("--results", type=Path, default=common.RESULTS, help="file to append to")
    args = ap.parse_args()
    args.overrides = P.parse_overrides(args.sets)
    train = load_split(split_path(args.processed, "train"))
    lines = [f"- machine: {common.machine(keras.backend.backend())}; keras {keras.__version__}"]
    if args.only in (None, "cnn"):
        r = bench_cnn(args, train)
        lines += [
            f"- custom CNN ({r['params']:,} params, batch {r['batch']}, best of {args.rounds} "
            f"interleaved rounds of {args.steps} steps; all rounds: "
            f"baseline {r['baseline_fp32_folder_all']}, ours fp32 {r['ours_fp32_memory_all']}, "
            f"ours {r['policy']} {r['ours_auto_all']} img/s):",
            f"  - baseline `image_dataset_from_directory` ({r['jpeg_dir']}), float32: "
            f"**{r['baseline_fp32_folder']:.0f} img/s**",
            f"  - `train_model` (in-memory arrays), float32: {r['ours_fp32_memory']:.0f} img/s "
            f"({r['ours_fp32_memory'] / r['baseline_fp32_folder']:.2f}x)",
            f"  - `train_model`, `precision: auto` = {r['policy']}: **{r['ours_auto']:.0f} img/s** "
            f"= **{r['ours_auto'] / r['baseline_fp32_folder']:.2f}x** the baseline "
            f"(same path, vs fp32: {r['ours_auto'] / r['ours_fp32_memory']:.2f}x)",
        ]
    if args.only in (None, "cache"):
        c = bench_cache(args, train)
        lines += [
            f"- frozen VGG16 base ({c['input_size']}x{c['input_size']}, {c['images']} images, "
            f"{c['policy']}), seconds per epoch (`train_model`, median of epochs 2-3):",
            f"  - `cache_features: false`, base recomputed every epoch (= cost with augmentation "
            f"on): {c['recompute_s']:.2f} s",
            f"  - head on cached features: {c['cached_s']:.3f} s -> "
            f"**{c['recompute_s'] / c['cached_s']:.0f}x** faster per epoch; outside fit (build, "
            f"one-time extraction, final metrics) {c['outside_fit_s']:.2f} s",
        ]
    print(common.append_results("training speed", "\n".join(lines), results=args.results))


if __name__ == "__main__":
    main()
