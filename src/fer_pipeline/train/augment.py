"""Augmentation as Keras preprocessing layers (backend-neutral; active only in training)."""

from __future__ import annotations

import keras

from fer_pipeline.params import AugmentParams


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
        # GaussianNoise takes a stddev in [0, 1]: applied on pixels scaled to 0..1 and back.
        layers += [keras.layers.Rescaling(1 / 255, name="aug_noise_in", dtype="float32"),
                   keras.layers.GaussianNoise(aug.noise / 255, name="aug_noise", **kw),
                   keras.layers.Rescaling(255.0, name="aug_noise_out", dtype="float32")]
    if (backend or keras.backend.backend()) == "jax":
        # RandomTranslation/RandomZoom declare supports_jit=False (a TensorFlow-XLA limit), and
        # one such layer makes Keras run the whole train step eagerly, op by op: on JAX that
        # was 316 s per epoch instead of 1.3 s on an H200. Their JAX ops compile fine.
        for layer in layers:
            layer.supports_jit = True
    return layers
