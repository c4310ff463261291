"""Training stage: `fer train --model NAME` trains models.NAME on the split arrays.

One implementation, `train_model`, used by the CLI, DVC (`train@<name>`), flows, tests,
benchmarks and the GPU runner (the last two without MLflow: `mlflow_params=None`). Validation
is the `val` split, never `test`. The recipe (optimizer, loss, callbacks) is in `recipe.py`,
crash-resume state in `resume.py`, the MLflow run in `mlflow_run.py`, model files in
`artifacts.py`. Output files are written to a temp name and renamed (atomic).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fer_pipeline import io
from fer_pipeline import params as P
from fer_pipeline.arrays import PROCESSED_DIR, SplitArrays, load_split, split_path
from fer_pipeline.artifacts.train import TrainMetrics
from fer_pipeline.errors import FerError
from fer_pipeline.params import MlflowParams, ModelParams, TrainParams
from fer_pipeline.soft_labels import TEACHER_DIR, load_soft_labels, teacher_path

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    name: str
    model_path: Path
    metrics_path: Path
    history_path: Path
    metrics: dict[str, Any]
    run_id: str | None          # None without MLflow
    model_uri: str | None       # None without MLflow or with mlflow.log_model false
    resumed_from_epoch: int


def train_model(name: str, model_params: ModelParams, train_params: TrainParams,
                mlflow_params: MlflowParams | None, processed_dir: str | Path = PROCESSED_DIR,
                models_dir: str | Path | None = None, reports_dir: str | Path | None = None,
                state_dir: str | Path | None = None,
                teacher_dir: str | Path | None = None) -> TrainResult:
    """Train, keep the best epoch (by `monitor` on val), write model/metrics/history; track
    it in MLflow unless `mlflow_params` is None."""
    mp, tp = model_params, train_params
    model_path = Path(models_dir or tp.models_dir) / name / "model.keras"
    out = Path(reports_dir or tp.reports_dir) / name
    data_files = [split_path(processed_dir, "train"), split_path(processed_dir, "val")]
    # The teachers' probabilities are data too (resume state, MLflow tags).
    teacher_file = teacher_path(teacher_dir or TEACHER_DIR, name) if mp.distill.on else None
    if teacher_file:
        data_files.append(teacher_file)

    # 1. Tracking first: an unreachable server fails in seconds, before anything heavy.
    from fer_pipeline.train.mlflow_run import MlflowRun, NoRun

    tracker = MlflowRun(mlflow_params) if mlflow_params else NoRun()

    # 2. The Keras backend, chosen before Keras loads (the worker's KERAS_BACKEND wins).
    from fer_pipeline.backend import select

    select(tp.backend)
    import keras

    from fer_pipeline.train import recipe
    from fer_pipeline.train.artifacts import save_model
    from fer_pipeline.train.augment import BatchMixer
    from fer_pipeline.train.data import make_dataset
    from fer_pipeline.train.models import build_model, trainable_params
    from fer_pipeline.train.precision import apply_policy
    from fer_pipeline.train.resume import ResumeState, fingerprint, prior_best

    # 3. Data, precision, model.
    train, val = _load_splits(*data_files[:2])
    n_classes = len(train.classes)
    keras.utils.set_random_seed(tp.seed)
    policy = apply_policy(tp.precision)
    built = build_model(mp, n_classes, int(train.x.shape[1]), seed=tp.seed, name=name)
    if mp.is_transfer and not built.pretrained:
        log.warning("models.%s.weights is null: %s trains WITHOUT pretrained weights%s", name,
                    mp.arch, " (frozen random base: only the head learns)" if mp.freeze_base else "")

    # 4. Resume state: valid only for the same params, precision, backend and data.
    state = ResumeState.open(Path(state_dir or tp.state_dir) / name,
                             fingerprint(name, mp, tp.seed, f"{policy}@{keras.backend.backend()}",
                                         data_files))

    # 5. Inputs (cached frozen-base features, or the images) and the compiled recipe.
    fit_model, xtr, xva = _fit_inputs(built, mp, train, val, state)
    steps, val_steps = -(-len(train) // mp.batch_size), -(-len(val) // mp.batch_size)
    targets = recipe.compile_for_fit(fit_model, mp, n_classes, steps)
    # Endless datasets + explicit steps: one iterator per fit, not one per epoch.
    mixer = BatchMixer(mp.augmentation, tp.seed) if mp.augmentation.mixes else None
    ytr = _train_targets(targets(train.y), mp, train, teacher_file)
    train_ds = make_dataset(xtr, ytr, mp.batch_size, shuffle=True, seed=tp.seed, repeat=True,
                            mixer=mixer)
    val_ds = make_dataset(xva, targets(val.y), mp.batch_size, repeat=True)

    # 6. Fit in the (new or resumed) run, keeping the best epoch's full model.
    n_params = trainable_params(built.model)
    info = {"model_name": name, "arch": mp.arch, "pretrained": built.pretrained,
            "weights_source": built.weights_source, "precision": policy,
            "feature_cache": mp.uses_feature_cache, "trainable_params": n_params,
            "n_train": len(train), "n_val": len(val), "classes": ",".join(train.classes),
            "backend": keras.backend.backend()}
    rows = state.history_rows()
    with tracker.start(state.run_id(), info, data_files,
                       {"model": P.to_dict(mp), "train": P.to_dict(tp)}) as run:
        if run.run_id:
            state.save_run_id(run.run_id)
        logger = recipe.EpochLogger(mp.epochs, len(train), rows,
                                    [state.save_history, run.log_epoch])
        keeper = recipe.BestKeeper(built.model, state.best_model, mp.monitor,
                                   prior_best(rows, mp.monitor))
        # double_checkpoint: a crash while the backup is written (SIGKILL at an epoch's end)
        # leaves a truncated file; Keras then resumes from the previous epoch's copy
        callbacks = [*recipe.callbacks(mp, logger, keeper),
                     keras.callbacks.BackupAndRestore(str(state.backup_dir),
                                                      double_checkpoint=True)]
        log.info("training %s (%s, %d trainable params, %s, pretrained=%s, feature cache=%s) "
                 "on %d images, validating on %d", name, mp.arch, n_params, policy,
                 built.pretrained, mp.uses_feature_cache, len(train), len(val))
        t0 = time.perf_counter()
        fit_model.fit(train_ds, validation_data=val_ds, epochs=mp.epochs, steps_per_epoch=steps,
                      validation_steps=val_steps, callbacks=callbacks, verbose=tp.verbose,
                      class_weight=recipe.class_weights(train.y, n_classes)
                      if mp.class_weights else None)
        train_seconds = time.perf_counter() - t0

        # 7. The best epoch's full model is the result (the current one if no epoch ran).
        best = keras.saving.load_model(state.best_model) if state.best_model.is_file() \
            else built.model
        rows = logger.rows
        metrics = _final_metrics(best, mp, train, val, (xtr, xva) if mp.uses_feature_cache
                                 else None)
        metrics.update({
            "best_epoch": int(recipe.best_row(rows, mp.monitor)["epoch"]) + 1,
            "epochs_run": len(rows), "pretrained": built.pretrained, "trainable_params": n_params,
            "train_seconds": round(train_seconds, 1), "train_images": len(train),
            "seconds_per_epoch": _per_epoch(rows, "seconds"),
            "cpu_seconds_per_epoch": _per_epoch(rows, "cpu_seconds"),
            # What it was trained and validated on: evaluate ranks only models whose val split
            # is the current one.
            "data_md5_train": io.md5_file(data_files[0]), "data_md5_val": io.md5_file(data_files[1]),
        })
        run.log_result(metrics, rows, f"{name} ({mp.arch}, pretrained={built.pretrained})",
                       state.history_file, best, val.x[:4])
        save_model(best, model_path)

    # 8. Outputs (atomic), then the resume state goes.
    io.copy_file(state.history_file, out / "history.csv")
    TrainMetrics.parse(metrics, f"{name}'s training metrics").write(out / "metrics.json")
    summary = run.summary(info)
    if summary:
        io.write_json(out / "mlflow.json", summary)
    state.clear()
    log.info("%s: val_accuracy %.4f (best epoch %d), model %s%s", name, metrics["val_accuracy"],
             metrics["best_epoch"], model_path, f", MLflow run {run.run_id}" if run.run_id else "")
    return TrainResult(name, model_path, out / "metrics.json", out / "history.csv", metrics,
                       run.run_id, run.model_uri, logger.first_epoch or 0)


def _load_splits(train_file: Path, val_file: Path) -> tuple[SplitArrays, SplitArrays]:
    train, val = load_split(train_file), load_split(val_file)
    if train.classes != val.classes:
        raise FerError(f"train and val class lists differ: {train.classes} vs {val.classes}")
    return train, val


def _train_targets(onehot, mp: ModelParams, train: SplitArrays, path: Path | None):
    """The training targets: the labels, or with distillation on (a teacher file), (1 - w) *
    one-hot + w * the teachers' probabilities for the same image (validation keeps the labels)."""
    if path is None:
        return onehot
    teacher = load_soft_labels(path).aligned_to(train, path)
    w = mp.distill.weight
    log.info("distillation: targets = %.2f x label + %.2f x teachers' probabilities (%s; "
             "teachers agree with the labels on %.1f%% of the %d images)", 1 - w, w, path,
             100 * float((teacher.argmax(1) == train.y).mean()), len(train))
    return ((1 - w) * onehot + w * teacher).astype("float32")


