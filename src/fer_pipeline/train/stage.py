"""Training stage: `fer train --model NAME` trains models.NAME on the split arrays.

One implementation, `train_model`, used by the CLI, DVC (`train@<name>`), flows and tests.
Validation is the `val` split, never `test`. Resume state (Keras BackupAndRestore, per-epoch
history, best model so far, MLflow run id) lives in `<state_dir>/<name>/`, outside DVC outs, and
is cleared after a successful finish; a rerun after a crash continues from the last finished
epoch in the same MLflow run. Output files are written to a temp name and renamed (atomic).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fer_pipeline.cli import StageError
from fer_pipeline.data.arrays import PROCESSED_DIR, load_split, split_path
from fer_pipeline.train.config import (
    MlflowParams,
    ModelParams,
    TrainParams,
    load_train_config,
)

log = logging.getLogger(__name__)

CRASH_ENV = "FER_TRAIN_CRASH_AFTER_EPOCH"   # tests: hard-exit after this many finished epochs
HISTORY_FIELDS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate",
                  "seconds"]


@dataclass
class TrainResult:
    name: str
    model_path: Path
    metrics_path: Path
    history_path: Path
    metrics: dict[str, Any]
    run_id: str | None
    model_uri: str | None
    resumed_from_epoch: int


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def save_model_atomic(model, path: Path) -> None:
    """Keras picks the format from the suffix, so the temp name keeps `.keras`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.keras")
    model.save(tmp)
    os.replace(tmp, path)


def _fingerprint(name: str, mp: ModelParams, tp: TrainParams, policy: str,
                 data_files: list[Path]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([name, dataclasses.asdict(mp), tp.seed, policy], sort_keys=True,
                        default=str).encode())
    for p in data_files:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _callbacks_module():
    import keras

    class EpochLogger(keras.callbacks.Callback):
        """Progress line, per-epoch history CSV (resume-safe) and MLflow metrics."""

        def __init__(self, history_file: Path, total_epochs: int, n_images: int,
                     mlflow_log: bool) -> None:
            super().__init__()
            self.file, self.total, self.n = history_file, total_epochs, n_images
            self.mlflow_log = mlflow_log
            self.rows: list[dict[str, Any]] = []
            if history_file.is_file():
                with history_file.open() as fh:
                    self.rows = list(csv.DictReader(fh))
            self.first_epoch: int | None = None
            self._t0 = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            if self.first_epoch is None:
                self.first_epoch = epoch
                # Drop rows of epochs that will be redone (killed before their backup).
                self.rows = [r for r in self.rows if int(r["epoch"]) < epoch]
                if epoch:
                    log.info("resuming from epoch %d (epochs 1-%d restored)", epoch + 1, epoch)
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            secs = time.perf_counter() - self._t0
            lr = logs.get("learning_rate")
            if lr is None:
                try:
                    lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
                except Exception:  # noqa: BLE001
                    lr = float("nan")
            row = {"epoch": epoch, "seconds": round(secs, 3), "learning_rate": float(lr)}
            for k in ("loss", "accuracy", "val_loss", "val_accuracy"):
                row[k] = float(logs.get(k, float("nan")))
            self.rows.append(row)
            tmp = self.file.with_name(self.file.name + ".tmp")
            with tmp.open("w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS)
                w.writeheader()
                w.writerows(self.rows)
            os.replace(tmp, self.file)
            log.info("epoch %d/%d  loss %.4f  acc %.4f  val_loss %.4f  val_acc %.4f  "
                     "lr %.2g  %.1fs (%.0f img/s)", epoch + 1, self.total, row["loss"],
                     row["accuracy"], row["val_loss"], row["val_accuracy"], row["learning_rate"],
                     secs, self.n / max(secs, 1e-9))
            if self.mlflow_log:
                import mlflow

                mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"
                                    and np.isfinite(v)}, step=epoch)

    class BestKeeper(keras.callbacks.Callback):
        """Keeps the full model of the best epoch (by `monitor`) in `path`, atomically."""

        def __init__(self, full_model, path: Path, monitor: str, prior_best: float | None):
            super().__init__()
            self.full, self.path, self.monitor = full_model, path, monitor
            self.sign = 1.0 if monitor.endswith("accuracy") else -1.0
            self.best = prior_best
            self.best_epoch: int | None = None

        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(self.monitor)
            if value is None:
                return
            if self.best is None or self.sign * (value - self.best) > 0 or not self.path.exists():
                self.best, self.best_epoch = float(value), epoch
                save_model_atomic(self.full, self.path)

    class CrashAfter(keras.callbacks.Callback):
        """Simulates a kill (no cleanup) once `n` epochs are finished and backed up."""

        def __init__(self, n: int) -> None:
            super().__init__()
            self.n = n

        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 >= self.n:
                log.warning("%s=%d: hard exit after epoch %d", CRASH_ENV, self.n, epoch + 1)
                os._exit(75)

    return EpochLogger, BestKeeper, CrashAfter


