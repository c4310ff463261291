"""What a flow parameter may ask of a worker (docs/security.md).

A deployment's parameters come from whoever can reach the Prefect API; a worker must not let
them point the pipeline at another folder, another store or another file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fer_pipeline.errors import FerError

PROJECT_ROOTS_ENV = "FER_ALLOWED_PROJECT_ROOTS"   # os.pathsep-separated extra roots
REFUSED_OVERRIDES = ("data.raw_dir", "train.models_dir", "train.reports_dir", "train.state_dir",
                     "mlflow.tracking_uri", "evaluate.test_path", "evaluate.val_path",
                     "evaluate.reports_dir", "predict.release_dir", "serve.*", "models.*.weights")
# ...and by shape, so a path param added later is refused without editing the list above.
_PATH_LIKE = re.compile(r"(^|[._])(dir|path|paths|uri|url|file|files|host|command|cmd)$")
_SAFE_WEIGHTS = {"imagenet", None}                  # models.*.weights: no path, no URL
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def allowed_project_roots(cwd: str | Path | None = None) -> list[Path]:
    """Where a flow run's project may be: its working directory (the per-run git clone on a
    worker), FER_PROJECT_DIR and the roots listed in FER_ALLOWED_PROJECT_ROOTS."""
    roots = [Path(cwd or os.getcwd())]
    if os.environ.get("FER_PROJECT_DIR"):
        roots.append(Path(os.environ["FER_PROJECT_DIR"]))
    roots += [Path(p) for p in os.environ.get(PROJECT_ROOTS_ENV, "").split(os.pathsep) if p]
    return [r.expanduser().resolve() for r in roots]


def check_project_dir(project_dir: str | Path, roots: Iterable[Path]) -> Path:
    """The resolved project_dir when it lies inside one of `roots` (symlinks and `..` resolved
    first); else a FerError naming the roots and how to allow another one."""
    path = Path(project_dir).expanduser().resolve()
    roots = list(roots)
    if any(path == r or path.is_relative_to(r) for r in roots):
        return path
    raise FerError(f"project_dir {str(project_dir)!r} is outside the allowed roots "
                   f"{[str(r) for r in roots]}: a flow run works in its working directory (the "
                   f"run's git clone), FER_PROJECT_DIR or a root listed in {PROJECT_ROOTS_ENV} "
                   f"(set on the worker, not by a flow parameter)")


def _flat(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"models": {"vgg16": {"weights": x}}} -> {"models.vgg16.weights": x}: a nested value
    cannot hide a refused key."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def refused_override(key: str, value: Any) -> str | None:
    """Why an override may not be set by a flow parameter, or None when it may."""
    import fnmatch

    if "/" in key or "\\" in key:
        return "a key is a dotted param name, not a path"
    if fnmatch.fnmatch(key, "models.*.weights"):
        return None if value in _SAFE_WEIGHTS else \
            "pretrained weights from a flow parameter can only be 'imagenet' (hash-checked) or null"
    if any(fnmatch.fnmatch(key, pat) for pat in REFUSED_OVERRIDES) or _PATH_LIKE.search(key):
        return "it names a file, folder, server or command on the worker"
    return None


def check_flow_inputs(overrides: dict[str, Any] | None, profile: str | None,
                      profiles_dir: str | Path) -> None:
    """Refuse, before anything runs, overrides that set a path/command-like param and a profile
    that is not the name of a profiles/*.yaml (docs/security.md)."""
    if overrides is not None and not isinstance(overrides, dict):
        raise FerError(f"overrides must be a mapping of dotted params to values, "
                       f"not {type(overrides).__name__}")
    bad = {k: why for k, v in _flat(overrides or {}).items() if (why := refused_override(k, v))}
    if bad:
        raise FerError("override(s) refused: " + "; ".join(f"{k} ({why})" for k, why in
                                                             sorted(bad.items()))
                       + ". Change these in params.yaml (a commit) or the worker's environment, "
                       "not through a flow parameter")
    if profile is not None:
        known = sorted(p.stem for p in Path(profiles_dir).glob("*.yaml"))
        if not _PROFILE_NAME.fullmatch(profile) or profile not in known:
            raise FerError(f"profile {profile!r} refused: it must be the name of one of "
                           f"profiles/*.yaml {known}, not a path")
