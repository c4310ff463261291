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
XZ_FILTERS = [{"id": lzma.FILTER_DELTA, "dist": 1}, {"id": lzma.FILTER_LZMA2, "preset": 6}]


def pack(processed: Path, out: Path) -> None:
    """uint8 images as delta+xz (76% of raw; zlib npz barely compresses faces), the rest npz."""
    from fer_pipeline.arrays import load_split, split_path
    from fer_pipeline.io import md5_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "source.json").write_text(json.dumps(
        {split: md5_file(split_path(processed, split)) for split in SPLITS}))
    for split in SPLITS:
        a = load_split(split_path(processed, split))
        (out / f"{split}.x.xz").write_bytes(
            lzma.compress(np.ascontiguousarray(a.x).tobytes(), format=lzma.FORMAT_XZ,
                          filters=XZ_FILTERS))
        np.savez(out / f"{split}.meta.npz", shape=np.asarray(a.x.shape), y=a.y,
                 origin=a.origin, classes=np.asarray(a.classes), **a.flags)
        print(f"{split}: {len(a)} images -> {(out / f'{split}.x.xz').stat().st_size / 1e6:.1f} MB")


def packed_md5(data: Path) -> dict[str, str]:
    """The md5 of the split files the pack was made from (the unpacked copy differs: no ids),
    as the stage's metrics name them: evaluate ranks a model only on the current val split."""
    src = json.loads((data / "source.json").read_text())
    return {"data_md5_train": src["train"], "data_md5_val": src["val"]}


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
    mp = p.model(args.model)
    log_file = Path(args.log)

    def emit(**row) -> None:
        row = {"name": args.name, "model": args.model, **row}
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
        res = train_model(args.model, mp, p.train, None, processed_dir=work,
                          models_dir=work / "models", reports_dir=work / "reports",
                          state_dir=work / "state")
    except BaseException:
        emit_epochs(ResumeState(work / "state" / args.model).history_rows())
        raise
    with res.history_path.open() as fh:
        emit_epochs(list(csv.DictReader(fh)))
    model = keras.saving.load_model(res.model_path)
    final = {"best_epoch": res.metrics["best_epoch"], "params": res.metrics["trainable_params"],
             "train_seconds": res.metrics["train_seconds"]}
    for mode in ("none", "flip", "flip_crops"):
        pred = predict_proba(model, val.x, tta=mode).probs.argmax(1)
        final[f"val_{mode}"] = float((pred == val.y).mean())
    if args.suite:   # evaluate's corruption suite (its params) on the first N seeded val images
        from fer_pipeline.evaluate.metrics import robustness_suite

        rp, bs = p.evaluate.robustness, p.evaluate.batch_size
        final.update(robustness_suite(lambda xb: model.predict(xb, batch_size=bs, verbose=0),
                                      val.x, val.y, rp.corruptions, rp.severities, args.suite,
                                      rp.seed).metrics)
    if args.bundle:   # what `import` needs to write the stage's outputs here
        trained = {"backend": keras.backend.backend(), "precision": resolve_policy(p.train.precision),
                   "overrides": overrides, "profile": args.profile}
        write_bundle(Path(args.bundle), args.name, model,
                     {**res.metrics, **packed_md5(Path(args.data))}, res.history_path,
                     {**final, **trained})
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


def write_bundle(out: Path, name: str, model, metrics: dict, history: Path,
                 final: dict) -> None:
    """The trained model for the trip back (the lease returns 8 files of 16 MiB at most, 64 MiB
    in all; a 17M-param CNN is 65 MiB of float32): NAME.json (Keras config, metrics, history)
    and the weights, lossless, as one byte-shuffled xz stream (the sign/exponent bytes of
    trained weights compress well: 65 -> 55 MiB) in 15 MiB parts NAME.xz.NN."""
    out.mkdir(parents=True, exist_ok=True)
    weights = [np.asarray(w) for w in model.get_weights()]
    if any(w.dtype.itemsize != 4 for w in weights):
        raise SystemExit(f"{name}: 4-byte weights expected, got {sorted({str(w.dtype) for w in weights})}")
    raw = b"".join(np.ascontiguousarray(w).tobytes() for w in weights)
    blob = lzma.compress(np.frombuffer(raw, np.uint8).reshape(-1, 4).T.tobytes(),
                         format=lzma.FORMAT_XZ, preset=1)
    part = 15 * 2**20
    for i in range(0, len(blob), part):
        (out / f"{name}.xz.{i // part:02d}").write_bytes(blob[i:i + part])
    (out / f"{name}.json").write_text(json.dumps({
        "config": model.to_json(), "raw_bytes": len(raw), "metrics": metrics, "final": final,
        "weights": [{"shape": list(w.shape), "dtype": str(w.dtype)} for w in weights],
        "history_csv": history.read_text()}))
    print(f"bundle {name}: {len(raw) / 2**20:.1f} MiB of weights -> {len(blob) / 2**20:.1f} MiB",
          flush=True)


