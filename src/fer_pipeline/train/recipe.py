"""How a model is trained, from its `models.<name>` params: optimizer and schedule, loss and
targets, class weights, and the callbacks that run each epoch (progress/history, best-epoch
model, early stopping, learning-rate reduction). Keras only; nothing here knows MLflow or
where the resume state lives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from fer_pipeline.params import ModelParams
from fer_pipeline.train.artifacts import save_model

log = logging.getLogger(__name__)



def optimizer(mp: ModelParams, steps_per_epoch: int = 1) -> keras.optimizers.Optimizer:
    lr: Any = mp.learning_rate
    if mp.lr_schedule == "cosine":
        warmup = mp.warmup_epochs * steps_per_epoch
        total = max(1, mp.epochs * steps_per_epoch - warmup)
        # Warm-up from lr/10 to lr, then cosine decay to 1% of lr over the remaining epochs.
        lr = keras.optimizers.schedules.CosineDecay(
            lr / 10 if warmup else lr, total, alpha=0.01,
            warmup_target=lr if warmup else None, warmup_steps=warmup)
    # Keras keeps the averaged weights in the optimizer; EmaSwap puts them in the model.
    ema: dict[str, Any] = {"use_ema": True, "ema_momentum": mp.ema} if mp.ema else {}
    if mp.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=lr, weight_decay=mp.weight_decay, **ema)
    if mp.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=0.9, nesterov=True,
                                    weight_decay=mp.weight_decay or None, **ema)
    cls = {"adam": keras.optimizers.Adam, "rmsprop": keras.optimizers.RMSprop}[mp.optimizer]
    return cls(learning_rate=lr, **ema)


def loss_and_targets(mp: ModelParams, n_classes: int
                     ) -> tuple[Any, Any, Callable[[np.ndarray], np.ndarray]]:
    """Sparse cross-entropy (the study), or one-hot targets with label smoothing, mixing
    (mixup/CutMix mix the targets) or distillation (the teachers' probabilities mixed in).
    Returns (loss, accuracy metric, function mapping int labels to the targets fit needs)."""
    eye = np.eye(n_classes, dtype=np.float32)
    if getattr(mp, "members", 1) > 1:          # fernet: an ensemble in one model
        return (members_loss(mp.label_smoothing),
                keras.metrics.MeanMetricWrapper(ensemble_accuracy, name="accuracy"),
                lambda y: eye[y])
    if not mp.label_smoothing and not mp.augmentation.mixes and not mp.distill.on:
        return "sparse_categorical_crossentropy", "accuracy", lambda y: y
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=mp.label_smoothing)
    return loss, keras.metrics.CategoricalAccuracy(name="accuracy"), lambda y: eye[y]


def members_loss(label_smoothing: float) -> Callable[[Any, Any], Any]:
    """Loss of an ensemble's training model (output (N, members, classes), one-hot targets):
    each member's own cross-entropy, averaged over members, so no member leans on another."""

    def loss(y_true, y_pred):
        y = keras.ops.broadcast_to(keras.ops.expand_dims(y_true, 1), keras.ops.shape(y_pred))
        ce = keras.losses.categorical_crossentropy(y, y_pred, label_smoothing=label_smoothing)
        return keras.ops.mean(ce, axis=1)

    loss.__name__ = "members_crossentropy"
    return loss


def ensemble_accuracy(y_true, y_pred):
    """Accuracy of the members' mean probability: what the saved model answers."""
    return keras.metrics.categorical_accuracy(y_true, keras.ops.mean(y_pred, axis=1))


def compile_for_fit(model: keras.Model, mp: ModelParams, n_classes: int,
                    steps_per_epoch: int) -> Callable[[np.ndarray], np.ndarray]:
    """Compile `model` with the recipe's optimizer, loss and metric; returns the targets map."""
    loss, metric, targets = loss_and_targets(mp, n_classes)
    model.compile(optimizer=optimizer(mp, steps_per_epoch), loss=loss, metrics=[metric])
    return targets


def class_weights(y: np.ndarray, n_classes: int) -> dict[int, float]:
    """sklearn's "balanced" weights, for the classes present in `y`."""
    counts = np.bincount(y, minlength=n_classes).astype(float)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = len(y) / (present.sum() * counts[present])
    return {i: float(w[i]) for i in range(n_classes) if present[i]}


def mode(monitor: str) -> str:
    """"max" for accuracies, "min" for losses."""
    return "max" if monitor.endswith("accuracy") else "min"


def best_row(rows: Sequence[dict[str, Any]], monitor: str) -> dict[str, Any]:
    pick = max if mode(monitor) == "max" else min
    return pick(rows, key=lambda r: float(r[monitor]))


class EpochLogger(keras.callbacks.Callback):
    """One progress line per epoch, and the history rows (restored ones first) handed to
    `listeners` after each epoch (resume state, MLflow)."""

    def __init__(self, total_epochs: int, n_images: int, rows: list[dict[str, Any]],
                 listeners: Sequence[Callable[[list[dict[str, Any]]], None]] = ()) -> None:
        super().__init__()
        self.total, self.n = total_epochs, n_images
        self.rows = list(rows)
        self.listeners = list(listeners)
        self.first_epoch: int | None = None
        self._t0 = self._cpu0 = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        if self.first_epoch is None:
            self.first_epoch = epoch
            # Drop rows of epochs that will be redone (killed before their backup).
            self.rows = [r for r in self.rows if int(r["epoch"]) < epoch]
            if epoch:
                log.info("resuming from epoch %d (epochs 1-%d restored)", epoch + 1, epoch)
        self._t0, self._cpu0 = time.perf_counter(), time.process_time()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        secs = time.perf_counter() - self._t0
        # CPU seconds of all threads: the work done, which a VM's stolen vCPU time does not
        # inflate (wall time there snaps to a few values whatever the network;
        # experiments/journal.md 2026-12-07 03:52), so two recipes compare on it
        cpu = time.process_time() - self._cpu0
        lr = logs.get("learning_rate")
        if lr is None:
            try:
                lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            except Exception:  # noqa: BLE001 - a schedule object: not worth failing over
                lr = float("nan")
        row = {"epoch": epoch, "seconds": round(secs, 3), "cpu_seconds": round(cpu, 3),
               "learning_rate": float(lr)}
        for k in ("loss", "accuracy", "val_loss", "val_accuracy"):
            row[k] = float(logs.get(k, float("nan")))
        self.rows.append(row)
        for listener in self.listeners:
            listener(self.rows)
        log.info("epoch %d/%d  loss %.4f  acc %.4f  val_loss %.4f  val_acc %.4f  "
                 "lr %.2g  %.1fs (%.0f img/s, %.1f CPU s)", epoch + 1, self.total, row["loss"],
                 row["accuracy"], row["val_loss"], row["val_accuracy"], row["learning_rate"],
                 secs, self.n / max(secs, 1e-9), cpu)


class BestKeeper(keras.callbacks.Callback):
    """Keeps the full model of the best epoch (by `monitor`) in `path`, atomically."""

    def __init__(self, full_model: keras.Model, path: Path, monitor: str,
                 prior_best: float | None) -> None:
        super().__init__()
        self.full, self.path, self.monitor = full_model, path, monitor
        self.sign = 1.0 if mode(monitor) == "max" else -1.0
        self.best = prior_best
        self.best_epoch: int | None = None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        if self.best is None or self.sign * (value - self.best) > 0 or not self.path.exists():
            self.best, self.best_epoch = float(value), epoch
            save_model(self.full, self.path)


class EmaSwap:
    """Puts the optimizer's moving average of the weights (`ema` > 0) into the model for
    validation and for everything that reads the weights at an epoch's end (best-model keeper,
    early stopping), and the raw weights back before the next steps and the resume backup (so a
    resumed run continues from the raw weights). `first` goes first in the callback list, `last`
    after every callback that should see the averaged weights. Keras' SwapEMAWeights cannot be
    split so.

    BatchNorm's moving statistics are averaged alongside (same momentum, after every step) and
    swapped with the weights: the optimizer averages only trainable variables, and averaged
    weights with the raw weights' statistics lost 1.0 pt of validation accuracy at the
    24-epoch CPU budget (experiments/journal.md 2026-11-29 16:35-18:27). After a resume that average
    restarts from the current statistics (it spans the last ~1/(1 - ema) steps)."""

    def __init__(self, momentum: float) -> None:
        self.momentum = momentum
        self.averaged = False     # whether the model holds the averaged weights now
        self.stats: list[tuple[Any, Any]] | None = None    # (BN statistic, its average)
        self.first, self.last = _EmaIn(self), _EmaOut(self)

    def track(self, model: keras.Model) -> None:
        """After a training step: fold the BatchNorm statistics into their average."""
        if self.stats is None:
            self.stats = [(v, keras.Variable(keras.ops.convert_to_numpy(v), trainable=False))
                          for layer in _layers(model)
                          if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
                          for v in (layer.moving_mean, layer.moving_variance)]
            return                # the average starts at the first step's values, as Keras' does
        m = self.momentum
        for var, avg in self.stats:
            avg.assign(m * avg + (1.0 - m) * var)

    def swap(self, model: keras.Model) -> None:
        opt = model.optimizer
        opt = getattr(opt, "inner_optimizer", opt)            # LossScaleOptimizer (fp16)
        # Private Keras attributes, as SwapEMAWeights uses them (keras 3.x).
        pairs = list(zip(opt._trainable_variables, opt._model_variables_moving_average,
                         strict=True)) + list(self.stats or [])
        for var, avg in pairs:
            raw = keras.ops.convert_to_numpy(var)
            var.assign(keras.ops.convert_to_numpy(avg))
            avg.assign(raw)
        self.averaged = not self.averaged

    def to(self, model: keras.Model, averaged: bool) -> None:
        if self.averaged != averaged:
            self.swap(model)


def _layers(model: keras.Layer) -> list[keras.Layer]:
    """Every layer inside `model`, nested models included."""
    out = []
    for layer in getattr(model, "layers", []):
        out += [layer, *_layers(layer)]
    return out


class _EmaCallback(keras.callbacks.Callback):
    def __init__(self, ema: EmaSwap) -> None:
        super().__init__()
        self.ema = ema


class _EmaIn(_EmaCallback):
    """Averaged weights for validation and for the epoch-end callbacks after it."""

    def on_train_batch_end(self, batch, logs=None):
        self.ema.track(self.model)

    def on_test_begin(self, logs=None):
        self.ema.to(self.model, True)

    def on_test_end(self, logs=None):
        self.ema.to(self.model, False)

    def on_epoch_end(self, epoch, logs=None):
        self.ema.to(self.model, True)


class _EmaOut(_EmaCallback):
    """Raw weights again for the next steps and the resume backup."""

    def on_epoch_end(self, epoch, logs=None):
        self.ema.to(self.model, False)


def callbacks(mp: ModelParams, logger: EpochLogger, keeper: BestKeeper
              ) -> list[keras.callbacks.Callback]:
    """The epoch logger and best-model keeper, then the schedule and early stopping; with `ema`
    all of them see the averaged weights (validation included)."""
    out: list[keras.callbacks.Callback] = [logger, keeper]
    if mp.lr_schedule == "plateau":   # a cosine schedule owns the learning rate itself
        out.append(keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=mp.reduce_lr.factor, patience=mp.reduce_lr.patience,
            min_delta=mp.reduce_lr.min_delta, min_lr=mp.reduce_lr.min_lr, verbose=1))
    out.append(keras.callbacks.EarlyStopping(
        monitor=mp.monitor, mode=mode(mp.monitor), patience=mp.early_stopping_patience,
        restore_best_weights=True, verbose=1))
    if mp.ema:
        swap = EmaSwap(mp.ema)
        out = [swap.first, *out, swap.last]
    return out
