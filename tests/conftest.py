"""Shared fixtures. Real services only: tests start their own MLflow/Prefect servers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from fer_pipeline.synthetic import make_raw_tree

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses (dvc stages call `fer`) must find this venv's console scripts.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


def tiny_params(raw_dir: Path, **sections) -> dict:
    """params.yaml of the project with bounds shrunk for tiny synthetic datasets."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["raw_dir"] = str(raw_dir)
    params["validate"]["class_count_min"] = {"train": 2, "test": 1}
    params["validate"]["class_count_max"] = {"train": 1000, "test": 1000}
    params["validate"]["max_bad_file_fraction"] = 0.2
    for key, value in sections.items():
        params.setdefault(key, {}).update(value)
    return params


@pytest.fixture
def raw_tree(tmp_path: Path) -> Path:
    """A clean synthetic dataset: 10 train and 4 test images per class."""
    return make_raw_tree(tmp_path / "raw" / "fer2013", {"train": 10, "test": 4})


@pytest.fixture
def params_file(tmp_path: Path, raw_tree: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(raw_tree)))
    return path
