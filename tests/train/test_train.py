"""Training stage: tiny synthetic arrays, shrunk models, 1-3 epochs, weights null."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fer_pipeline import params as P
from fer_pipeline.arrays import SplitArrays, save_split
from fer_pipeline.errors import FerError, ParamsError
from fer_pipeline.synthetic import CLASSES
from fer_pipeline.tracking import TrackingUnavailable
from sandbox import ROOT, TINY_CNN, tiny_params

FER = str(Path(sys.executable).parent / "fer")
# sandbox.TINY_CNN stops after one epoch without progress; these tests count epochs.
CNN = {**TINY_CNN, "arch": "custom_cnn", "epochs": 2, "early_stopping_patience": 10}


def _split(n: int, seed: int) -> SplitArrays:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(CLASSES)
    x = rng.integers(0, 256, (n, 48, 48, 1), dtype=np.uint8)
    x[:, :12, :12, 0] = (y * 36)[:, None, None]  # a learnable cue
    return SplitArrays(x, y.astype(np.int64), np.array([f"s/{i}.jpg" for i in range(n)]),
                       np.array(["Training"] * n), CLASSES)


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("processed")
    for split, n, seed in [("train", 112, 0), ("val", 42, 1), ("test", 42, 2)]:
        save_split(d / f"{split}.npz", _split(n, seed))
    return d


def _raw_params(tmp: Path, models: dict, **mlflow) -> dict:
    """params.yaml (through the one builder) with these models, outputs under `tmp`."""
    return tiny_params(models=models, mlflow=mlflow, train={
        "models_dir": str(tmp / "models"), "reports_dir": str(tmp / "reports"),
        "state_dir": str(tmp / "state")})


def _params(tmp: Path, name: str, recipe: dict, **mlflow) -> tuple[P.ModelParams, P.Params]:
    p = P.from_dict(_raw_params(tmp, {name: recipe}, **mlflow))
    return p.model(name), p


def _params_file(tmp: Path, models: dict, **mlflow) -> Path:
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(_raw_params(tmp, models, **mlflow)))
    return path


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(extra)
    return env


def _closed_port_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_default_params_parse_and_custom_cnn_has_17m_params():
    import keras

    from fer_pipeline.train.models import build_model, trainable_params

    models = P.load(ROOT / "params.yaml").models
    assert set(models) == {"custom_cnn", "custom_cnn_aug", "vgg16", "resnet50", "fernet"}
    assert models["custom_cnn_aug"].augmentation.enabled
    assert models["resnet50"].class_weights
    keras.mixed_precision.set_global_policy("float32")
    n = trainable_params(build_model(models["custom_cnn"], 7).model)
    assert abs(n - 17_044_871) < 50_000, n


def test_unknown_model_key_is_rejected():
    with pytest.raises(ParamsError, match="unknown key models.x.epochz"):
        P.from_dict({"models": {"x": {"arch": "custom_cnn", "epochz": 3}}})


@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_imagenet_weights_unavailable_gives_clear_error(name, tmp_path, monkeypatch):
    from fer_pipeline.train.models import build_model

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    mp = P.load(ROOT / "params.yaml").model(name)
    assert mp.weights == "imagenet"
    with pytest.raises(FerError) as err:
        build_model(mp, 7, name=name)
    msg = str(err.value)
    assert "cannot download" in msg and str(tmp_path / "keras" / "models") in msg
    assert "local path" in msg and "null" in msg


def test_train_logs_run_and_model_to_real_mlflow_server(processed, tmp_path, mlflow_server,
                                                        monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from fer_pipeline.train.stage import train_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("FER_PIPELINE_RUN_ID", "pipe-test-1")
    mp, p = _params(tmp_path, "cnn", {**CNN, "augmentation": {
        "rotation": 40, "width_shift": 0.2, "height_shift": 0.2, "shear": 0.2, "zoom": 0.2,
        "horizontal_flip": True}}, experiment="fer-test", log_model=True)
    res = train_model("cnn", mp, p.train, p.mlflow, processed_dir=processed)

    metrics = json.loads(res.metrics_path.read_text())
    assert metrics["epochs_run"] == 2 and metrics["pretrained"] is False
    assert 0.0 <= metrics["val_accuracy"] <= 1.0 and "train_accuracy" in metrics
    hist = res.history_path.read_text().splitlines()
    assert hist[0].startswith("epoch,") and len(hist) == 3
    assert res.model_path.is_file()
    assert not (tmp_path / "state" / "cnn").exists()  # resume state cleared on success
    side = json.loads((tmp_path / "reports" / "cnn" / "mlflow.json").read_text())
    assert side["run_id"] == res.run_id and side["model_uri"] == res.model_uri
    assert side["pipeline_run_id"] == "pipe-test-1" and side["tracking_uri"] == mlflow_server

    client = MlflowClient(mlflow_server)
    run = client.get_run(res.run_id)
    exp = client.get_experiment_by_name("fer-test")
    assert run.info.experiment_id == exp.experiment_id
    assert run.data.params["model.arch"] == "custom_cnn"
    assert run.data.params["model.augmentation.rotation"] == "40.0"
    assert run.data.tags["pipeline_run_id"] == "pipe-test-1"
    assert run.data.tags["pretrained"] == "false"
    assert "git_commit" in run.data.tags and "data_md5.train" in run.data.tags
    steps = [m.step for m in client.get_metric_history(res.run_id, "val_accuracy")]
    assert sorted(steps) == [0, 1]
    assert "final_val_accuracy" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(res.run_id, "plots")}
    assert "plots/history.png" in arts

    model = mlflow.pyfunc.load_model(res.model_uri)
    assert model.metadata.signature is not None
    x = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 1)).astype(np.float32)
    pred = np.asarray(model.predict(x))
    assert pred.shape == (3, 7)
    np.testing.assert_allclose(pred.sum(axis=1), 1.0, atol=1e-2)


def test_transfer_model_feature_cache_records_not_pretrained(processed, tmp_path,
                                                             mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    from fer_pipeline.train.stage import train_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mp, p = _params(tmp_path, "vgg", {"arch": "vgg16", "epochs": 2, "batch_size": 16,
                                      "input_size": 32, "weights": None, "dense_units": [16]},
                    experiment="fer-test", log_model=False)
    assert mp.uses_feature_cache
    res = train_model("vgg", mp, p.train, p.mlflow, processed_dir=processed)
    assert json.loads(res.metrics_path.read_text())["pretrained"] is False
    run = MlflowClient(mlflow_server).get_run(res.run_id)
    assert run.data.tags["pretrained"] == "false"
    assert run.data.params["feature_cache"] == "True"
    import keras

    model = keras.saving.load_model(res.model_path)
    assert model.predict(np.zeros((2, 48, 48, 1), np.float32), verbose=0).shape == (2, 7)


@pytest.mark.slow
def test_resnet_with_augmentation_and_class_weights(processed, tmp_path, monkeypatch):
    from fer_pipeline.train.stage import train_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp, p = _params(tmp_path, "res", {
        "arch": "resnet50", "epochs": 1, "batch_size": 16, "input_size": 32, "weights": None,
        "dense_units": [16], "class_weights": True,
        "augmentation": {"rotation": 10, "horizontal_flip": True}},
        tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", log_model=False)
    assert not mp.uses_feature_cache
    res = train_model("res", mp, p.train, p.mlflow, processed_dir=processed)
    assert json.loads(res.metrics_path.read_text())["epochs_run"] == 1


def test_unreachable_tracking_server_fails_fast_before_training(processed, tmp_path,
                                                                monkeypatch):
    from fer_pipeline.train.stage import train_model

    uri = _closed_port_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mp, p = _params(tmp_path, "cnn", CNN)
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable) as err:
        train_model("cnn", mp, p.train, p.mlflow, processed_dir=processed)
    assert time.monotonic() - t0 < 10
    assert uri in str(err.value) and "mlflow server" in str(err.value)
    assert not (tmp_path / "state").exists() and not (tmp_path / "models").exists()


NO_MLFLOW = """
import json, sys
from fer_pipeline import params as P
from fer_pipeline.train.stage import train_model