def read_bundle(src: Path, name: str):
    """(model, NAME.json's dict): the model `write_bundle` wrote, rebuilt from its config with
    the same weights, bit for bit."""
    import keras

    meta = json.loads((src / f"{name}.json").read_text())
    blob = b"".join(f.read_bytes() for f in sorted(src.glob(f"{name}.xz.*")))
    raw = np.frombuffer(lzma.decompress(blob), np.uint8).reshape(4, -1).T.tobytes()
    if len(raw) != meta["raw_bytes"]:
        raise SystemExit(f"{src}/{name}: weights are {len(raw)} bytes, expected {meta['raw_bytes']}")
    weights, at = [], 0
    for w in meta["weights"]:
        n = int(np.prod(w["shape"])) * np.dtype(w["dtype"]).itemsize
        weights.append(np.frombuffer(raw[at:at + n], w["dtype"]).reshape(w["shape"]))
        at += n
    model = keras.models.model_from_json(meta["config"])
    model.set_weights(weights)
    return model, meta


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
           "| suite mean | worst drop | test (TTA) | PrivateTest | s/epoch |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in rows.items():
        s, f = d.get("start", {}), d.get("final", {})
        model = s.get("model", "fernet")
        ov = ", ".join(f"{k.removeprefix(f'models.{model}.')}={v}"
                       for k, v in s.get("overrides", {}).items()) or "-"
        test = (f"{f['test_accuracy']:.4f} ({f['test_tta']})" if "test_accuracy" in f else "")
        priv = f"{f['test_PrivateTest']:.4f}" if "test_PrivateTest" in f else ""
        suite = (f"{f['robust_mean_accuracy']:.4f} | {100 * f['robust_worst_drop']:.1f} pt "
                 f"({f['robust_worst_corruption']})" if "robust_worst_drop" in f else " | ")
        n_params = f.get("params", s.get("params", ""))   # older logs: on the start line
        out.append(f"| {name} | {ov} | {n_params} | {d['epochs_done']}/"
                   f"{s.get('epochs', '?')} | {d.get('best', float('nan')):.4f} | "
                   f"{f.get('val_flip', float('nan')):.4f} | "
                   f"{f.get('val_flip_crops', float('nan')):.4f} | {suite} | {test} | {priv} | "
                   f"{np.median(d.get('secs', [float('nan')])):.1f} |")
    return "\n".join(out)


