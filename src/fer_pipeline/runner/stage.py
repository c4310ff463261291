"""Run one stage of dvc.yaml: `dvc repro --single-item <stage>`, its output streamed, its
failure classified (a real failure, or one that may pass and is worth a retry).

DVC decides what is up to date and what runs; `fer` reports its own errors through
ERROR_FILE_ENV, so a failure is classified by type, never by searching the output (except
DVC's own busy lock).
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fer_pipeline import params as P
from fer_pipeline.errors import ERROR_FILE_ENV, FerError, TransientError
from fer_pipeline.runner.project import dvc_exe
from fer_pipeline.tracking import RUN_ID_ENV, portable_uri, resolve_tracking_uri

__all__ = ["RUN_ID_ENV"]   # re-exported for the flows: the one run-id variable

DVC_LOCK_BUSY = re.compile(r"unable to acquire lock", re.IGNORECASE)

ERROR_LINE = re.compile(r"error|failed|exception|traceback", re.IGNORECASE)


class StageFailed(FerError):
    """A stage exited non-zero; the message holds the stage's own error lines."""

    def __init__(self, stage: str, returncode: int, tail: list[str]):
        self.stage, self.returncode, self.tail = stage, returncode, tail
        super().__init__(f"stage '{stage}' failed (exit {returncode}):\n" + "\n".join(error_lines(tail)))


class TransientStageError(StageFailed, TransientError):
    """A stage failed for a reason that may pass (tracking server down, lock busy): retry."""


@dataclass
class StageResult:
    stage: str
    status: str                     # ran | skipped
    seconds: float
    workspace: str | None = None
    lines: list[str] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "status": self.status, "seconds": round(self.seconds, 1),
                "workspace": self.workspace}


def error_lines(tail: list[str], keep: int = 25, window: int = 80) -> list[str]:
    """The lines a person needs: from the stage's first error line (within the last `window`
    lines) to the end, e.g. "fer validate: error: data checks failed" and its details."""
    recent = tail[-window:]
    start = next((i for i, ln in enumerate(recent) if ERROR_LINE.search(ln)), max(0, len(recent) - 10))
    block = recent[start:]
    if len(block) > keep:
        block = block[: keep - 3] + ["..."] + block[-2:]
    return block


def classify(stage: str, returncode: int, tail: list[str],
             reported: dict[str, Any] | None = None) -> StageFailed:
    """StageFailed, or TransientStageError when `fer` reported a TransientError (its
    ERROR_FILE_ENV record) or DVC's own lock was busy."""
    if reported is not None:
        transient = bool(reported.get("transient"))
    else:
        transient = bool(DVC_LOCK_BUSY.search("\n".join(tail[-40:])))
    return (TransientStageError if transient else StageFailed)(stage, returncode, tail)


def read_reported_error(path: str | Path) -> dict[str, Any] | None:
    """What `fer` wrote to ERROR_FILE_ENV on a FerError; None when it wrote nothing."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    try:
        return json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        return None


def stage_env(root: str | Path, run_id: str | None = None,
              base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a stage: this venv's scripts on PATH, unbuffered output, run id, and an
    MLflow URI resolved against `root`, the checkout (so run copies and isolated workspaces
    log to the checkout's store, not to a throw-away one)."""
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    if run_id:
        env[RUN_ID_ENV] = run_id
    if not env.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = resolve_tracking_uri(load_params(root).mlflow.tracking_uri, root)
    return env


def load_params(root: str | Path) -> P.Params:
    """The project's params.yaml, typed (a typo fails here, before any stage runs)."""
    return P.load(Path(root) / "params.yaml")


_INIT_TRACKING = (
    "import sys, mlflow\n"
    "mlflow.set_tracking_uri(sys.argv[1])\n"
    "mlflow.set_experiment(sys.argv[2])\n"
)


def init_tracking_store(root: str | Path, env: dict[str, str]) -> None:
    """Create an embedded (sqlite) MLflow store and the experiment once, before stages start:
    two processes creating the same tables/experiment race and one fails. Runs at once (two
    `fer run`s, parallel trainings) take turns here through a lock file beside the store."""
    import fcntl

    uri = env.get("MLFLOW_TRACKING_URI") or ""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri[len("sqlite:///"):])
    experiment = load_params(root).mlflow.experiment
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.init.lock", "w") as lock_fh:
        fcntl.flock(lock_fh, fcntl.LOCK_EX)
        # From the store's folder: MLflow puts a new experiment's artifacts in ./mlruns of the
        # creating process, which must outlive the run (not a run copy, not the checkout).
        subprocess.run([sys.executable, "-c", _INIT_TRACKING, uri, experiment], env=env,
                       cwd=db.parent, capture_output=True, text=True, timeout=600)


def run_stage(stage: str, cwd: str | Path, env: dict[str, str] | None = None,
              log: Callable[[str], None] = print, force: bool = False) -> StageResult:
    """`dvc repro --single-item <stage>`, streaming its output line by line to `log`.

    Returns ran/skipped; raises StageFailed (or TransientStageError) with the stage's own error
    lines on a non-zero exit.
    """
    cmd = [dvc_exe(), "repro", "--single-item", stage] + (["--force"] if force else [])
    start = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=300)
    log(f"$ dvc {' '.join(cmd[1:])}   (in {cwd})")
    fd, error_file = tempfile.mkstemp(prefix="fer-error-", suffix=".json")
    os.close(fd)
    env = {**(os.environ if env is None else env), ERROR_FILE_ENV: error_file}
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            tail.append(line)
            log(line)
        rc = proc.wait()
        reported = read_reported_error(error_file)
    finally:
        os.unlink(error_file)
    seconds = time.monotonic() - start
    lines = list(tail)
    if rc != 0:
        raise classify(stage, rc, lines, reported)
    ran = any(f"Running stage '{stage}'" in ln for ln in lines)
    return StageResult(stage, "ran" if ran else "skipped", seconds, lines=lines)


def check_store_outlives(root: str | Path) -> None:
    """A deployment run's project is a clone the worker deletes after the run: an MLflow store
    inside it (params.yaml's default `sqlite:///mlflow.db`) would go with it, runs, registry
    and champion. Refuse before anything trains, saying what to set."""
    uri = stage_env(root)["MLFLOW_TRACKING_URI"]
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else \
        uri[len("file://"):] if uri.startswith("file://") else None if "://" in uri else uri
    if path and Path(path).resolve().is_relative_to(Path(root).resolve()):
        raise FerError(
            f"the MLflow store {portable_uri(uri, root)} lies inside this run's clone of the "
            f"code, which the worker deletes after the run: set MLFLOW_TRACKING_URI in the "
            f"worker's environment to the team's MLflow server (docs/team-stores.md) or to a "
            f"store outside the clone (an absolute sqlite:/// URI)")