def _optimizer(mp: ModelParams, steps_per_epoch: int = 1):
    import keras

    lr = mp.learning_rate
    if mp.lr_schedule == "cosine":
        warmup = mp.warmup_epochs * steps_per_epoch
        total = max(1, mp.epochs * steps_per_epoch - warmup)
        # Warm-up from lr/10 to lr, then cosine decay to 1% of lr over the remaining epochs.
        lr = keras.optimizers.schedules.CosineDecay(
            lr / 10 if warmup else lr, total, alpha=0.01,
            warmup_target=lr if warmup else None, warmup_steps=warmup)
    if mp.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=lr, weight_decay=mp.weight_decay)
    if mp.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=0.9, nesterov=True,
                                    weight_decay=mp.weight_decay or None)
    cls = {"adam": keras.optimizers.Adam, "rmsprop": keras.optimizers.RMSprop}[mp.optimizer]
    return cls(learning_rate=lr)


def _loss_and_targets(mp: ModelParams, n_classes: int):
    """Sparse cross-entropy (the study), or one-hot targets with label smoothing. Returns
    (loss, accuracy metric, function mapping int labels to the targets fit needs)."""
    import keras

    if not mp.label_smoothing:
        return "sparse_categorical_crossentropy", "accuracy", lambda y: y
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=mp.label_smoothing)
    eye = np.eye(n_classes, dtype=np.float32)
    return loss, keras.metrics.CategoricalAccuracy(name="accuracy"), lambda y: eye[y]


def _class_weights(y: np.ndarray, n_classes: int) -> dict[int, float]:
    counts = np.bincount(y, minlength=n_classes).astype(float)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = len(y) / (present.sum() * counts[present])   # sklearn's "balanced"
    return {i: float(w[i]) for i in range(n_classes) if present[i]}