def _fit_inputs(built, mp: ModelParams, train: SplitArrays, val: SplitArrays, state
                ) -> tuple[Any, Any, Any]:
    """(what fit trains, train inputs, val inputs): the head on cached frozen-base features
    (the base runs once, not per epoch), or the training model on the images."""
    if not mp.uses_feature_cache:
        return built.train_model, train.x, val.x
    from fer_pipeline.train.data import make_dataset

    def extract(split: SplitArrays):
        ds = make_dataset(split.x, split.y, max(mp.batch_size, 128))
        return built.extractor.predict(ds, verbose=0)

    xtr, xva = state.features(extract, train, val, label=mp.arch)
    return built.head, xtr, xva


def _final_metrics(best, mp: ModelParams, train: SplitArrays, val: SplitArrays,
                   features: tuple[Any, Any] | None) -> dict[str, float]:
    """Loss/accuracy of the kept model on the whole train and val splits (inference mode);
    on the cached features when there are some (same weights, the base is frozen)."""
    from fer_pipeline.train.data import make_dataset

    model, xtr, xva = best, train.x, val.x
    if features is not None:
        model, (xtr, xva) = best.get_layer("head"), features
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    bs = max(mp.batch_size, 128)
    tr = model.evaluate(make_dataset(xtr, train.y, bs), verbose=0, return_dict=True)
    va = model.evaluate(make_dataset(xva, val.y, bs), verbose=0, return_dict=True)
    return {"train_loss": float(tr["loss"]), "train_accuracy": float(tr["accuracy"]),
            "val_loss": float(va["loss"]), "val_accuracy": float(va["accuracy"])}


def _per_epoch(rows: list[dict], key: str) -> float | None:
    """Mean of `key` over the rows that have it (rows restored from a resume state written
    before `cpu_seconds` existed have none)."""
    vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return round(sum(vals) / len(vals), 2) if vals else None
