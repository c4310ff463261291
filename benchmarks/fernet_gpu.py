"""Train variants of the fifth model on a lent GPU machine, with the JAX backend.

That machine has JAX but no TensorFlow, MLflow or DVC, and takes at most 64 MiB of files, so
this script packs the split arrays small (`pack`, run here) and, there, unpacks them into a
temp processed dir and trains with the package's own `train_model(..., mlflow_params=None)`:
the same recipe, precision policy (`train.precision`), early stopping and best-epoch choice
as `fer train`. Several variants run at once as separate processes on the one GPU (each is
far too small to fill it). Selection uses the validation split only; the test split is read
only with `--test`, for the recipe whose accuracy is reported (the GPU profile), never to
choose between variants.

    python benchmarks/fernet_gpu.py pack --out .gpu                     # here
    KERAS_BACKEND=jax python benchmarks/fernet_gpu.py train --data .gpu --name full \\
        [--profile fernet-gpu] [-S models.fernet.epochs=45 ...] [--test] \\
        --log results.jsonl                                             # there
    python benchmarks/fernet_gpu.py table results.jsonl                 # here: markdown

The log gets a `start` line, one `epoch` line per finished epoch (from the stage's history,
also when the run is cut off by SIGTERM, e.g. `timeout`) and a `final` line.
"""

from __future__ import annotations

import argparse
import csv
import json
import lzma
import os
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")
MODEL = "fernet"
XZ_FILTERS = [{"id": lzma.FILTER_DELTA, "dist": 1}, {"id": lzma.FILTER_LZMA2, "preset": 6}]


def pack(processed: Path, out: Path) -> None:
    """uint8 images as delta+xz (76% of raw; zlib npz barely compresses faces), the rest npz."""
    from fer_pipeline.arrays import load_split, split_path

    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        a = load_split(split_path(processed, split))
        (out / f"{split}.x.xz").write_bytes(
            lzma.compress(np.ascontiguousarray(a.x).tobytes(), format=lzma.FORMAT_XZ,
                          filters=XZ_FILTERS))
        np.savez(out / f"{split}.meta.npz", shape=np.asarray(a.x.shape), y=a.y,
                 origin=a.origin, classes=np.asarray(a.classes), **a.flags)
        print(f"{split}: {len(a)} images -> {(out / f'{split}.x.xz').stat().st_size / 1e6:.1f} MB")


def unpack(data: Path, split: str, limit: int = 0):
    """The packed split as SplitArrays (its first `limit` images when limit > 0)."""
    from fer_pipeline.arrays import SplitArrays

    with np.load(data / f"{split}.meta.npz") as m:
        shape = tuple(int(s) for s in m["shape"])
        x = np.frombuffer(lzma.decompress((data / f"{split}.x.xz").read_bytes()),
                          dtype=np.uint8).reshape(shape)
        n = limit or len(m["y"])
        flags = {k: m[k][:n] for k in m.files if k.startswith("flag_")}
        return SplitArrays(x[:n], m["y"][:n], np.asarray([""] * min(n, len(m["y"]))),
                           m["origin"][:n], [str(c) for c in m["classes"]], flags)


def load_params(params: Path, profile: str | None, sets: list[str]):
    """params.yaml + a profile (by name, as `fer run --profile`) + -S overrides, checked by
    `fer_pipeline.params` as `fer run` checks them. Returns (Params, the overrides)."""
    from fer_pipeline import params as P
    from fer_pipeline.profiles import load_profile

    overrides = {**(load_profile(profile, ROOT / "profiles") if profile else {}),
                 **P.parse_overrides(sets)}
    return P.load(params, overrides), overrides


def train(args: argparse.Namespace) -> None:
    from fer_pipeline.arrays import save_split, split_path
    from fer_pipeline.evaluate.metrics import predict_proba
    from fer_pipeline.train.precision import resolve_policy
    from fer_pipeline.train.resume import ResumeState
    from fer_pipeline.train.stage import train_model

    p, overrides = load_params(Path(args.params), args.profile, args.set)
    mp = p.model(MODEL)
    log_file = Path(args.log)

    def emit(**row) -> None:
        row = {"name": args.name, **row}
        with log_file.open("a") as fh:   # one short append per line: safe across processes
            fh.write(json.dumps(row) + "\n")

    def emit_epochs(rows) -> None:
        for r in rows:
            emit(event="epoch", epoch=int(r["epoch"]) + 1, loss=float(r["loss"]),
                 accuracy=float(r["accuracy"]), val_accuracy=float(r["val_accuracy"]),
                 seconds=round(float(r["seconds"]), 2))

    work = Path(tempfile.mkdtemp(prefix=f"fernet-gpu-{args.name}-"))
    train_a, val = unpack(Path(args.data), "train", args.limit), unpack(Path(args.data), "val",
                                                                        args.limit)
    save_split(split_path(work, "train"), train_a)
    save_split(split_path(work, "val"), val)
    import keras

    emit(event="start", overrides=overrides, backend=keras.backend.backend(),
         precision=resolve_policy(p.train.precision), epochs=mp.epochs, n_train=len(train_a),
         n_val=len(val))
    # `timeout` sends SIGTERM: leave through Python, so the finished epochs still get logged.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        res = train_model(MODEL, mp, p.train, None, processed_dir=work,
                          models_dir=work / "models", reports_dir=work / "reports",
                          state_dir=work / "state")
    except BaseException:
        emit_epochs(ResumeState(work / "state" / MODEL).history_rows())
        raise
    with res.history_path.open() as fh:
        emit_epochs(list(csv.DictReader(fh)))
    model = keras.saving.load_model(res.model_path)
    final = {"best_epoch": res.metrics["best_epoch"], "params": res.metrics["trainable_params"],
             "train_seconds": res.metrics["train_seconds"]}
    for mode in ("none", "flip", "flip_crops"):
        pred = predict_proba(model, val.x, tta=mode).probs.argmax(1)
        final[f"val_{mode}"] = float((pred == val.y).mean())
    if args.test:   # the reported recipe only; variants are chosen on validation above
        test = unpack(Path(args.data), "test", args.limit)
        pred = predict_proba(model, test.x, tta=p.evaluate.tta).probs.argmax(1)
        final["test_tta"] = p.evaluate.tta
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
        ov = ", ".join(f"{k.removeprefix(f'models.{MODEL}.')}={v}"
                       for k, v in s.get("overrides", {}).items()) or "-"
        test = (f"{f['test_accuracy']:.4f} ({f['test_tta']})" if "test_accuracy" in f else "")
        priv = f"{f['test_PrivateTest']:.4f}" if "test_PrivateTest" in f else ""
        n_params = f.get("params", s.get("params", ""))   # older logs: on the start line
        out.append(f"| {name} | {ov} | {n_params} | {d['epochs_done']}/"
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
    t.add_argument("--params", default=str(ROOT / "params.yaml"))
    t.add_argument("--profile", help="a profiles/NAME.yaml, by NAME")
    t.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                   help="param override, as `dvc exp run -S` (e.g. train.precision=mixed_bfloat16)")
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