def import_bundle(args: argparse.Namespace) -> None:
    """Write a bundle's model as `fer train --model NAME` writes its outputs (model.keras,
    metrics.json, history.csv; an MLflow run and mlflow.json through the stage's MlflowRun),
    so `dvc commit train@NAME` records it. Refuses a bundle trained with overrides (DVC's lock
    would claim params.yaml's recipe for it) or on other data than data/processed."""
    from fer_pipeline import io
    from fer_pipeline import params as P
    from fer_pipeline.arrays import PROCESSED_DIR, load_split, split_path
    from fer_pipeline.backend import select
    from fer_pipeline.train.artifacts import save_model
    from fer_pipeline.train.mlflow_run import MlflowRun

    p, _ = load_params(Path(args.params), None, [])
    select(p.train.backend)
    model, meta = read_bundle(Path(args.bundle), args.name)
    name, metrics, final = args.model, meta["metrics"], meta["final"]
    if final.get("overrides") or final.get("profile"):
        how = " ".join(x for x in (final.get("profile") and f"profile {final['profile']}",
                                     final.get("overrides") and str(final["overrides"])) if x)
        raise SystemExit(f"{args.name} was trained with {how}: not params.yaml's models.{name}")
    files = [split_path(PROCESSED_DIR, s) for s in ("train", "val")]
    here = {"data_md5_train": io.md5_file(files[0]), "data_md5_val": io.md5_file(files[1])}
    if any(metrics[k] != v for k, v in here.items()):
        raise SystemExit(f"{args.name} was trained on other splits than {PROCESSED_DIR}: {here}")
    mp, tp = p.model(name), p.train
    out, history = Path(tp.reports_dir) / name, Path(tp.reports_dir) / name / "history.csv"
    io.write_text(history, meta["history_csv"])
    rows = list(csv.DictReader(meta["history_csv"].splitlines()))
    rows = [{k: float(v) for k, v in r.items()} for r in rows]
    val = load_split(files[1])
    info = {"model_name": name, "arch": mp.arch, "pretrained": metrics["pretrained"],
            "weights_source": "none", "precision": final["precision"],
            "feature_cache": mp.uses_feature_cache, "trainable_params": metrics["trainable_params"],
            "n_train": metrics["train_images"], "n_val": len(val),
            "classes": ",".join(val.classes), "backend": final["backend"]}
    run = MlflowRun(p.mlflow)
    with run.start(None, info, files, {"model": P.to_dict(mp),
                                       "train": P.to_dict(tp)}):
        for i in range(len(rows)):
            run.log_epoch(rows[: i + 1])
        run.log_result(metrics, rows, f"{name} ({mp.arch}, pretrained={info['pretrained']})",
                       history, model, val.x[:4])
        save_model(model, Path(tp.models_dir) / name / "model.keras")
    io.write_json(out / "metrics.json", metrics)
    io.write_json(out / "mlflow.json", run.summary(info))
    print(f"{name}: val_accuracy {metrics['val_accuracy']:.4f} (best epoch {metrics['best_epoch']}, "
          f"{final['backend']}, {final['precision']}), MLflow run {run.run_id}")


def pick(log: Path, prefix: str, max_drop: float = 0.05) -> str:
    """The run (name starting with `prefix`) to keep, on validation only: the best single-view
    val accuracy among those whose suite worst drop is <= max_drop, else the smallest worst
    drop. Empty when no run finished."""
    finals = [r for r in map(json.loads, log.read_text().splitlines())
              if r["event"] == "final" and r["name"].startswith(prefix) and "robust_worst_drop" in r]
    if not finals:
        return ""
    ok = [r for r in finals if r["robust_worst_drop"] <= max_drop]
    best = max(ok, key=lambda r: r["val_none"]) if ok else min(
        finals, key=lambda r: r["robust_worst_drop"])
    return best["name"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--processed", default=str(ROOT / "data/processed"))
    p.add_argument("--out", default=str(ROOT / ".gpu"))
    t = sub.add_parser("train")
    t.add_argument("--data", default=str(ROOT / ".gpu"))
    t.add_argument("--name", required=True)
    t.add_argument("--model", default="fernet", help="a key of params.yaml's models")
    t.add_argument("--suite", type=int, default=0,
                   help="evaluate's corruption suite on N val images after training (0: off)")
    t.add_argument("--bundle", help="write the trained model's bundle to BUNDLE/<name>")
    t.add_argument("--params", default=str(ROOT / "params.yaml"))
    t.add_argument("--profile", help="a profiles/NAME.yaml, by NAME")
    t.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                   help="param override, as `dvc exp run -S` (e.g. train.precision=mixed_bfloat16)")
    t.add_argument("--test", action="store_true")
    t.add_argument("--limit", type=int, default=0, help="first N images per split (smoke test)")
    t.add_argument("--log", required=True)
    tb = sub.add_parser("table")
    tb.add_argument("log")
    im = sub.add_parser("import", help="a bundle's model as train@MODEL's outputs (here)")
    im.add_argument("bundle")
    im.add_argument("name", help="the run's --name")
    im.add_argument("--model", required=True)
    im.add_argument("--params", default=str(ROOT / "params.yaml"))
    pk = sub.add_parser("pick", help="the run to bring back (validation only)")
    pk.add_argument("log")
    pk.add_argument("--prefix", default="")
    args = ap.parse_args()
    if args.cmd == "pack":
        pack(Path(args.processed), Path(args.out))
    elif args.cmd == "train":
        os.environ.setdefault("KERAS_BACKEND", "jax")
        train(args)
    elif args.cmd == "import":
        import_bundle(args)
    elif args.cmd == "pick":
        print(pick(Path(args.log), args.prefix))
    else:
        print(table(Path(args.log)))


if __name__ == "__main__":
    main()
