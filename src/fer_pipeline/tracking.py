"""Where results are sent and who made them: MLflow tracking URI, run identity, git, data hashes.

Tracking URI: env MLFLOW_TRACKING_URI wins over params `mlflow.tracking_uri`; the default is an
embedded SQLite file in the project (`sqlite:///mlflow.db`), so nothing has to be started. A
relative sqlite path is resolved against the project root (the working directory of `dvc repro`).
An http(s) server is probed before any work, failing in seconds with a clear message.
Shared by train, evaluate, predict and the runner; imports nothing from the stages.
"""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import yaml

from fer_pipeline.errors import TransientError
from fer_pipeline.io import md5_file

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
RUN_ID_ENV = "FER_PIPELINE_RUN_ID"


class TrackingUnavailable(TransientError):
    """The configured MLflow tracking server cannot be reached."""


def resolve_tracking_uri(params_uri: str | None = None, root: str | Path = ".") -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params_uri or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str((Path(root) / uri[len(prefix):]).resolve())
    elif "://" not in uri:  # a plain directory/file path
        uri = str((Path(root) / uri).resolve())
    return uri


def portable_uri(uri: str, root: str | Path = ".") -> str:
    """The URI as a committed file may hold it: no path of this machine. A local store inside
    `root` becomes relative (`sqlite:///mlflow.db`); one outside keeps only its file name
    (`sqlite:///<outside>/mlflow.db`); server URLs stay as they are."""
    prefix = next((p for p in ("sqlite:///", "file://") if uri.startswith(p)), "")
    if not prefix and "://" in uri:
        return uri                      # a server
    path = uri[len(prefix):]
    if not path.startswith("/"):
        return uri                      # already relative
    try:
        return prefix + str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return f"{prefix}<outside>/{Path(path).name}"


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Fail fast (seconds) when an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310
            if resp.status >= 500:
                raise OSError(f"HTTP {resp.status}")
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise TrackingUnavailable(_unreachable(uri, f"HTTP {exc.code}")) from exc
    except (OSError, ValueError) as exc:
        raise TrackingUnavailable(_unreachable(uri, str(exc))) from exc


def _unreachable(uri: str, reason: str) -> str:
    src = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "mlflow.tracking_uri"
    return (
        f"MLflow tracking server {uri} (from {src}) is unreachable: {reason}. Start it, e.g. "
        f"`mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000`, "
        f"or unset {src} to use the embedded store {DEFAULT_TRACKING_URI}."
    )


def setup_tracking(params_uri: str | None, experiment: str, timeout: float = 3.0,
                   root: str | Path = ".") -> str:
    """Resolve + probe the URI, point MLflow at it and select the experiment. Returns the URI."""
    uri = resolve_tracking_uri(params_uri, root)
    check_reachable(uri, timeout)
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    return uri


def pipeline_run_id() -> str:
    """Groups the runs of one pipeline execution; set FER_PIPELINE_RUN_ID to share it."""
    rid = os.environ.get(RUN_ID_ENV)
    if not rid:
        rid = uuid.uuid4().hex[:12]
        os.environ[RUN_ID_ENV] = rid
    return rid


def git_info(root: str | Path = ".") -> dict[str, str]:
    """{"commit", "dirty" ("true"/"false"), "branch"}; commit "unknown" outside a git checkout."""
    def git(*args: str) -> str:
        try:
            res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return res.stdout.strip() if res.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = commit != "unknown" and bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"commit": commit, "dirty": str(dirty).lower(), "branch": git("branch", "--show-current")}


def git_commit(root: str | Path = ".") -> str:
    """HEAD's commit, with "-dirty" when tracked files are modified."""
    info = git_info(root)
    return info["commit"] + ("-dirty" if info["dirty"] == "true" else "")


def data_hashes(paths: list[str | Path], lock: str | Path = "dvc.lock") -> dict[str, str]:
    """md5 per data file as DVC recorded it in dvc.lock (computed when not locked)."""
    recorded: dict[str, str] = {}
    lock = Path(lock)
    if lock.is_file():
        try:
            data = yaml.safe_load(lock.read_text()) or {}
            for stage in (data.get("stages") or {}).values():
                for out in stage.get("outs") or []:
                    if "md5" in out:
                        recorded[os.path.normpath(out["path"])] = out["md5"]
        except (yaml.YAMLError, AttributeError):
            recorded = {}
    result = {}
    for p in paths:
        key = os.path.normpath(str(p))
        result[key] = recorded.get(key) or (md5_file(p) if Path(p).is_file() else "missing")
    return result


def run_tags(data_files: list[str | Path], extra: dict[str, Any] | None = None) -> dict[str, str]:
    tags = {"pipeline_run_id": pipeline_run_id(), "git_commit": git_commit()}
    for path, md5 in data_hashes(data_files).items():
        tags[f"data_md5.{Path(path).stem}"] = md5
    tags.update({k: str(v) for k, v in (extra or {}).items()})
    return tags


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become their string form."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = "null" if v is None else v
    return out
