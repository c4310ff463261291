"""Train variants of the fifth model on a lent GPU machine, with the JAX backend.

That machine has JAX but no TensorFlow, MLflow or DVC, and takes at most 64 MiB of files, so
this script packs the split arrays small (`pack`, run here) and trains with the project's own
pieces (`build_model`, the optimizer/schedule and loss of `train.stage`, `train.data`,
`evaluate.metrics.predict_proba`) without the MLflow/DVC edges of `train_model`. Several
variants run at once as separate processes on the one GPU (each is far too small to fill it).
Selection uses the validation split only; the test split is read only with `--test`, for the
recipe whose accuracy is reported (the GPU profile), never to choose between variants.

    python benchmarks/fernet_gpu.py pack --out .gpu                     # here
    KERAS_BACKEND=jax python benchmarks/fernet_gpu.py train --data .gpu --name full \\
        [--profile fernet-gpu] [-S models.fernet.epochs=45 ...] [--test] \\
        --log results.jsonl                                             # there
    python benchmarks/fernet_gpu.py table results.jsonl                 # here: markdown

Every epoch appends one JSON line to --log (so a run cut off at its time limit still
reports), and the end of a run appends a `final` line.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SPLITS = ("train", "val", "test")
XZ_FILTERS = [{"id": lzma.FILTER_DELTA, "dist": 1}, {"id": lzma.FILTER_LZMA2, "preset": 6}]


def pack(processed: Path, out: Path) -> None:
    """uint8 images as delta+xz (76% of raw; zlib npz barely compresses faces), the rest npz."""
    from fer_pipeline.data.arrays import load_split, split_path

    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        a = load_split(split_path(processed, split))
        (out / f"{split}.x.xz").write_bytes(
            lzma.compress(np.ascontiguousarray(a.x).tobytes(), format=lzma.FORMAT_XZ,
                          filters=XZ_FILTERS))
        np.savez(out / f"{split}.meta.npz", shape=np.asarray(a.x.shape), y=a.y,
                 origin=a.origin, classes=np.asarray(a.classes), **a.flags)
        print(f"{split}: {len(a)} images -> {(out / f'{split}.x.xz').stat().st_size / 1e6:.1f} MB")


def unpack(data: Path, split: str):
    from fer_pipeline.data.arrays import SplitArrays

    with np.load(data / f"{split}.meta.npz") as m:
        shape = tuple(int(s) for s in m["shape"])
        x = np.frombuffer(lzma.decompress((data / f"{split}.x.xz").read_bytes()),
                          dtype=np.uint8).reshape(shape)
        flags = {k: m[k] for k in m.files if k.startswith("flag_")}
        return SplitArrays(x, m["y"], np.asarray([""] * len(m["y"])), m["origin"],
                           [str(c) for c in m["classes"]], flags)


def _head(a, n: int):
    from fer_pipeline.data.arrays import SplitArrays

    return SplitArrays(a.x[:n], a.y[:n], a.ids[:n], a.origin[:n], a.classes,
                       {k: v[:n] for k, v in a.flags.items()})


def model_params(profile: str | None, sets: list[str], key: str = "fernet"):
    """params.yaml + a profile (by name, as `fer run --profile`) + -S overrides, applied the
    way `dvc exp run -S` does. Returns (model params, the overrides, evaluate.tta)."""
    import yaml

    from fer_pipeline.params import load_raw, set_dotted
    from fer_pipeline.profiles import load_profile
    from fer_pipeline.train.config import from_raw

    raw = load_raw(ROOT / "params.yaml")
    overrides: dict = dict(load_profile(profile)) if profile else {}
    for s in sets:
        k, _, v = s.partition("=")
        overrides[k] = yaml.safe_load(v)
    for k, v in overrides.items():
        set_dotted(raw, k, v)
    return from_raw(raw).model(key), overrides, raw["evaluate"]["tta"]


def train(args: argparse.Namespace) -> None:
    import keras

    from fer_pipeline.evaluate.metrics import predict_proba
    from fer_pipeline.train.data import make_dataset
    from fer_pipeline.train.models import build_model, trainable_params
    from fer_pipeline.train.stage import _loss_and_targets, _optimizer

    mp, overrides, tta = model_params(args.profile, args.set)
    log_file = Path(args.log)

    def emit(**row) -> None:
        row = {"name": args.name, **row}
        with log_file.open("a") as fh:   # one short append per line: safe across processes
            fh.write(json.dumps(row) + "\n")

    train_a, val = unpack(Path(args.data), "train"), unpack(Path(args.data), "val")
    if args.limit:   # smoke test of the script itself
        train_a, val = _head(train_a, args.limit), _head(val, args.limit)
    keras.utils.set_random_seed(args.seed)
    keras.mixed_precision.set_global_policy(args.precision)
    built = build_model(mp, len(train_a.classes), int(train_a.x.shape[1]), seed=args.seed)
    loss, acc_metric, targets = _loss_and_targets(mp, len(train_a.classes))
    steps = -(-len(train_a) // mp.batch_size)
    built.train_model.compile(optimizer=_optimizer(mp, steps), loss=loss, metrics=[acc_metric])
    emit(event="start", overrides=overrides, params=trainable_params(built.model),
         backend=keras.backend.backend(), precision=args.precision, epochs=mp.epochs,
         n_train=len(train_a), n_val=len(val))
    best = {"val_accuracy": -1.0, "epoch": -1, "weights": None}
    t_start = time.perf_counter()

    class Log(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            va = float(logs.get("val_accuracy", float("nan")))
            if va > best["val_accuracy"]:
                best.update(val_accuracy=va, epoch=epoch + 1, weights=built.model.get_weights())
            emit(event="epoch", epoch=epoch + 1, loss=float(logs.get("loss", 0)),
                 accuracy=float(logs.get("accuracy", 0)), val_accuracy=va,
                 seconds=round(time.perf_counter() - self.t0, 2))

    callbacks = [Log()]
    if mp.lr_schedule == "plateau":   # as train_model does: the study's schedule
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=mp.reduce_lr.factor, patience=mp.reduce_lr.patience,
            min_delta=mp.reduce_lr.min_delta, min_lr=mp.reduce_lr.min_lr))
    built.train_model.fit(
        make_dataset(train_a.x, targets(train_a.y), mp.batch_size, shuffle=True, seed=args.seed),
        validation_data=make_dataset(val.x, targets(val.y), mp.batch_size),
        epochs=mp.epochs, callbacks=callbacks, verbose=0)
    train_seconds = time.perf_counter() - t_start
    built.model.set_weights(best["weights"])
    final = {"best_epoch": best["epoch"], "train_seconds": round(train_seconds, 1)}
    for mode in ("none", "flip", "flip_crops"):
        pred = predict_proba(built.model, val.x, tta=mode).probs.argmax(1)
        final[f"val_{mode}"] = float((pred == val.y).mean())
    if args.test:   # the reported recipe only; variants are chosen on validation above
        test = unpack(Path(args.data), "test")
        test = _head(test, args.limit) if args.limit else test
        pred = predict_proba(built.model, test.x, tta=tta).probs.argmax(1)
        final["test_tta"] = tta
        final["test_accuracy"] = float((pred == test.y).mean())
        for origin in ("PublicTest", "PrivateTest"):
            m = test.origin == origin
            final[f"test_{origin}"] = float((pred[m] == test.y[m]).mean())
    emit(event="final", **final)
    print(json.dumps({"name": args.name, **final}), flush=True)


def table(log: Path) -> str:
    rows: dict[str, dict] = {}
    for line in log.read_text().splitlines():
        r = json.loads(line)
        d = rows.setdefault(r["name"], {"epochs_done": 0})
        if r["event"] == "start":
            d.update(start=r)
        elif r["event"] == "epoch":
            d["epochs_done"] = r["epoch"]
            d["best"] = max(d.get("best", 0.0), r["val_accuracy"])
            d.setdefault("secs", []).append(r["seconds"])
        else:
            d.update(final=r)
    out = ["| variant | overrides | params | epochs | best val acc | val flip | val flip_crops "
           "| test (TTA) | PrivateTest | s/epoch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in rows.items():
        s, f = d.get("start", {}), d.get("final", {})
        ov = ", ".join(f"{k.removeprefix('models.fernet.')}={v}"
                       for k, v in s.get("overrides", {}).items()) or "-"
        test = (f"{f['test_accuracy']:.4f} ({f['test_tta']})" if "test_accuracy" in f else "")
        priv = f"{f['test_PrivateTest']:.4f}" if "test_PrivateTest" in f else ""
        out.append(f"| {name} | {ov} | {s.get('params', '')} | {d['epochs_done']}/"
                   f"{s.get('epochs', '?')} | {d.get('best', float('nan')):.4f} | "
                   f"{f.get('val_flip', float('nan')):.4f} | "
                   f"{f.get('val_flip_crops', float('nan')):.4f} | {test} | {priv} | "
                   f"{np.median(d.get('secs', [float('nan')])):.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--processed", default=str(ROOT / "data/processed"))
    p.add_argument("--out", default=str(ROOT / ".gpu"))
    t = sub.add_parser("train")
    t.add_argument("--data", default=str(ROOT / ".gpu"))
    t.add_argument("--name", required=True)
    t.add_argument("--profile", help="a profiles/NAME.yaml, by NAME")
    t.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--precision", default="mixed_bfloat16")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--test", action="store_true")
    t.add_argument("--limit", type=int, default=0, help="first N images per split (smoke test)")
    t.add_argument("--log", required=True)
    tb = sub.add_parser("table")
    tb.add_argument("log")
    args = ap.parse_args()
    if args.cmd == "pack":
        pack(Path(args.processed), Path(args.out))
    elif args.cmd == "train":
        os.environ.setdefault("KERAS_BACKEND", "jax")
        train(args)
    else:
        print(table(Path(args.log)))


if __name__ == "__main__":
    main()
