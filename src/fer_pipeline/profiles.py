"""Named profiles: sets of param overrides applied the way `dvc exp run -S` applies them.

A profile is `profiles/<name>.yaml`, a flat mapping of dotted param keys to values. `fer run
--profile quick` turns it into `dvc exp run --temp -S key=value ...`, so the run is an ordinary
DVC experiment (visible in `dvc exp show`, comparable with `dvc metrics diff`) that runs in a
temporary copy of the project: the checkout's params.yaml, dvc.lock and reports never change.
"""

from __future__ import annotations

import json
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


def set_args(overrides: dict[str, Any]) -> list[str]:
    """`-S key=value` pairs; values in YAML/JSON flow form so lists and null survive."""
    out = []
    for key, value in overrides.items():
        text = value if isinstance(value, str) else json.dumps(value)
        out += ["-S", f"{key}={text}"]
    return out


def dvc_command(overrides: dict[str, Any], targets: list[str], queue: bool = False,
                name: str | None = None) -> list[str]:
    """`dvc exp run --temp|--queue [-n NAME] -S ... [targets]` for already-checked overrides:
    a temporary copy now, or the queue (`dvc queue start`); never the checkout.

    No `--pull`: the copy lives under .dvc/tmp, where the remotes' relative URLs
    (`../../shared/...`) point elsewhere; `fer run` fetches into the shared cache first."""
    return ["dvc", "exp", "run", "--queue" if queue else "--temp",
            *(["-n", name] if name else []), *set_args(overrides), *targets]


def experiment_name(profile: str | None) -> str:
    """`run-<profile>-<UTC time>`: unique, sortable, says what ran."""
    import datetime as dt

    return f"run-{profile or 'params'}-{dt.datetime.now(dt.UTC).strftime('%Y%m%d-%H%M%S')}"