p = P.from_dict(json.loads(sys.argv[1]))
res = train_model("cnn", p.model("cnn"), p.train, None, processed_dir=sys.argv[2])
assert "mlflow" not in sys.modules, "mlflow was imported"
print(json.dumps({"run_id": res.run_id, "model_uri": res.model_uri, "metrics": res.metrics}))
"""


def test_train_without_mlflow_writes_model_and_metrics_and_learns(processed, tmp_path):
    """mlflow_params=None (benchmarks, the GPU runner): no MLflow import, no tracking; the
    model, metrics and history are written as always, and the fit learns the cue."""
    raw = _raw_params(tmp_path, {"cnn": {**CNN, "epochs": 4, "dense_units": []}})
    out = subprocess.run([sys.executable, "-c", NO_MLFLOW, json.dumps(raw), str(processed)],
                         env=_env(MLFLOW_TRACKING_URI=_closed_port_uri()), cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.splitlines()[-1])
    assert res["run_id"] is None and res["model_uri"] is None
    reports = tmp_path / "reports" / "cnn"
    assert (tmp_path / "models" / "cnn" / "model.keras").is_file()
    assert json.loads((reports / "metrics.json").read_text()) == res["metrics"]
    assert len((reports / "history.csv").read_text().splitlines()) == res["metrics"]["epochs_run"] + 1
    assert not (reports / "mlflow.json").exists()
    assert not (tmp_path / "state" / "cnn").exists() and not (tmp_path / "mlflow.db").exists()
    # Training-mode accuracy: after tens of steps BatchNorm's moving statistics are still near
    # their initial values, so inference-mode (val) accuracy says little at this size.
    rows = list(csv.DictReader((reports / "history.csv").open()))
    assert max(float(r["accuracy"]) for r in rows) > 2 / len(CLASSES)   # chance is 1/7
    # The work of each epoch in CPU seconds beside its wall time (a VM's stolen vCPU time
    # inflates the wall only); the metrics carry their mean.
    assert all(float(r["cpu_seconds"]) > 0 for r in rows)
    assert res["metrics"]["cpu_seconds_per_epoch"] == pytest.approx(
        sum(float(r["cpu_seconds"]) for r in rows) / len(rows), abs=0.01)


@pytest.mark.slow
def test_cli_resumes_after_kill_from_last_finished_epoch(processed, tmp_path):
    from crash import kill_after_epochs

    epochs = 12
    params = _params_file(tmp_path, {"cnn": {**CNN, "epochs": epochs,
                                             "early_stopping_patience": epochs}},
                          tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    cmd = [FER, "--params", str(params), "train", "--model", "cnn", "--processed-dir",
           str(processed)]
    state = tmp_path / "state" / "cnn"
    # Killed once the history lists 2 epochs: the resume backup holds at least epoch 1 (it is
    # written after the history row, so a kill between the two leaves it one epoch behind).
    first = kill_after_epochs(cmd, state / "history.csv", 2, cwd=tmp_path, env=_env())
    assert first.returncode == -9 and 2 <= first.epochs < epochs, first.output[-3000:]
    assert (state / "backup").is_dir() and (state / "best.keras").is_file()
    assert not (tmp_path / "models" / "cnn" / "model.keras").exists()
    run_id = json.loads((state / "mlflow_run.json").read_text())["run_id"]

    second = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = int(second.stderr.split("resuming from epoch ", 1)[1].split()[0].strip(",:"))
    assert 2 <= resumed <= first.epochs + 1       # at most the epoch the kill interrupted reruns
    assert "epoch 1/" not in second.stderr and f"epoch {epochs}/{epochs}" in second.stderr
    hist = (tmp_path / "reports" / "cnn" / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in hist[1:]] == [str(i) for i in range(epochs)]
    metrics = json.loads((tmp_path / "reports" / "cnn" / "metrics.json").read_text())
    assert metrics["epochs_run"] == epochs
    side = json.loads((tmp_path / "reports" / "cnn" / "mlflow.json").read_text())
    assert side["run_id"] == run_id  # the interrupted MLflow run was continued
    assert not state.exists()


def test_augmentation_compiles_on_jax_only():
    """One layer with supports_jit=False (Keras sets it on RandomTranslation/RandomZoom) makes
    the whole JAX train step eager: 316 s instead of 1.3 s per epoch on an H200
    (experiments/journal.md, 2026-11-28)."""
    from fer_pipeline.train.augment import augmentation_layers

    aug = P.AugmentParams(rotation=10, width_shift=0.1, height_shift=0.1, zoom=0.1,
                          horizontal_flip=True, random_erasing=0.5)
    jax_layers = augmentation_layers(aug, seed=1, backend="jax")
    assert {layer.name for layer in jax_layers} >= {"aug_shift", "aug_zoom"}
    assert all(layer.supports_jit for layer in jax_layers)
    tf_layers = {layer.name: layer for layer in augmentation_layers(aug, seed=1,
                                                                     backend="tensorflow")}
    assert not tf_layers["aug_shift"].supports_jit   # left as Keras says for TensorFlow-XLA


def test_photometric_augmentation_changes_images_in_training_only():
    """brightness / blur / noise (robustness levers): active when training, identity at
    inference, values kept in 0..255; the noise strength varies per image."""
    import numpy as np

    from fer_pipeline.train.augment import augmentation_layers

    rng = np.random.default_rng(0)
    x = rng.integers(30, 220, (8, 48, 48, 1)).astype("float32")
    for key, value in (("brightness", 0.3), ("blur", 1.0), ("noise", 10.0)):
        layers = augmentation_layers(P.AugmentParams(**{key: value}), seed=3)
        assert f"aug_{key}" in [layer.name for layer in layers]

        def run(training: bool, layers=layers):
            out = x
            for layer in layers:
                out = layer(out, training=training)
            return np.asarray(out)

        trained = run(True)
        assert trained.shape == x.shape and np.abs(trained - x).mean() > 0.5, key
        assert np.allclose(run(False), x, atol=1e-3), key
        assert trained.min() >= 0 and trained.max() <= 255, key
        if key == "noise":
            # A strength per image in [0, noise]: some images nearly clean, others noisy
            # (one std for all, as Keras' GaussianNoise does, never shows a clean face).
            stds = (trained - x).reshape(len(x), -1).std(axis=1)
            assert stds.max() <= 10.5 and stds.max() > 3 * stds.min(), stds


def test_fernet_recipe_trains_with_smoothing_cosine_and_erasing(processed, tmp_path, monkeypatch):
    """The fifth model's recipe (AdamW, warm-up + cosine, label smoothing, random erasing) runs
    through the same stage, and the saved model is a plain inference model."""
    import keras

    from fer_pipeline.train.models import build_model, trainable_params
    from fer_pipeline.train.stage import train_model

    default = P.load(ROOT / "params.yaml").model("fernet")
    keras.mixed_precision.set_global_policy("float32")
    assert 1.0e6 < trainable_params(build_model(default, 7).model) < 1.5e6
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp, p = _params(tmp_path, "fernet", {
        "arch": "fernet", "epochs": 2, "batch_size": 16, "width": 0.25, "dense_units": [],
        "optimizer": "adamw", "weight_decay": 1e-4, "lr_schedule": "cosine", "warmup_epochs": 1,
        "label_smoothing": 0.1,
        "augmentation": {"horizontal_flip": True, "random_erasing": 0.5, "contrast": 0.2}},
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", log_model=False)
    res = train_model("fernet", mp, p.train, p.mlflow, processed_dir=processed)
    assert res.metrics["epochs_run"] == 2 and 0.0 <= res.metrics["val_accuracy"] <= 1.0
    rows = res.history_path.read_text().splitlines()
    lrs = [float(r.split(",")[rows[0].split(",").index("learning_rate")]) for r in rows[1:]]
    assert lrs[0] != lrs[1]  # the schedule moves the learning rate every epoch
    model = keras.saving.load_model(res.model_path)
    assert not any(layer.name.startswith("aug_") for layer in model.layers)
    assert model.predict(np.zeros((2, 48, 48, 1), np.float32), verbose=0).shape == (2, 7)


def test_every_arch_of_the_schema_has_a_builder():
    """Adding an architecture: a params class in params.ARCH_CLASSES and a builder here."""
    from fer_pipeline.train.models import BUILDERS

    assert set(BUILDERS) == set(P.ARCH_CLASSES)


def test_bn_momentum_and_feature_norm_reach_the_layers():
    """The quick profile's short-run levers: BatchNormalization momentum (moving statistics
    that follow a few hundred steps) and standardised features under a random frozen base."""
    import keras

    from fer_pipeline.train.models import build_model

    keras.mixed_precision.set_global_policy("float32")
    for arch in ("custom_cnn", "fernet"):
        mp = P.model_params(arch=arch, width=0.125, bn_momentum=0.9)
        bns = [la for la in build_model(mp, 7).model.layers
               if isinstance(la, keras.layers.BatchNormalization)]
        assert bns and {la.momentum for la in bns} == {0.9}, arch
    plain = P.model_params(arch="vgg16", input_size=32, dense_units=[8], weights=None)
    normed = P.model_params(arch="vgg16", input_size=32, dense_units=[8], weights=None,
                            feature_norm=True)
    assert "feature_norm" not in [la.name for la in build_model(plain, 7).head.layers]
    assert "feature_norm" in [la.name for la in build_model(normed, 7).head.layers]
    with pytest.raises(ParamsError, match="bn_momentum"):
        P.model_params(arch="custom_cnn", bn_momentum=1.0)
    dense_bn = build_model(P.model_params(arch="custom_cnn", width=0.125, bn_momentum=0.9,
                                          dense_bn=True), 7).model
    assert dense_bn.get_layer("dense_bn1").momentum == 0.9
    assert not dense_bn.get_layer("dense1").use_bias   # the BatchNormalization's beta is it


def test_standardize_makes_the_model_blind_to_brightness_and_contrast(tmp_path):
    """preprocessing: standardize (robustness lever): the suite's dark, bright and contrast
    corruptions are affine maps of the pixels, so a per-image standardized model gives the same
    probabilities for them; x/255 does not. The saved model loads without custom objects."""
    import keras

    from fer_pipeline.corruptions import corrupt
    from fer_pipeline.synthetic import make_arrays
    from fer_pipeline.train.models import build_model

    keras.mixed_precision.set_global_policy("float32")
    x = make_arrays(6)[0].astype("float32")
    for arch in ("custom_cnn", "fernet"):
        diffs = {}
        for prep in ("rescale", "standardize"):
            mp = P.model_params(arch=arch, width=0.125, dense_units=[], preprocessing=prep)
            model = build_model(mp, 7, seed=1).model
            p = model.predict(x, verbose=0)
            diffs[prep] = max(np.abs(model.predict(corrupt(x, c, 3), verbose=0) - p).max()
                              for c in ("dark", "bright", "contrast"))
        # an untrained network's softmax is nearly flat, so x/255's differences are small
        # (1e-4..1e-2 by backend), yet orders of magnitude above standardize's rounding
        assert diffs["standardize"] < 1e-6 and diffs["rescale"] > 1e-5 \
            and diffs["rescale"] > 100 * diffs["standardize"], (arch, diffs)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    assert np.allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    with pytest.raises(ParamsError, match="preprocessing"):
        P.model_params(arch="custom_cnn", preprocessing="zscore")


def test_ema_validates_and_keeps_the_averaged_weights(processed, tmp_path, monkeypatch):
    """`ema`: validation, the best-model keeper and the result use the moving average of the
    weights, not the last step's, and BatchNorm statistics averaged alike. With a momentum of
    1 - 1e-6 the average stays at the initial weights while the raw ones move, so the kept
    model must be (nearly) the initial one: Keras starts the average at the weights after the
    first step, at most one Adam step (the learning rate) from the initial ones."""
    import keras

    from fer_pipeline.train.models import build_model
    from fer_pipeline.train.stage import train_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    keras.mixed_precision.set_global_policy("float32")
    recipe = {"arch": "fernet", "epochs": 2, "batch_size": 16, "width": 0.125,
              "dense_units": [], "optimizer": "adamw", "learning_rate": 0.005}
    moved, bn_moved = {}, {}
    for ema in (0.0, 1 - 1e-6):
        mp, p = _params(tmp_path / str(ema), "fernet", {**recipe, "ema": ema})
        res = train_model("fernet", mp, p.train, None, processed_dir=processed)
        keras.utils.set_random_seed(p.train.seed)
        init = build_model(mp, 7, seed=p.train.seed).model
        kept = keras.saving.load_model(res.model_path)
        moved[ema] = max(float(np.abs(a - b).max()) for a, b in
                         zip(kept.get_weights(), init.get_weights(), strict=True)
                         if a.shape == b.shape and a.ndim == 4)          # conv kernels
        # BatchNorm's moving means go with the weights they were measured for (averaged too).
        bn_moved[ema] = max(float(np.abs(keras.ops.convert_to_numpy(layer.moving_mean)).max())
                            for layer in kept.layers
                            if isinstance(layer, keras.layers.BatchNormalization))
        rows = list(csv.DictReader(res.history_path.open()))
        # What was validated is what was kept (the swap happens before both).
        best = max(float(r["val_accuracy"]) for r in rows)
        assert res.metrics["val_accuracy"] == pytest.approx(best, abs=1e-6), ema
    lr = recipe["learning_rate"]
    assert moved[1 - 1e-6] <= 1.01 * lr < moved[0.0] / 5, moved
    # Initial moving means are 0; the average keeps the first step's (one BN update).
    assert bn_moved[1 - 1e-6] < bn_moved[0.0] / 5, bn_moved
    assert "EMA 0.999" in P.model_params(arch="fernet", ema=0.999).summary()
    with pytest.raises(ParamsError, match="ema must be < 1"):
        P.model_params(arch="fernet", ema=1.0)


def test_mixup_and_cutmix_mix_images_and_targets_alike():
    """Each mixed image is lam * a + (1 - lam) * b (mixup) or a with a rectangle of b pasted in
    (CutMix), and its target weighs the two classes exactly so."""
    from fer_pipeline.train.augment import BatchMixer

    n = 7
    x = np.stack([np.full((48, 48, 1), 10.0 * i) for i in range(n)]).astype(np.float32)
    y = np.eye(n, dtype=np.float32)                       # image i has class i and value 10 i
    for aug, cut in ((P.AugmentParams(mixup=0.4), False), (P.AugmentParams(cutmix=1.0), True)):
        mixer = BatchMixer(aug, seed=3)
        for _ in range(5):
            xm, ym = mixer(x, y)
            assert xm.shape == x.shape and np.allclose(ym.sum(axis=1), 1.0)
            for i in range(n):
                own = ym[i, i]
                other = int(np.argmax(np.where(np.arange(n) == i, -1, ym[i])))
                if own == 1.0:                                # paired with itself
                    assert np.allclose(xm[i], x[i])
                elif cut:   # pixels are its own or the other's; the target is the area share
                    assert set(np.unique(xm[i])) <= {10.0 * i, 10.0 * other}
                    assert np.isclose(np.mean(xm[i] == 10.0 * i), own, atol=1e-6)
                else:
                    assert np.allclose(xm[i], own * 10 * i + (1 - own) * 10 * other, atol=1e-3)
    both = BatchMixer(P.AugmentParams(mixup=0.4, cutmix=1.0), seed=0)
    kinds = {bool(np.isin(both(x, y)[0], x).all()) for _ in range(20)}
    assert kinds == {True, False}   # some batches CutMix (original pixels only), some mixup
    assert P.AugmentParams(mixup=0.2).enabled and "mixup 0.2" in P.AugmentParams(
        mixup=0.2).summary()
    with pytest.raises(ParamsError, match="cutmix must be >= 0"):
        P.AugmentParams(cutmix=-1)


def test_training_with_mixup_and_cutmix_learns_a_cue(processed, tmp_path, monkeypatch):
    """Through the stage (one-hot mixed targets on tf.data): the kept model is a plain
    inference model, and it separates the synthetic cue better than chance on validation."""
    import keras

    from fer_pipeline.train.stage import train_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    keras.mixed_precision.set_global_policy("float32")
    mp, p = _params(tmp_path, "fernet", {
        "arch": "fernet", "epochs": 6, "batch_size": 16, "width": 0.125, "dense_units": [],
        "optimizer": "adam", "learning_rate": 0.003, "bn_momentum": 0.5, "dropout": 0.0,
        "augmentation": {"mixup": 0.2, "cutmix": 1.0}})
    res = train_model("fernet", mp, p.train, None, processed_dir=processed)
    model = keras.saving.load_model(res.model_path)
    assert not any(layer.name.startswith("aug_") for layer in model.layers)
    assert res.metrics["val_accuracy"] > 2 / len(CLASSES), res.metrics   # chance is 1/7


def test_members_train_each_on_its_own_loss_and_the_model_answers_their_mean(
        processed, tmp_path, monkeypatch):
    """`members: 2`: two networks in one model. Through the stage it learns the synthetic cue;
    the saved file is a plain 7-way classifier whose answer is the mean of its members' (each
    member a full network that answers alone), and the loss is per member: a member that is
    already right is not pushed by the other's mistakes."""
    import keras

    from fer_pipeline.train.models import build_model, trainable_params
    from fer_pipeline.train.recipe import ensemble_accuracy, members_loss
    from fer_pipeline.train.stage import train_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    keras.mixed_precision.set_global_policy("float32")
    recipe = {"arch": "fernet", "epochs": 6, "batch_size": 16, "width": 0.125, "dense_units": [],
              "optimizer": "adam", "learning_rate": 0.003, "bn_momentum": 0.5, "dropout": 0.0,
              "label_smoothing": 0.1, "members": 2}
    mp, p = _params(tmp_path, "fernet", recipe)
    one = build_model(P.model_params(**{**recipe, "members": 1}), 7)
    built = build_model(mp, 7)
    assert trainable_params(built.model) == 2 * trainable_params(one.model)
    assert built.train_model.output_shape == (None, 2, 7)
    assert "2 x width 0.125" in mp.summary()

    res = train_model("fernet", mp, p.train, None, processed_dir=processed)
    assert res.metrics["val_accuracy"] > 2 / len(CLASSES), res.metrics   # chance is 1/7
    model = keras.saving.load_model(res.model_path)
    assert model.output_shape == (None, 7)
    assert not any(layer.name.startswith("aug_") for layer in model.layers)
    x = np.random.default_rng(0).integers(0, 256, (4, 48, 48, 1)).astype(np.float32)
    stacked = model.get_layer("fernet_members")
    per_member = keras.ops.convert_to_numpy(stacked(x))
    assert per_member.shape == (4, 2, 7)
    np.testing.assert_allclose(model.predict(x, verbose=0), per_member.mean(axis=1), atol=1e-6)
    assert np.abs(per_member[:, 0] - per_member[:, 1]).max() > 1e-3   # two networks, not one

    def probs(k: int, top: float) -> np.ndarray:
        return np.where(np.arange(7) == k, top, (1 - top) / 6).astype(np.float32)

    y = np.eye(7, dtype=np.float32)[[0, 1]]
    preds = np.stack([np.stack([probs(0, 0.9), probs(0, 0.9)]),     # both members right
                      np.stack([probs(1, 0.9), probs(0, 0.5)])])    # one right, one wrong
    losses = keras.ops.convert_to_numpy(members_loss(0.0)(y, preds))
    assert losses.shape == (2,) and losses[0] < losses[1]
    np.testing.assert_allclose(losses[0], -np.log(0.9), rtol=1e-5)  # each member's own CE
    np.testing.assert_allclose(losses[1], (-np.log(0.9) - np.log(0.5 / 6)) / 2, rtol=1e-5)
    acc = keras.ops.convert_to_numpy(ensemble_accuracy(y, preds))
    np.testing.assert_array_equal(acc, [1.0, 1.0])     # the mean answers 1 for the second
    with pytest.raises(ParamsError, match="members must be >= 1"):
        P.model_params(arch="fernet", members=0)
    with pytest.raises(ParamsError, match="custom_cnn has no members; it is a key of arch fernet"):
        P.model_params(arch="custom_cnn", members=2)


