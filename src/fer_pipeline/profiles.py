"""Named profiles: sets of param overrides applied the way `dvc exp run -S` applies them.

A profile is `profiles/<name>.yaml`, a flat mapping of dotted param keys to values. `fer run
--profile quick` writes them into the params.yaml of the run's own copy of the project and
records the run as an ordinary DVC experiment (visible in `dvc exp show`, comparable with
`dvc metrics diff`): the checkout's params.yaml, dvc.lock and reports never change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fer_pipeline.errors import FerError

PROFILE_DIR = Path("profiles")


def load_profile(name: str, directory: str | Path = PROFILE_DIR) -> dict[str, Any]:
    path = Path(directory) / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(directory).glob("*.yaml"))
        raise FerError(f"unknown profile {name!r}: {path} not found (known: {known})")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or any(not isinstance(k, str) for k in raw):
        raise FerError(f"{path} must be a flat mapping of dotted param keys to values")
    return raw


def experiment_name(profile: str | None) -> str:
    """`run-<profile>-<UTC time>`: unique, sortable, says what ran."""
    import datetime as dt

    return f"run-{profile or 'params'}-{dt.datetime.now(dt.UTC).strftime('%Y%m%d-%H%M%S')}"