def train_model(name: str, model_params: ModelParams, train_params: TrainParams,
                mlflow_params: MlflowParams, processed_dir: str | Path = PROCESSED_DIR,
                models_dir: str | Path | None = None, reports_dir: str | Path | None = None,
                state_dir: str | Path | None = None) -> TrainResult:
    mp, tp = model_params, train_params
    models_dir = Path(models_dir or tp.models_dir)
    reports_dir = Path(reports_dir or tp.reports_dir)
    state = Path(state_dir or tp.state_dir) / name
    model_path = models_dir / name / "model.keras"
    out_reports = reports_dir / name
    data_files = [split_path(processed_dir, "train"), split_path(processed_dir, "val")]

    # 1. Tracking first: an unreachable server fails in seconds, before anything heavy.
    from fer_pipeline.train import tracking

    uri = tracking.setup_tracking(mlflow_params.tracking_uri, mlflow_params.experiment,
                                  mlflow_params.probe_timeout_s)
    log.info("MLflow tracking: %s, experiment %s", uri, mlflow_params.experiment)

    import keras

    from fer_pipeline.train.data import make_dataset
    from fer_pipeline.train.history import history_figure
    from fer_pipeline.train.models import build_model, trainable_params
    from fer_pipeline.train.precision import apply_policy

    train = load_split(data_files[0])
    val = load_split(data_files[1])
    if train.classes != val.classes:
        raise StageError(f"train and val class lists differ: {train.classes} vs {val.classes}")
    n_classes = len(train.classes)
    image_size = int(train.x.shape[1])

    keras.utils.set_random_seed(tp.seed)
    policy = apply_policy(tp.precision)
    built = build_model(mp, n_classes, image_size, seed=tp.seed, name=name)
    model = built.model
    if mp.is_transfer and not built.pretrained:
        log.warning("models.%s.weights is null: %s trains WITHOUT pretrained weights%s",
                    name, mp.arch, " (frozen random base: only the head learns)"
                    if mp.freeze_base else "")

    # 2. Resume state: valid only for the same params, precision and data.
    fp = _fingerprint(name, mp, tp, policy, data_files)
    if (state / "fingerprint").is_file() and (state / "fingerprint").read_text() != fp:
        log.info("resume state in %s is for other params/data: starting over", state)
        shutil.rmtree(state)
    state.mkdir(parents=True, exist_ok=True)
    (state / "fingerprint").write_text(fp)
    gi = state.parent / ".gitignore"
    if not gi.exists():
        gi.write_text("*\n")

    # 3. Inputs: cached frozen-base features, or the images.
    fit_model = built.train_model
    if mp.uses_feature_cache:
        feat_file = state / "features.npz"
        if feat_file.is_file():
            with np.load(feat_file) as f:
                ftr, fva = f["train"], f["val"]
        else:
            t0 = time.perf_counter()
            bs = max(mp.batch_size, 128)
            ftr = np.asarray(built.extractor.predict(make_dataset(train.x, train.y, bs),
                                                     verbose=0), dtype=np.float32)
            fva = np.asarray(built.extractor.predict(make_dataset(val.x, val.y, bs),
                                                     verbose=0), dtype=np.float32)
            np.savez(state / "features.tmp.npz", train=ftr, val=fva)
            os.replace(state / "features.tmp.npz", feat_file)
            log.info("cached frozen %s features %s in %.1fs (base runs once, not per epoch)",
                     mp.arch, ftr.shape[1:], time.perf_counter() - t0)
        fit_model = built.head
    loss, acc_metric, targets = _loss_and_targets(mp, n_classes)
    xtr, xva = (ftr, fva) if mp.uses_feature_cache else (train.x, val.x)
    # Endless datasets + explicit steps: one iterator per fit, not one per epoch.
    train_ds = make_dataset(xtr, targets(train.y), mp.batch_size, shuffle=True, seed=tp.seed,
                            repeat=True)
    val_ds = make_dataset(xva, targets(val.y), mp.batch_size, repeat=True)
    steps = -(-len(train) // mp.batch_size)
    val_steps = -(-len(val) // mp.batch_size)
    fit_model.compile(optimizer=_optimizer(mp, steps), loss=loss, metrics=[acc_metric])
    cw = _class_weights(train.y, n_classes) if mp.class_weights else None

    # 4. MLflow run: new, or the interrupted one when resuming.
    import mlflow

    run_file = state / "mlflow_run.json"
    run_id = json.loads(run_file.read_text())["run_id"] if run_file.is_file() else None
    if run_id:
        try:
            mlflow.get_run(run_id)
        except Exception:  # noqa: BLE001 - run gone (other store): start a new one
            run_id = None
    n_params = trainable_params(model)
    info = {
        "model_name": name, "arch": mp.arch, "pretrained": built.pretrained,
        "weights_source": built.weights_source, "precision": policy,
        "feature_cache": mp.uses_feature_cache, "trainable_params": n_params,
        "n_train": len(train), "n_val": len(val), "classes": ",".join(train.classes),
        "backend": keras.backend.backend(),
    }
    EpochLogger, BestKeeper, CrashAfter = _callbacks_module()
    history_file = state / "history.csv"
    logger = EpochLogger(history_file, mp.epochs, len(train), mlflow_log=True)
    prior = [float(r[mp.monitor]) for r in logger.rows]
    prior_best = (max(prior) if mp.monitor.endswith("accuracy") else min(prior)) if prior else None
    best_file = state / "best.keras"
    keeper = BestKeeper(model, best_file, mp.monitor, prior_best)
    mode = "max" if mp.monitor.endswith("accuracy") else "min"
    callbacks = [
        logger,
        keeper,
        keras.callbacks.EarlyStopping(monitor=mp.monitor, mode=mode,
                                      patience=mp.early_stopping_patience,
                                      restore_best_weights=True, verbose=1),
        keras.callbacks.BackupAndRestore(str(state / "backup")),
    ]
    if mp.lr_schedule == "plateau":  # a cosine schedule owns the learning rate itself
        callbacks.insert(2, keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=mp.reduce_lr.factor, patience=mp.reduce_lr.patience,
            min_delta=mp.reduce_lr.min_delta, min_lr=mp.reduce_lr.min_lr, verbose=1))
    if os.environ.get(CRASH_ENV):
        callbacks.append(CrashAfter(int(os.environ[CRASH_ENV])))

    tags = tracking.run_tags(data_files, {"model_name": name, "arch": mp.arch,
                                          "pretrained": str(built.pretrained).lower(),
                                          "precision": policy})
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else name) as run:
        run_file.write_text(json.dumps({"run_id": run.info.run_id}))
        mlflow.set_tags(tags)
        if not run_id:
            params = tracking.flatten({"model": dataclasses.asdict(mp),
                                       "train": dataclasses.asdict(tp)})
            params.update(info)
            mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        log.info("training %s (%s, %d trainable params, %s, pretrained=%s, feature cache=%s) "
                 "on %d images, validating on %d", name, mp.arch, n_params, policy,
                 built.pretrained, mp.uses_feature_cache, len(train), len(val))
        t0 = time.perf_counter()
        fit_model.fit(train_ds, validation_data=val_ds, epochs=mp.epochs, class_weight=cw,
                      steps_per_epoch=steps, validation_steps=val_steps,
                      callbacks=callbacks, verbose=tp.verbose)
        train_seconds = time.perf_counter() - t0
        resumed_from = logger.first_epoch or 0

        # 5. The best epoch's full model is the result.
        # (no best file only if no epoch ran in any session: then the current weights)
        best = keras.saving.load_model(best_file) if best_file.is_file() else model
        rows = logger.rows
        best_row = (max if mode == "max" else min)(rows, key=lambda r: float(r[mp.monitor]))
        metrics = _final_metrics(best, built, mp, train, val, ftr if mp.uses_feature_cache
                                 else None, fva if mp.uses_feature_cache else None)
        metrics.update({
            "best_epoch": int(best_row["epoch"]) + 1, "epochs_run": len(rows),
            "pretrained": built.pretrained, "trainable_params": n_params,
            "train_seconds": round(train_seconds, 1),
            "seconds_per_epoch": round(float(np.mean([float(r["seconds"]) for r in rows])), 2),
        })
        mlflow.log_metrics({f"final_{k}": float(v) for k, v in metrics.items()
                            if isinstance(v, int | float) and not isinstance(v, bool)})
        mlflow.log_figure(history_figure(rows, f"{name} ({mp.arch}, pretrained="
                                              f"{built.pretrained})"), "plots/history.png")
        mlflow.log_artifact(str(history_file), "history")
        model_uri = None
        if mlflow_params.log_model:
            model_uri = _log_model(best, val.x[:4])
        save_model_atomic(best, model_path)

    out_reports.mkdir(parents=True, exist_ok=True)
    _atomic_copy(history_file, out_reports / "history.csv")
    metrics_path = out_reports / "metrics.json"
    _atomic_write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")
    _atomic_write_text(out_reports / "mlflow.json", json.dumps({
        "run_id": run.info.run_id, "model_uri": model_uri, "tracking_uri": uri,
        "experiment": mlflow_params.experiment, "pipeline_run_id": tags["pipeline_run_id"],
        **info}, indent=2) + "\n")
    shutil.rmtree(state, ignore_errors=True)
    log.info("%s: val_accuracy %.4f (best epoch %d), model %s, MLflow run %s", name,
             metrics["val_accuracy"], metrics["best_epoch"], model_path, run.info.run_id)
    return TrainResult(name, model_path, metrics_path, out_reports / "history.csv", metrics,
                       run.info.run_id, model_uri, resumed_from)


