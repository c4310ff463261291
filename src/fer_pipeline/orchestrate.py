"""Run the stages that dvc.yaml defines, one at a time or in isolated workspaces.

No Prefect here: `flows/pipeline.py` wraps these functions in tasks. dvc.yaml stays the one
definition of the stages; everything below shells out to `dvc` for ONE stage at a time
(`dvc repro --single-item <stage>`), so DVC decides what is up to date and what runs.

Parallel trainings: two `dvc repro` processes in one workspace fight over DVC's repo lock and
dvc.lock. A `train@<model>` stage therefore runs in its own workspace (a directory outside
the project holding dvc.yaml, params.yaml, dvc.lock, the stage's deps as hard links and a
`.dvc/config` that shares the project's DVC cache). Afterwards its outputs are copied back and
`dvc commit` records them in the project's dvc.lock, one stage at a time.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fer_pipeline import params as P
from fer_pipeline.champion import choose_champion
from fer_pipeline.errors import ERROR_FILE_ENV, FerError, TransientError
from fer_pipeline.profiles import load_profile
from fer_pipeline.tracking import RUN_ID_ENV, resolve_tracking_uri

__all__ = ["RUN_ID_ENV"]   # re-exported for the flows: the one run-id variable
WORKSPACE_ENV = "FER_WORKSPACE_DIR"

# The one failure `fer` cannot report itself: DVC's own repo lock is busy (another dvc process
# in the same workspace). Everything else is classified by the type `fer` reports (FerError ->
# ERROR_FILE_ENV), never by searching the output.
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


# ---- the stage list, read from dvc.yaml (+ params for foreach) -----------------------------

def dvc_exe() -> str:
    """This interpreter's `dvc` (workers are often started without the venv on PATH)."""
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.is_file() else "dvc"


