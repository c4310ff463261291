"""Fixtures for evaluate/predict tests: tiny 'trained' models logged to the session's MLflow server.

Tiny Keras models are built and logged to MLflow exactly as training leaves them (model file,
reports/train/<name>/{metrics,mlflow}.json, history.csv) without running the training stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fer_pipeline import params as P
from fer_pipeline.arrays import SplitArrays, save_split
from fer_pipeline.artifacts.train import TrainMetrics
from fer_pipeline.evaluate.stage import EvaluationResult, evaluate_models
from fer_pipeline.io import md5_file
from sandbox import ROOT, tiny_params

FIXTURES = ROOT / "tests" / "fixtures"
CLASSES = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]


@pytest.fixture(scope="session")
def eval_mlflow_server(mlflow_server):
    """The session's MLflow server (tests/conftest.py), made the tracking store of every test
    here: the session-scoped trained models are logged to it (env wins over params)."""
    import mlflow

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mlflow.set_tracking_uri(mlflow_server)
        yield mlflow_server


def tiny_model(filters: int, seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((48, 48, 1), name="image", dtype="float32")
    x = keras.layers.Rescaling(1.0 / 255)(inp)
    x = keras.layers.Conv2D(filters, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(len(CLASSES), activation="softmax")(x)
    return keras.Model(inp, out)


def make_test_split(path: Path, n: int = 70, seed: int = 0) -> SplitArrays:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(CLASSES)
    x = rng.integers(0, 256, (n, 48, 48, 1), dtype=np.uint8)
    flags = {k: np.zeros(n, bool) for k in ("flag_duplicate", "flag_blank", "flag_leak",
                                             "flag_label_conflict")}
    flags["flag_leak"][:5] = True
    flags["flag_blank"][5:7] = True
    arrays = SplitArrays(x=x, y=y.astype(np.int64), ids=np.array([f"test/{i}.jpg" for i in range(n)]),
                         origin=np.where(np.arange(n) % 2 == 0, "PublicTest", "PrivateTest"),
                         classes=CLASSES, flags=flags)
    save_split(path, arrays)
    return arrays


def write_trained(root: Path, name: str, val_accuracy: float, filters: int, seed: int,
                  log_to_mlflow: bool = True) -> dict:
    """Leave what `fer train --model name` leaves: model file, reports, MLflow run + model."""
    from fer_pipeline.train.artifacts import log_model, save_model
    from fer_pipeline.train.models import trainable_params

    model = tiny_model(filters, seed)
    rep = root / "reports" / "train" / name
    rep.mkdir(parents=True, exist_ok=True)
    save_model(model, root / "models" / name / "model.keras")
    n_params = trainable_params(model)
    TrainMetrics(train_loss=1.9, train_accuracy=0.2, val_loss=1.9, val_accuracy=val_accuracy,
                 best_epoch=2, epochs_run=3, pretrained=False, trainable_params=n_params,
                 train_seconds=1.5, seconds_per_epoch=0.5,
                 data_md5_val=md5_file(root / "data" / "val.npz")).write(rep / "metrics.json")
    (rep / "history.csv").write_text(
        "epoch,loss,accuracy,val_loss,val_accuracy,learning_rate,seconds\n"
        "0,1.95,0.15,1.94,0.16,0.001,0.5\n1,1.9,0.2,1.9,0.2,0.001,0.5\n2,1.88,0.21,1.91,0.19,0.001,0.5\n")
    info = {"model_name": name, "arch": "custom_cnn", "classes": ",".join(CLASSES),
            "pretrained": False, "trainable_params": n_params, "run_id": None, "model_uri": None}
    if log_to_mlflow:
        import mlflow

        mlflow.set_experiment("fer-emotion-tests")
        with mlflow.start_run(run_name=name) as run:
            mlflow.log_param("model_name", name)
            x = np.zeros((2, 48, 48, 1), np.float32)
            info["model_uri"] = log_model(model, x)
            info["run_id"] = run.info.run_id
    (rep / "mlflow.json").write_text(json.dumps(info))
    return info


def write_params(root: Path, names: list[str], registry_name: str, **evaluate) -> Path:
    """root/params.yaml: the project's params (`tiny_params`) pointed at root's models, reports
    and test split, with one small custom CNN recipe per name."""
    raw = tiny_params(
        train={"models_dir": str(root / "models"), "reports_dir": str(root / "reports" / "train")},
        mlflow={"experiment": "fer-emotion-tests"},
        evaluate={"test_path": str(root / "data" / "test.npz"),
                  "val_path": str(root / "data" / "val.npz"),
                  "reports_dir": str(root / "reports" / "evaluate"), "batch_size": 64,
                  "tta": "none", **evaluate},
        registry={"model_name": registry_name})
    raw["models"] = {n: dict(raw["models"]["custom_cnn"]) for n in names}
    P.from_dict(raw)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _run_evaluate(params_path: Path, **kwargs) -> EvaluationResult:
    """`fer evaluate` without the CLI: the params file's sections into `evaluate_models`."""
    p = P.load(params_path)
    return evaluate_models(p.models, p.train, p.mlflow, p.evaluate, p.registry, **kwargs)


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory, eval_mlflow_server):
    """Two tiny models logged to the server: `small` (val 0.40) and `big` (val 0.30)."""
    root = tmp_path_factory.mktemp("project")
    make_test_split(root / "data" / "test.npz")
    make_test_split(root / "data" / "val.npz", seed=1)
    infos = {"small": write_trained(root, "small", 0.40, 4, 1),
             "big": write_trained(root, "big", 0.30, 8, 2)}
    return root, infos


@pytest.fixture
def eval_params():
    """write_params(root, names, registry_name, **evaluate) -> params.yaml path."""
    return write_params


@pytest.fixture
def run_evaluate():
    """run_evaluate(params_path, names=..., register=..., log_mlflow=...) -> EvaluationResult."""
    return _run_evaluate


_RELEASED: dict[str, tuple] = {}


@pytest.fixture
def released(trained_project, eval_params, run_evaluate, tmp_path_factory):
    """The tiny project evaluated (champion `small`), then `fer export` (once per session):
    (project root, its params.yaml, the release folder)."""
    from fer_pipeline.cli import main

    if "r" not in _RELEASED:
        root, _ = trained_project
        params = eval_params(root, ["small", "big"], "fer-emotion-export", tta="flip")
        run_evaluate(params)
        out = tmp_path_factory.mktemp("rel") / "release"
        assert main(["--params", str(params), "export", "--out", str(out)]) == 0
        _RELEASED["r"] = (root, params, out)
    return _RELEASED["r"]