def test_fernet_builds_the_convs_each_stage_asks_for():
    """blocks_per_stage [1, 2, 2, 2]: one conv at 48 px, two at every later resolution."""
    import keras

    from fer_pipeline.train.models import build_model

    keras.mixed_precision.set_global_policy("float32")
    convs = {}
    for blocks in (2, [1, 2, 2, 2]):
        mp = P.model_params(arch="fernet", width=0.125, dense_units=[],
                           conv_filters=[32, 64, 128, 256], blocks_per_stage=blocks)
        convs[str(blocks)] = [layer.name for layer in build_model(mp, 7).model.layers
                              if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs["2"]) == 8
    assert convs["[1, 2, 2, 2]"] == [n for n in convs["2"] if n != "s1_conv2"]


def _tiny_fernet_file(path: Path, seed: int) -> Path:
    import keras

    from fer_pipeline.train.models import build_model

    keras.mixed_precision.set_global_policy("float32")
    mp = P.model_params(arch="fernet", width=0.125, dense_units=[], conv_filters=[32, 64, 128, 256])
    keras.utils.set_random_seed(seed)
    model = build_model(mp, len(CLASSES), seed=seed).model
    model.save(path)
    return path


def test_teach_averages_views_and_teachers_and_refuses_another_split(tmp_path):
    """`teach`: each teacher's probability is its mean over the TTA views, the teachers are
    averaged, T > 1 softens; rows are matched to a split by image id (reordered rows follow,
    an image the file does not know fails by path and reason)."""
    import keras

    from fer_pipeline import tta
    from fer_pipeline.soft_labels import load_soft_labels
    from fer_pipeline.teach import teach

    split = _split(21, 3)
    save_split(tmp_path / "train.npz", split)
    teachers = [_tiny_fernet_file(tmp_path / f"t{i}.keras", i) for i in range(2)]
    out = tmp_path / "teacher" / "soft.npz"
    labels = teach(teachers, tmp_path / "train.npz", out, "flip", 1.0)
    expected = np.mean([np.mean([keras.saving.load_model(t).predict(
        v.astype(np.float32), verbose=0) for v in tta.views(split.x, "flip")], axis=0)
        for t in teachers], axis=0)
    np.testing.assert_allclose(labels.probs, expected, atol=1e-5)
    np.testing.assert_allclose(labels.probs.sum(axis=1), 1.0, atol=1e-5)
    loaded = load_soft_labels(out)
    assert loaded.teachers == [str(t) for t in teachers] and loaded.classes == list(CLASSES)

    soft = teach(teachers, tmp_path / "train.npz", tmp_path / "soft2.npz", "flip", 4.0)
    assert soft.probs.max(axis=1).mean() < labels.probs.max(axis=1).mean()
    np.testing.assert_array_equal(soft.probs.argmax(1), labels.probs.argmax(1))

    order = np.arange(21)[::-1]
    reordered = SplitArrays(split.x[order], split.y[order], split.ids[order], split.origin[order],
                            CLASSES)
    np.testing.assert_allclose(loaded.aligned_to(reordered, out), loaded.probs[order])
    other = _split(22, 3)   # one image more: s/21.jpg is unknown to the file
    with pytest.raises(FerError, match=r"soft\.npz: no teacher probabilities for 1 of 22"):
        loaded.aligned_to(other, out)
    with pytest.raises(FerError, match="not found"):
        teach([tmp_path / "missing.keras"], tmp_path / "train.npz", out)


