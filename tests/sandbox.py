"""A throw-away git + DVC copy of this project on tiny synthetic data (tests and demos).

It holds the project's own dvc.yaml, src/ and params.yaml, with the data bounds shrunk and the
models shrunk to a few seconds of CPU each; nothing here redefines a stage. `tiny_params` is
the one builder of small params for tests, demos and this sandbox.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from fer_pipeline import params as P
from fer_pipeline.synthetic import make_raw_tree

ROOT = Path(__file__).resolve().parents[1]   # the checkout these tests belong to
TINY_CNN = {"epochs": 1, "batch_size": 16, "width": 0.125, "conv_filters": [32, 64],
            "dense_units": [64], "early_stopping_patience": 1}


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (servers started by tests and benchmarks)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sh(*cmd: str, cwd: Path) -> str:
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}")
    return res.stdout + res.stderr


def tiny_params(raw_dir: str | Path = "data/raw/fer2013", *, mlflow_uri: str | None = None,
                n_models: int | None = None, **sections: dict[str, Any]) -> dict[str, Any]:
    """The project's params.yaml with bounds shrunk for tiny synthetic datasets.

    n_models: keep that many custom-CNN models, shrunk to seconds of CPU (float32).
    mlflow_uri: log there, without logged models. sections: {section: {key: value}} updates.
    The result is checked like params.yaml itself.
    """
    params = P.load_raw(ROOT / "params.yaml")
    params["data"]["raw_dir"] = str(raw_dir)
    params["validate"].update({"class_count_min": {"train": 2, "test": 1},
                               "class_count_max": {"train": 1000, "test": 1000},
                               "max_bad_file_fraction": 0.2})
    if n_models is not None:
        models = params.get("models") or {}
        keep = [n for n, m in models.items() if m.get("arch") == "custom_cnn"][:n_models]
        params["models"] = {n: {**models[n], **TINY_CNN} for n in keep}
        params["train"]["precision"] = "float32"
    if mlflow_uri:
        params["mlflow"].update({"tracking_uri": mlflow_uri, "log_model": False})
    for key, value in sections.items():
        params.setdefault(key, {}).update(value)
    P.from_dict(params)   # a builder must not produce params the loader rejects
    return params


def make_project(base: Path, mlflow_uri: str | None = None, n_models: int = 2,
                 per_class: dict[str, int] | None = None) -> Path:
    """base/repo: git + DVC project, committed; MLflow defaults to base/mlflow.db."""
    repo = Path(base) / "repo"
    repo.mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    if (ROOT / "profiles").is_dir():
        shutil.copytree(ROOT / "profiles", repo / "profiles")
    (repo / "teachers").mkdir()   # teach@<name>'s dep; its README is all a clone has of it
    shutil.copy(ROOT / "teachers" / "README.md", repo / "teachers" / "README.md")
    make_raw_tree(repo / "data/raw/fer2013", per_class or {"train": 8, "test": 3})
    uri = mlflow_uri or f"sqlite:///{Path(base).resolve() / 'mlflow.db'}"
    params = tiny_params("data/raw/fer2013", mlflow_uri=uri, n_models=n_models)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("/.cache/\n")
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh("git", "config", "user.email", "sandbox@fer", cwd=repo)
    sh("git", "config", "user.name", "sandbox", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "sandbox", cwd=repo)
    return repo
