"""Shared fixtures. Real services only: tests start their own MLflow/Prefect servers.

The one MLflow-server fixture (`mlflow_server`) and the one params builder
(`tests/sandbox.py`: `tiny_params`, through `params_file`) live here for every test package.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from fer_pipeline.synthetic import make_raw_tree
from sandbox import free_port, tiny_params

# Subprocesses (dvc stages call `fer`) must find this venv's console scripts.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture
def raw_tree(tmp_path: Path) -> Path:
    """A clean synthetic dataset: 10 train and 4 test images per class."""
    return make_raw_tree(tmp_path / "raw" / "fer2013", {"train": 10, "test": 4})


@pytest.fixture
def params_file(tmp_path: Path, raw_tree: Path) -> Path:
    """The project's params.yaml with bounds shrunk for `raw_tree`."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(raw_tree)))
    return path


# ---- training: a real MLflow tracking server (tests/train) ----
@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1:<free port>, SQLite store + artifacts in a temp dir.

    Yields the URI; tests point MLFLOW_TRACKING_URI at it themselves (monkeypatch.setenv).
    """
    import subprocess
    import time
    import urllib.request

    d = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = (d / "server.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server",
         "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
         "--artifacts-destination", str(d / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=d, start_new_session=True,
        # No job runner (8 more processes, a /dev/shm folder left behind, ~15 s to stop).
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(d / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("mlflow server did not answer /health in 120 s")
        time.sleep(0.5)
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
