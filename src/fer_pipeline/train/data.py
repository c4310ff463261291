"""Feeding in-memory arrays to `fit`: tf.data on the TensorFlow backend, a backend-neutral
`keras.utils.PyDataset` of numpy batches elsewhere (JAX, torch)."""

from __future__ import annotations

import math
from collections.abc import Callable

import keras
import numpy as np

Mixer = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


class ArrayBatches(keras.utils.PyDataset):
    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool,
                 seed: int = 0, mixer: Mixer | None = None) -> None:
        super().__init__()
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.mixer = mixer
        self.rng = np.random.default_rng(seed)
        self.order = np.arange(len(y))
        if shuffle:
            self.rng.shuffle(self.order)

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __getitem__(self, i: int):
        idx = np.sort(self.order[i * self.batch_size:(i + 1) * self.batch_size])
        batch = self.x[idx].astype(np.float32), self.y[idx]
        return self.mixer(*batch) if self.mixer else batch

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self.rng.shuffle(self.order)


def make_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool = False,
                 seed: int = 0, repeat: bool = False, mixer: Mixer | None = None):
    """Batches of (float32 x, y). x stays uint8 in memory; batches are gathered by index,
    cast to float32 and prefetched, so the input pipeline never decodes or copies per image.

    repeat=True gives an endless dataset (pass steps_per_epoch to fit): Keras then keeps one
    iterator for the whole fit instead of building and destroying one per epoch. The gather is
    a plain sequential map (microseconds per batch): on 2 cores a parallel map only adds
    threads, and a training was once seen to hang for good when a per-epoch iterator was torn
    down (main thread in IteratorResource::~IteratorResource, two worker threads spinning).

    `mixer` (training: mixup/CutMix) maps each (x, y) batch; y must then be one-hot."""
    if keras.backend.backend() != "tensorflow":
        return ArrayBatches(x, y, batch_size, shuffle, seed, mixer)
    import tensorflow as tf

    xt = tf.constant(x)
    yt = tf.constant(y)
    ds = tf.data.Dataset.range(len(y))
    if shuffle:
        ds = ds.shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(
        lambda idx: (tf.cast(tf.gather(xt, idx), tf.float32), tf.gather(yt, idx)))
    if mixer is not None:
        def mix(xb, yb):
            xm, ym = tf.numpy_function(mixer, [xb, tf.cast(yb, tf.float32)],
                                       [tf.float32, tf.float32])
            return tf.ensure_shape(xm, xb.shape), tf.ensure_shape(ym, yb.shape)
        ds = ds.map(mix)
    if repeat:
        ds = ds.repeat()
    return ds.prefetch(2)
