"""Model builders (Keras 3 layers and ops only, so every backend runs them).

Every model takes raw grayscale pixels, float32 0..255, shape (48, 48, 1). Augmentation,
pixel scaling, resizing and grayscale-to-RGB are layers inside the model, so data on disk stays
48x48 uint8 and the logged model needs no outside preprocessing.

Transfer models are built as `extractor` (scaling, resize, RGB, frozen base, global pooling) and
`head` (dense layers), composed into the full model; with a frozen base and no augmentation the
training stage runs the extractor once and trains the head on cached features.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import keras

from fer_pipeline.errors import FerError
from fer_pipeline.io import md5_file
from fer_pipeline.params import ModelParams
from fer_pipeline.train.augment import augmentation_layers

log = logging.getLogger(__name__)

# The notop ImageNet files and their published MD5s (keras/src/applications/vgg16.py and
# resnet.py, `file_hash`): a download or a cached copy with another hash is never loaded.
IMAGENET_FILES = {
    "vgg16": ("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
              "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/",
              "6d6bbae143d832006294945121d1f1fc"),
    "resnet50": ("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 "https://storage.googleapis.com/tensorflow/keras-applications/resnet/",
                 "4d473c1dd8becc155b73f8504c6f6626"),
}
# "caffe" preprocessing of VGG16/ResNet50: BGR, minus the ImageNet channel means. The input is
# gray replicated to 3 channels, so channel order does not matter.
CAFFE_MEAN = [103.939, 116.779, 123.68]


class WeightsUnavailable(FerError):
    """Pretrained weights were asked for but cannot be had."""


@dataclass
class BuiltModel:
    model: keras.Model                     # inference model (saved, logged): no augmentation
    train_model: keras.Model               # what `fit` trains: augmentation + `model`
    extractor: keras.Model | None = None   # frozen part (transfer models)
    head: keras.Model | None = None        # trainable part on extractor features
    pretrained: bool = False
    weights_source: str = "none"


def keras_models_dir() -> Path:
    home = os.environ.get("KERAS_HOME") or str(Path.home() / ".keras")
    return Path(home) / "models"


def resolve_weights(arch: str, weights: str | None, name: str = "") -> str | None:
    """Return what to pass as `weights=` to keras.applications, or raise a clear error."""
    if weights is None:
        return None
    key = f"models.{name or arch}.weights"
    if weights != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailable(f"{key}: weights file not found: {path}")
        return str(path)
    fname, base_url, md5 = IMAGENET_FILES[arch]
    cached = keras_models_dir() / fname
    if cached.is_file():
        found = md5_file(cached)
        if found != md5:
            raise WeightsUnavailable(
                f"{key}: the cached ImageNet weights {cached} do not have the published hash "
                f"(MD5 expected {md5}, found {found}): a partial download or another file. "
                f"Delete it (the next run downloads it again) or replace it with the file from "
                f"{base_url}{fname}; or set {key} to a local file you trust, or to null.")
        return str(cached)
    # Not cached: try to download once, with a short timeout (works on a machine with internet);
    # get_file checks the published hash and refuses a file that does not match.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        return keras.utils.get_file(fname, base_url + fname, cache_subdir="models",
                                    file_hash=md5, hash_algorithm="md5")
    except Exception as exc:  # noqa: BLE001 - any failure means: no weights here
        reason = f"{type(exc).__name__}: {exc}"
    finally:
        socket.setdefaulttimeout(old)
    raise WeightsUnavailable(
        f"{key} is 'imagenet' but the ImageNet weights for {arch} are not available: "
        f"they are not in the Keras cache ({cached}) and this machine cannot download them "
        f"({reason}). Provide the file: copy {fname} (from {base_url}{fname}, MD5 {md5}) to "
        f"{cached} (or set KERAS_HOME), or set {key} to an explicit local path to the .h5 file; "
        f"or set {key}: null to train without pretrained weights (recorded as pretrained=false)."
    )


def build_custom_cnn(mp: ModelParams, num_classes: int, image_size: int = 48,
                     seed: int | None = None, name: str = "") -> BuiltModel:
    inp = keras.Input((image_size, image_size, 1), name="image", dtype="float32")
    x = scale_pixels(inp, mp)
    for i, f in enumerate(mp.conv_filters):
        x = keras.layers.Conv2D(mp.scaled(f), 3, padding="same", use_bias=False,
                                name=f"conv{i + 1}")(x)
        x = keras.layers.BatchNormalization(momentum=mp.bn_momentum, name=f"bn{i + 1}")(x)
        x = keras.layers.Activation("relu", name=f"relu{i + 1}")(x)
        if i > 0:
            x = keras.layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
            x = keras.layers.Dropout(0.25, name=f"drop{i + 1}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    for i, u in enumerate(mp.dense_units):
        if mp.dense_bn:
            x = keras.layers.Dense(mp.scaled(u), use_bias=False, name=f"dense{i + 1}")(x)
            x = keras.layers.BatchNormalization(momentum=mp.bn_momentum,
                                                name=f"dense_bn{i + 1}")(x)
            x = keras.layers.Activation("relu", name=f"dense_relu{i + 1}")(x)
        else:
            x = keras.layers.Dense(mp.scaled(u), activation="relu", name=f"dense{i + 1}")(x)
        x = keras.layers.Dropout(mp.dropout, name=f"dense_drop{i + 1}")(x)
    out = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                             name="predictions")(x)
    model = keras.Model(inp, out, name="custom_cnn")
    return BuiltModel(model, with_augmentation(model, mp, image_size, seed))


STD_FLOOR = 1.0   # grey levels: the std of a (near-)flat image is not amplified beyond 1/this


def scale_pixels(x, mp: ModelParams):
    """0..255 pixels -> the network's input scale, per `mp.preprocessing` (not "base").

    rescale: x / 255 (the study). standardize: each image to mean 0 and std 1, so the network
    sees the same input for a face made darker, brighter (towards white) or flatter: those are
    affine maps of the pixels, which standardizing undoes exactly (the corruption suite's dark,
    bright and contrast columns). Built from keras.ops on the symbolic tensor, so the saved model
    needs no custom class to load (Keras, MLflow, ONNX)."""
    if mp.preprocessing == "standardize":
        mean = keras.ops.mean(x, axis=(1, 2, 3), keepdims=True)
        std = keras.ops.std(x, axis=(1, 2, 3), keepdims=True)
        return (x - mean) / keras.ops.maximum(std, STD_FLOOR)
    return keras.layers.Rescaling(1.0 / 255, name="rescale")(x)


def with_augmentation(model: keras.Model, mp: ModelParams, image_size: int,
                      seed: int | None) -> keras.Model:
    """Training wrapper: augmentation layers in front of the inference model. Augmentation
    stays out of the saved model (it is training-only, and keeps the file loadable anywhere)."""
    layers = augmentation_layers(mp.augmentation, seed)
    if not layers:
        return model
    inp = keras.Input((image_size, image_size, 1), name="image", dtype="float32")
    x = inp
    for layer in layers:
        x = layer(x)
    return keras.Model(inp, model(x), name=f"{model.name}_train")


def build_transfer(mp: ModelParams, num_classes: int, image_size: int = 48,
                   seed: int | None = None, name: str = "") -> BuiltModel:
    weights = resolve_weights(mp.arch, mp.weights, name)
    size = mp.input_size
    app = {"vgg16": keras.applications.VGG16, "resnet50": keras.applications.ResNet50}[mp.arch]
    base = app(include_top=False, weights=weights, input_shape=(size, size, 3))
    base.trainable = not mp.freeze_base

    # Extractor: raw 48x48x1 pixels -> pooled base features.
    ex_in = keras.Input((image_size, image_size, 1), name="pixels", dtype="float32")
    x = keras.layers.Resizing(size, size, name="resize", dtype="float32")(ex_in)
    x = keras.layers.Concatenate(axis=-1, name="gray_to_rgb", dtype="float32")([x, x, x])
    if mp.preprocessing != "base":
        x = scale_pixels(x, mp)
    else:
        x = keras.layers.Normalization(mean=CAFFE_MEAN, variance=[1.0, 1.0, 1.0],
                                       name="base_preprocess")(x)
    x = base(x, training=False if mp.freeze_base else None)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    extractor = keras.Model(ex_in, x, name=f"{mp.arch}_extractor")

    feat = keras.Input((int(x.shape[-1]),), name="features")
    h = feat
    if mp.feature_norm:
        # Without ImageNet weights the frozen base's pooled features are tiny and uneven in
        # scale (He-less random init through 13-50 layers); standardising them lets the head learn.
        h = keras.layers.BatchNormalization(momentum=mp.bn_momentum, name="feature_norm")(h)
    for i, u in enumerate(mp.dense_units):
        h = keras.layers.Dense(mp.scaled(u), activation="relu", name=f"dense{i + 1}")(h)
        h = keras.layers.Dropout(mp.dropout, name=f"dense_drop{i + 1}")(h)
    h = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                           name="predictions")(h)
    head = keras.Model(feat, h, name="head")

    inp = keras.Input((image_size, image_size, 1), name="image", dtype="float32")
    model = keras.Model(inp, head(extractor(inp)), name=mp.arch)
    source = "none" if weights is None else ("imagenet" if mp.weights == "imagenet" else weights)
    return BuiltModel(model, with_augmentation(model, mp, image_size, seed), extractor, head,
                      pretrained=weights is not None, weights_source=source)


def build_fernet(mp: ModelParams, num_classes: int, image_size: int = 48,
                 seed: int | None = None, name: str = "") -> BuiltModel:
    """The fifth model: a VGG-style network sized for 48x48 faces and a CPU budget.

    Stages of `blocks_per_stage` conv-BN-ReLU blocks (one count, or one per stage: the 48-px
    stage holds half the activations, so one conv there is the cheapest cut of time) at widths
    `conv_filters`, each followed by 2x2 max-pooling (48 -> 24 -> 12 -> 6 -> 3), then global
    average pooling, dropout and the classifier. No large dense layer: ~1.2M parameters and
    ~0.24 GFLOPs per image instead of the custom CNN's 17M and ~0.37, so more epochs fit in the
    same time.

    `members` > 1: that many such networks (own initialisation, own dropout) side by side on
    the same input. The training model outputs each member's probabilities, (N, members,
    classes), and the loss is the mean of the members' own cross-entropies, so each learns as
    if alone (an ensemble, not one wide network); the saved model outputs their mean, so
    evaluate, export, predict and serve see one ordinary classifier."""
    inp = keras.Input((image_size, image_size, 1), name="image", dtype="float32")
    x = scale_pixels(inp, mp)
    if mp.members == 1:
        model = keras.Model(inp, _fernet_body(x, mp, num_classes), name="fernet")
        return BuiltModel(model, with_augmentation(model, mp, image_size, seed))
    members = []
    for m in range(mp.members):
        m_in = keras.Input(tuple(x.shape[1:]), name=f"m{m + 1}_input", dtype="float32")
        members.append(keras.Model(m_in, _fernet_body(m_in, mp, num_classes),
                                   name=f"member{m + 1}"))
    stacked = keras.Model(inp, keras.ops.stack([mem(x) for mem in members], axis=1),
                          name="fernet_members")
    out_in = keras.Input((image_size, image_size, 1), name="image", dtype="float32")
    model = keras.Model(out_in, keras.ops.mean(stacked(out_in), axis=1), name="fernet")
    train = with_augmentation(stacked, mp, image_size, seed)
    if train is stacked:   # fit compiles what it trains: never a part of the saved model
        t_in = keras.Input((image_size, image_size, 1), name="image", dtype="float32")
        train = keras.Model(t_in, stacked(t_in), name="fernet_train")
    return BuiltModel(model, train)


def _fernet_body(x, mp: ModelParams, num_classes: int):
    """fernet from scaled pixels to class probabilities."""
    for s, (f, blocks) in enumerate(zip(mp.conv_filters, mp.stage_blocks(), strict=True)):
        for b in range(blocks):
            x = keras.layers.Conv2D(mp.scaled(f), 3, padding="same", use_bias=False,
                                    name=f"s{s + 1}_conv{b + 1}")(x)
            x = keras.layers.BatchNormalization(momentum=mp.bn_momentum,
                                                name=f"s{s + 1}_bn{b + 1}")(x)
            x = keras.layers.Activation("relu", name=f"s{s + 1}_relu{b + 1}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"s{s + 1}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    for i, u in enumerate(mp.dense_units):
        x = keras.layers.Dropout(mp.dropout, name=f"dense_drop{i + 1}")(x)
        x = keras.layers.Dense(mp.scaled(u), activation="relu", name=f"dense{i + 1}")(x)
    x = keras.layers.Dropout(mp.dropout, name="head_drop")(x)
    return keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                              name="predictions")(x)


# One builder per `arch` of params.py's ARCH_CLASSES (a test checks both list the same archs).
BUILDERS = {"custom_cnn": build_custom_cnn, "fernet": build_fernet,
            "vgg16": build_transfer, "resnet50": build_transfer}


def build_model(mp: ModelParams, num_classes: int, image_size: int = 48,
                seed: int | None = None, name: str = "") -> BuiltModel:
    """The network `mp.arch` names; `name` (the models.<name> key) is for error messages."""
    return BUILDERS[mp.arch](mp, num_classes, image_size, seed, name)


def trainable_params(model: keras.Model) -> int:
    return int(sum(math.prod(w.shape) for w in model.trainable_weights))
