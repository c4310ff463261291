"""Helpers shared by test modules (import as `from project import ...`; conftest puts tests/
on sys.path). Kept out of conftest.py: several conftest modules exist, so `from conftest`
would pick whichever was imported first."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


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