def dvc(*args: str, cwd: str | Path, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([dvc_exe(), *args], cwd=cwd, capture_output=True, text=True, env=env)
    if check and res.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed in {cwd}:\n{res.stdout}\n{res.stderr}")
    return res


def stage_groups(root: str | Path) -> list[list[str]]:
    """Stages in dvc.yaml order; a foreach stage is one group of items that may run in parallel.

    Names come from `dvc stage list --name-only`, so `train@<model>` follows the params
    `models` keys without this code knowing them.
    """
    root = Path(root)
    top = list((yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {}))
    names = dvc("stage", "list", "--name-only", cwd=root).stdout.split()
    groups = []
    for key in top:
        items = [n for n in names if n == key or n.startswith(key + "@")]
        if items:
            groups.append(items)
    return groups


def stage_is_current(stage: str, root: str | Path) -> bool:
    """True when DVC would skip the stage (deps, params and outs as recorded in dvc.lock)."""
    res = dvc("status", "--json", stage, cwd=root, check=False)
    if res.returncode != 0:
        return False
    try:
        return not json.loads(res.stdout or "{}")
    except json.JSONDecodeError:
        return False


# ---- running one stage ---------------------------------------------------------------------

def stage_env(root: str | Path, run_id: str | None = None,
              base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a stage: this venv's scripts on PATH, unbuffered output, run id, and an
    MLflow URI resolved against the project (so isolated workspaces log to the same store)."""
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
    """Create an embedded (sqlite) MLflow store and the experiment once, before parallel
    stages start: two processes creating the same tables/experiment race and one fails."""
    uri = env.get("MLFLOW_TRACKING_URI") or ""
    if not uri.startswith("sqlite:"):
        return
    experiment = load_params(root).mlflow.experiment
    subprocess.run([sys.executable, "-c", _INIT_TRACKING, uri, experiment], env=env,
                   capture_output=True, text=True, timeout=600)


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


# ---- parameter overrides (like `dvc exp run -S`) ---------------------------------------------

def build_overrides(overrides: dict[str, Any] | None = None, *, models: Iterable[str] | None = None,
                    epochs: int | None = None, max_per_class: int | None = None,
                    profile: str | None = None, root: str | Path = ".") -> dict[str, Any]:
    """Flat {dotted.key: value}: profile first, then the named shortcuts, then `overrides`."""
    out: dict[str, Any] = {}
    if profile:
        out.update(load_profile(profile, Path(root) / "profiles"))
    if max_per_class is not None:
        out["data.max_per_class"] = max_per_class
    if epochs is not None:
        names = list(models) if models else list(model_names(root))
        for name in names:
            out[f"models.{name}.epochs"] = epochs
    out.update(overrides or {})
    return out


def model_names(root: str | Path) -> list[str]:
    return list(load_params(root).models)


def apply_overrides(root: str | Path, overrides: dict[str, Any]) -> dict[str, list[Any]]:
    """Write overrides into the workspace's params.yaml (comments kept). Returns changed keys
    as {key: [old, new]}; the file is left untouched when nothing changes. Every key and value
    is checked by the params loader first: a typo fails naming the key, and nothing is written."""
    if not overrides:
        return {}
    from ruamel.yaml import YAML  # a DVC dependency; round-trips comments

    path = Path(root) / "params.yaml"
    P.load(path, overrides)
    ryaml = YAML()
    ryaml.preserve_quotes = True
    data = ryaml.load(path.read_text())
    changed: dict[str, list[Any]] = {}
    for key, value in overrides.items():
        old = _get_dotted(data, key)
        if old != value:
            P.set_dotted(data, key, value)
            changed[key] = [_plain(old), value]
    if changed:
        with path.open("w") as fh:
            ryaml.dump(data, fh)
    return changed


def _get_dotted(data: Any, key: str) -> Any:
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ---- isolated workspaces for parallel stages ------------------------------------------------

def workspace_dir(root: str | Path, stage: str) -> Path:
    """Per-project, per-stage directory outside the project (DVC must not see its dvc.yaml).
    Stable across retries, so a resumable stage (training) finds its state again."""
    root = Path(root).resolve()
    base = Path(os.environ.get(WORKSPACE_ENV) or Path(tempfile.gettempdir()) / "fer-workspaces")
    tag = hashlib.sha1(str(root).encode()).hexdigest()[:8]
    return base / f"{root.name}-{tag}" / stage.replace("@", "-")


def stage_paths(root: str | Path, stage: str) -> tuple[list[str], list[str]]:
    """(deps, outs) of one stage as paths relative to the project, via DVC's own parser."""
    from dvc.repo import Repo

    root = Path(root).resolve()
    with Repo(str(root)) as repo:
        (st,) = repo.stage.collect(stage)
        # DVC resolves a stage's wdir against the process cwd, not the repo: undo that.
        wdir = root / os.path.relpath(st.wdir, os.getcwd())
        rel = [os.path.relpath(wdir / str(d.def_path), root) for d in st.deps
               if type(d).__name__ != "ParamsDependency"]
        deps = [p for p in rel if not p.startswith("..") and "://" not in p]
        outs = [os.path.relpath(wdir / str(o.def_path), root) for o in st.outs]
    return deps, outs


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        else:
            dst.unlink()
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_file,
                        ignore=shutil.ignore_patterns("__pycache__"))
    else:
        _link_file(src, dst)


def _link_file(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def prepare_workspace(root: str | Path, stage: str, ws: str | Path | None = None) -> Path:
    """A minimal DVC project for one stage: dvc.yaml, params.yaml, dvc.lock, the stage's deps
    (hard links) and a .dvc/config sharing the project's cache. Existing state is kept."""
    root = Path(root).resolve()
    ws = Path(ws) if ws else workspace_dir(root, stage)
    ws.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", "dvc.lock", ".dvcignore"):
        if (root / name).is_file():
            shutil.copy2(root / name, ws / name)
    deps, _ = stage_paths(root, stage)
    for dep in deps:
        if (root / dep).exists():
            _link_or_copy(root / dep, ws / dep)
    cache = dvc("cache", "dir", cwd=root).stdout.strip()
    (ws / ".dvc").mkdir(exist_ok=True)
    (ws / ".dvc" / "config").write_text(
        f"[core]\n    no_scm = true\n[cache]\n    dir = {Path(root, cache).resolve()}\n")
    return ws


def bring_back(root: str | Path, stage: str, ws: str | Path,
               log: Callable[[str], None] = print) -> None:
    """Copy a stage's outputs from its workspace into the project and `dvc commit` them there
    (the outputs are already in the shared cache, so this only hashes and writes dvc.lock)."""
    root, ws = Path(root).resolve(), Path(ws)
    _, outs = stage_paths(root, stage)
    for out in outs:
        src = ws / out
        if not src.exists():
            raise StageFailed(stage, 1, [f"error: {out} missing in workspace {ws}"])
        _link_or_copy(src, root / out)
    res = dvc("commit", "--force", stage, cwd=root, check=False)
    if res.returncode != 0:
        raise classify(stage, res.returncode, (res.stdout + res.stderr).splitlines())
    log(f"{stage}: outputs {', '.join(outs)} brought back and committed to dvc.lock")


def run_stage_isolated(root: str | Path, stage: str, env: dict[str, str] | None = None,
                       log: Callable[[str], None] = print) -> StageResult:
    """Run one stage in its own workspace (no bring-back). Skipped when current in the project."""
    start = time.monotonic()
    if stage_is_current(stage, root):
        log(f"Stage '{stage}' didn't change, skipping")
        return StageResult(stage, "skipped", time.monotonic() - start)
    ws = prepare_workspace(root, stage)
    result = run_stage(stage, ws, env=env, log=log)
    result.workspace = str(ws)
    result.seconds = time.monotonic() - start
    return result


# ---- run identity and reports -----------------------------------------------------------------

def save_experiment(root: str | Path, name: str) -> str | None:
    """`dvc exp save -n NAME`: the workspace (params, dvc.lock, metrics) as a DVC experiment."""
    res = dvc("exp", "save", "--force", "-n", name, cwd=root, check=False)
    if res.returncode != 0:
        return None
    return name


def comparison_markdown(root: str | Path) -> str:
    """The evaluate stage's comparison (it names the champion); else a table of the training
    metrics with the best val_accuracy marked, so the artifact is useful before evaluate lands."""
    root = Path(root)
    report = root / "reports" / "evaluate" / "comparison.md"
    if report.is_file():
        return report.read_text()
    rows = []
    for path in sorted((root / "reports" / "train").glob("*/metrics.json")):
        try:
            rows.append((path.parent.name, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError):
            continue
    if not rows:
        return "_No model metrics yet._\n"
    keys = [k for k in ("val_accuracy", "val_loss", "best_epoch", "epochs_run", "train_seconds")
            if any(k in m for _, m in rows)]
    best = choose_champion(dict(rows))
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, m in rows:
        cells = [_fmt(m.get(k)) for k in keys]
        lines.append(f"| {'**' + name + '**' if name == best else name} | " + " | ".join(cells) + " |")
    return ("\n".join(lines) + f"\n\nChampion (highest val_accuracy, from training metrics; the "
            f"evaluate stage's test-set comparison replaces this table when it runs): **{best}**\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)
