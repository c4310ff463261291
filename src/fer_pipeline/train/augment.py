"""Augmentation as Keras preprocessing layers (backend-neutral; active only in training), and
mixup/CutMix, which mix the targets too and so run where batches are made."""

from __future__ import annotations

import keras
import numpy as np

from fer_pipeline.params import AugmentParams


@keras.saving.register_keras_serializable(package="fer_pipeline")
class RandomNoise(keras.layers.Layer):
    """Additive Gaussian sensor noise whose std is drawn per image from [0, max_std] grey
    levels, clipped to 0..255; identity at inference. Keras' GaussianNoise gives every image
    the same std, so a network trained with it never sees a clean face: at std 16 it lost 2.6 pt
    of clean validation accuracy (experiments/journal.md 2026-11-29 16:35-18:27)."""

    def __init__(self, max_std: float, seed: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_std, self.seed = float(max_std), seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=False):
        if not training:
            return x
        std = keras.random.uniform((keras.ops.shape(x)[0], 1, 1, 1), 0.0, self.max_std,
                                   seed=self.generator)
        noise = keras.random.normal(keras.ops.shape(x), seed=self.generator)
        return keras.ops.clip(x + std * noise, 0.0, 255.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "max_std": self.max_std, "seed": self.seed}


def augmentation_layers(aug: AugmentParams, seed: int | None = None,
                        backend: str | None = None) -> list[keras.layers.Layer]:
    """The study's ImageDataGenerator settings as Keras 3 layers. Layers run in float32.
    `backend` defaults to Keras' own (a parameter so tests can check the JAX case)."""
    layers: list[keras.layers.Layer] = []
    kw = {"dtype": "float32", "seed": seed}
    if aug.rotation:
        # RandomRotation's factor is a fraction of a full turn.
        layers.append(keras.layers.RandomRotation(aug.rotation / 360.0, fill_mode=aug.fill_mode,
                                                  name="aug_rotation", **kw))
    if aug.width_shift or aug.height_shift:
        layers.append(keras.layers.RandomTranslation(aug.height_shift, aug.width_shift,
                                                     fill_mode=aug.fill_mode,
                                                     name="aug_shift", **kw))
    if aug.shear:
        layers.append(keras.layers.RandomShear(x_factor=aug.shear, y_factor=aug.shear,
                                               fill_mode=aug.fill_mode, name="aug_shear", **kw))
    if aug.zoom:
        layers.append(keras.layers.RandomZoom(aug.zoom, aug.zoom, fill_mode=aug.fill_mode,
                                              name="aug_zoom", **kw))
    if aug.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", name="aug_flip", **kw))
    if aug.contrast:
        layers.append(keras.layers.RandomContrast(aug.contrast, value_range=(0, 255),
                                                  name="aug_contrast", **kw))
    if aug.random_erasing:
        # Erases one rectangle (2-33% of the image) with noise, with this probability per image.
        layers.append(keras.layers.RandomErasing(factor=aug.random_erasing, value_range=(0, 255),
                                                 name="aug_erasing", **kw))
    if aug.brightness:
        layers.append(keras.layers.RandomBrightness(aug.brightness, value_range=(0, 255),
                                                    name="aug_brightness", **kw))
    if aug.blur:
        # sigma up to 1.8 px at 48x48: the suite's strongest blur
        layers.append(keras.layers.RandomGaussianBlur(aug.blur, kernel_size=5, sigma=(0.1, 1.8),
                                                      value_range=(0, 255), name="aug_blur", **kw))
    if aug.noise:
        layers.append(RandomNoise(aug.noise, name="aug_noise", **kw))
    if (backend or keras.backend.backend()) == "jax":
        # RandomTranslation/RandomZoom declare supports_jit=False (a TensorFlow-XLA limit), and
        # one such layer makes Keras run the whole train step eagerly, op by op: on JAX that
        # was 316 s per epoch instead of 1.3 s on an H200. Their JAX ops compile fine.
        for layer in layers:
            layer.supports_jit = True
    return layers


class BatchMixer:
    """mixup and CutMix on a training batch of float images and one-hot targets, in numpy so
    every backend's feeder runs the same code. Each image is mixed with another of the batch
    (a random permutation) with a weight lam ~ Beta(alpha, alpha) drawn per batch; CutMix
    pastes a rectangle of about 1 - lam of the area and weighs the targets by the area pasted.
    Geometric and photometric layers then act on the mixed image."""

    def __init__(self, aug: AugmentParams, seed: int = 0) -> None:
        self.mixup, self.cutmix = aug.mixup, aug.cutmix
        self.rng = np.random.default_rng(seed)

    def __call__(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        perm = self.rng.permutation(len(x))
        cut = bool(self.cutmix) and (not self.mixup or self.rng.random() < 0.5)
        alpha = self.cutmix if cut else self.mixup
        lam = float(self.rng.beta(alpha, alpha))
        if cut:
            h, w = x.shape[1:3]
            ch, cw = round(h * np.sqrt(1 - lam)), round(w * np.sqrt(1 - lam))
            cy, cx = int(self.rng.integers(h)), int(self.rng.integers(w))
            y0, y1 = max(cy - ch // 2, 0), min(cy - ch // 2 + ch, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx - cw // 2 + cw, w)
            x = x.copy()
            x[:, y0:y1, x0:x1] = x[perm, y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)     # the area actually pasted
        else:
            x = lam * x + (1.0 - lam) * x[perm]
        return x, (lam * y + (1.0 - lam) * y[perm]).astype(np.float32)