def test_distillation_learns_from_the_teachers_probabilities(tmp_path, monkeypatch):
    """distill.weight 1: the training labels are scrambled and carry nothing; the teachers'
    probabilities (one-hot on the true class) carry the cue, and the student learns it:
    validation (true labels) well above chance (with weight 0, the same run stays at 1/7).
    teach@NAME with weight 0 writes a file with no rows, which a distilling train refuses."""
    import keras

    from fer_pipeline.teach import teach_model
    from fer_pipeline.train.stage import train_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    keras.mixed_precision.set_global_policy("float32")
    processed, teachers = tmp_path / "processed", tmp_path / "teacher"
    train = _split(112, 0)
    scrambled = np.random.default_rng(5).permutation(train.y)
    save_split(processed / "train.npz", SplitArrays(train.x, scrambled, train.ids, train.origin,
                                                     CLASSES))
    save_split(processed / "val.npz", _split(42, 1))
    recipe = {"arch": "fernet", "epochs": 6, "batch_size": 16, "width": 0.125, "dense_units": [],
              "optimizer": "adam", "learning_rate": 0.003, "bn_momentum": 0.5, "dropout": 0.0,
              "distill": {"weight": 1.0, "teachers": ["teachers/oracle.keras"]}}
    mp, p = _params(tmp_path, "fernet", recipe)
    assert "distilled from 1 teacher(s), weight 1" in mp.summary()

    teach_model("fernet", P.DistillParams(), processed / "train.npz", teachers)
    with pytest.raises(FerError, match=r"fernet\.npz: written while models\.fernet\.distill\."
                                       r"weight was 0 .* `dvc repro teach@fernet`"):
        train_model("fernet", mp, p.train, None, processed_dir=processed, teacher_dir=teachers)
    with pytest.raises(FerError, match=r"teacher model\(s\) not found: teachers/oracle.keras"):
        teach_model("fernet", mp.distill, processed / "train.npz", teachers)

    np.savez(teachers / "fernet.npz", probs=np.eye(len(CLASSES), dtype=np.float32)[train.y],
             ids=train.ids, classes=np.asarray(CLASSES), teachers=np.asarray(["oracle"]))
    res = train_model("fernet", mp, p.train, None, processed_dir=processed, teacher_dir=teachers)
    assert res.metrics["val_accuracy"] > 2 / len(CLASSES), res.metrics   # chance is 1/7
    with pytest.raises(ParamsError, match="weight must be <= 1"):
        P.DistillParams(weight=1.5, teachers=["t.keras"])
    with pytest.raises(ParamsError, match="teachers is empty"):
        P.DistillParams(weight=0.5)
