"""Named profiles: sets of param overrides applied the way `dvc exp run -S` applies them.

A profile is `profiles/<name>.yaml`, a flat mapping of dotted param keys to values. `fer run
--profile quick` turns it into `dvc exp run -S key=value ...`, so the run is an ordinary DVC
experiment (visible in `dvc exp show`, comparable with `dvc metrics diff`) and params.yaml
stays the single source of truth for what ran.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
from pathlib import Path
from typing import Any

import yaml

from fer_pipeline.cli import StageError

log = logging.getLogger(__name__)
PROFILE_DIR = Path("profiles")


def load_profile(name: str, directory: Path = PROFILE_DIR) -> dict[str, Any]:
    path = directory / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in directory.glob("*.yaml"))
        raise StageError(f"unknown profile {name!r}: {path} not found (known: {known})")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or any(not isinstance(k, str) for k in raw):
        raise StageError(f"{path} must be a flat mapping of dotted param keys to values")
    return raw


def set_args(overrides: dict[str, Any]) -> list[str]:
    """`-S key=value` pairs; values in YAML/JSON flow form so lists and null survive."""
    out = []
    for key, value in overrides.items():
        text = value if isinstance(value, str) else json.dumps(value)
        out += ["-S", f"{key}={text}"]
    return out


def dvc_command(profile: str | None, extra_sets: list[str], targets: list[str],
                queue: bool = False) -> list[str]:
    cmd = ["dvc", "exp", "run", "--pull"]
    if queue:
        cmd.append("--queue")
    if profile:
        cmd += set_args(load_profile(profile))
    for item in extra_sets:
        cmd += ["-S", item]
    return cmd + targets


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the pipeline as a DVC experiment, optionally with a profile")
    p.add_argument("--profile", help="profile name from profiles/ (e.g. quick)")
    p.add_argument("-S", "--set", dest="sets", action="append", default=[],
                   metavar="KEY=VALUE", help="extra param override (repeatable)")
    p.add_argument("--queue", action="store_true", help="queue instead of running now")
    p.add_argument("--dry", action="store_true", help="print the dvc command only")
    p.add_argument("targets", nargs="*", help="stages to run (default: the whole pipeline)")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    cmd = dvc_command(args.profile, args.sets, args.targets, args.queue)
    print("$ " + shlex.join(cmd), flush=True)
    if args.dry:
        return 0
    return subprocess.call(cmd)
