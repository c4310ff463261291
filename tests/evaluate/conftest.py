"""Fixtures for evaluate/predict tests: a real MLflow server and tiny 'trained' models.

Tiny Keras models are built and logged to MLflow exactly as training leaves them (model file,
reports/train/<name>/{metrics,mlflow}.json, history.csv) without running the training stage.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from fer_pipeline.data.arrays import SplitArrays, save_split

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
CLASSES = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    log = (d / "server.log").open("w")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
         "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=d, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(d / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    return uri, proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not start in 120 s")


@pytest.fixture(scope="session")
def eval_mlflow_server(request, tmp_path_factory):
    """A real `mlflow server` (SQLite store + artifacts in a temp dir, 127.0.0.1, free port).

    Reuses the shared session fixture `mlflow_server` (tests/conftest.py) when it exists, else
    starts its own. Points MLFLOW_TRACKING_URI at it for the session (env wins over params).
    """
    try:
        uri, proc = request.getfixturevalue("mlflow_server"), None
    except pytest.FixtureLookupError:
        uri, proc = _start_server(tmp_path_factory)
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


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
    from fer_pipeline.train.models import trainable_params
    from fer_pipeline.train.stage import _log_model, save_model_atomic

    model = tiny_model(filters, seed)
    rep = root / "reports" / "train" / name
    rep.mkdir(parents=True, exist_ok=True)
    save_model_atomic(model, root / "models" / name / "model.keras")
    n_params = trainable_params(model)
    (rep / "metrics.json").write_text(json.dumps({
        "train_loss": 1.9, "train_accuracy": 0.2, "val_loss": 1.9, "val_accuracy": val_accuracy,
        "best_epoch": 2, "epochs_run": 3, "pretrained": False, "trainable_params": n_params,
        "train_seconds": 1.5, "seconds_per_epoch": 0.5}))
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
            info["model_uri"] = _log_model(model, x)
            info["run_id"] = run.info.run_id
    (rep / "mlflow.json").write_text(json.dumps(info))
    return info


def write_params(root: Path, names: list[str], registry_name: str, **evaluate) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    base = params["models"]["custom_cnn"]
    params["models"] = {n: dict(base) for n in names}
    params["train"]["models_dir"] = str(root / "models")
    params["train"]["reports_dir"] = str(root / "reports" / "train")
    params["mlflow"]["experiment"] = "fer-emotion-tests"
    params["evaluate"] = {"test_path": str(root / "data" / "test.npz"),
                          "reports_dir": str(root / "reports" / "evaluate"), "batch_size": 64,
                          "tta": "none", **evaluate}
    params["registry"] = {**(params.get("registry") or {}), "model_name": registry_name}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory, eval_mlflow_server):
    """Two tiny models logged to the server: `small` (val 0.40) and `big` (val 0.30)."""
    root = tmp_path_factory.mktemp("project")
    make_test_split(root / "data" / "test.npz")
    infos = {"small": write_trained(root, "small", 0.40, 4, 1),
             "big": write_trained(root, "big", 0.30, 8, 2)}
    return root, infos


@pytest.fixture
def fixture_copy(tmp_path):
    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copy(FIXTURES / name, dst)
        return dst
    return copy


@pytest.fixture
def eval_params():
    """write_params(root, names, registry_name, **evaluate) -> params.yaml path."""
    return write_params