def _final_metrics(best, built, mp, train, val, ftr, fva) -> dict[str, Any]:
    """Loss/accuracy of the kept model on the whole train and val splits (inference mode)."""
    from fer_pipeline.train.data import make_dataset

    bs = max(mp.batch_size, 128)
    if ftr is not None:  # same weights, evaluated on cached features
        head = best.get_layer("head")
        head.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        tr = head.evaluate(make_dataset(ftr, train.y, bs), verbose=0, return_dict=True)
        va = head.evaluate(make_dataset(fva, val.y, bs), verbose=0, return_dict=True)
    else:
        best.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        tr = best.evaluate(make_dataset(train.x, train.y, bs), verbose=0, return_dict=True)
        va = best.evaluate(make_dataset(val.x, val.y, bs), verbose=0, return_dict=True)
    return {"train_loss": float(tr["loss"]), "train_accuracy": float(tr["accuracy"]),
            "val_loss": float(va["loss"]), "val_accuracy": float(va["accuracy"])}


def _pip_requirements() -> list[str]:
    """Pinned explicitly: MLflow's own inference loads the model again in a subprocess (slow)."""
    from importlib import metadata

    import keras

    reqs = [f"keras=={keras.__version__}"]
    backend = keras.backend.backend()
    for dist in {"tensorflow": ["tensorflow-cpu", "tensorflow"], "jax": ["jax"],
                 "torch": ["torch"]}.get(backend, []):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
            break
        except metadata.PackageNotFoundError:
            continue
    return reqs


def _log_model(model, x_example: np.ndarray) -> str:
    import mlflow
    import mlflow.keras
    from mlflow.models import infer_signature

    example = x_example.astype(np.float32)
    preds = np.asarray(model.predict(example, verbose=0), dtype=np.float32)
    # MLflow 3.17's Keras flavor writes the input example before it creates the model
    # directory (FileNotFoundError on input_example.json): create the directory first.
    import mlflow.keras.save as keras_save

    orig = keras_save._save_example

    def _save_example(mlflow_model, input_example, path, *args, **kwargs):
        os.makedirs(path, exist_ok=True)
        return orig(mlflow_model, input_example, path, *args, **kwargs)

    keras_save._save_example = _save_example
    try:
        info = mlflow.keras.log_model(model, name="model",
                                      signature=infer_signature(example, preds),
                                      input_example=example, pip_requirements=_pip_requirements())
    finally:
        keras_save._save_example = orig
    return info.model_uri


def _run_cli(args: argparse.Namespace) -> int:
    cfg = load_train_config(args.params)
    names = list(cfg.models) if args.all else args.model
    if not names:
        raise StageError("give --model NAME (repeatable) or --all")
    for name in names:
        train_model(name, cfg.model(name), cfg.train, cfg.mlflow,
                    processed_dir=args.processed_dir)
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train models.<NAME> on the split arrays (MLflow)")
    p.add_argument("--model", action="append", metavar="NAME",
                   help="model key under `models:` in params.yaml (repeatable)")
    p.add_argument("--all", action="store_true", help="train every model in params.yaml")
    p.add_argument("--processed-dir", default=str(PROCESSED_DIR),
                   help="directory of train/val npz (default: %(default)s)")
    p.set_defaults(func=_run_cli)
