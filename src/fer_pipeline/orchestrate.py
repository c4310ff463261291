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
from fer_pipeline.io import write_text
from fer_pipeline.profiles import load_profile
from fer_pipeline.tracking import RUN_ID_ENV, portable_uri, resolve_tracking_uri

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


def apply_overrides(root: str | Path, overrides: dict[str, Any],
                    validate: bool = True) -> dict[str, list[Any]]:
    """Write overrides into the workspace's params.yaml (comments kept). Returns changed keys
    as {key: [old, new]}; the file is left untouched when nothing changes. Every key and value
    is checked by the params loader first: a typo fails naming the key, and nothing is written.
    validate=False: a worker writing another commit's params.yaml, whose own loader (run by
    the stage) checks it; this installation's loader may not know that commit's keys."""
    if not overrides:
        return {}
    from ruamel.yaml import YAML  # a DVC dependency; round-trips comments

    path = Path(root) / "params.yaml"
    if validate:
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
    return _base_dir() / f"{root.name}-{_tag(root)}" / stage.replace("@", "-")


def stage_paths(root: str | Path, stage: str) -> tuple[list[str], list[str], list[str]]:
    """(deps, outs, uncached outs) of one stage as paths relative to the project, via DVC's
    own parser."""
    from dvc.repo import Repo

    root = Path(root).resolve()
    with Repo(str(root)) as repo:
        # An absolute target: DVC resolves a bare stage name against the process's working
        # directory, which would read whichever dvc.yaml lies there.
        (st,) = repo.stage.collect(f"{root / 'dvc.yaml'}:{stage}")
        wdir = Path(st.wdir) if Path(st.wdir).is_absolute() else root / st.wdir
        rel = [os.path.relpath(wdir / str(d.def_path), root) for d in st.deps
               if type(d).__name__ != "ParamsDependency"]
        deps = [p for p in rel if not p.startswith("..") and "://" not in p]
        outs = [os.path.relpath(wdir / str(o.def_path), root) for o in st.outs]
        uncached = [path for path, o in zip(outs, st.outs, strict=True) if not o.use_cache]
    return deps, outs, uncached


def merge_lock(root: str | Path, entries: dict[str, Any]) -> None:
    """Put `entries` ({stage: dvc.lock entry}) into the project's dvc.lock (atomic write)."""
    path = Path(root) / "dvc.lock"
    lock = (yaml.safe_load(path.read_text()) if path.is_file() else None) or {}
    lock.setdefault("schema", "2.0")
    lock.setdefault("stages", {}).update(entries)
    write_text(path, yaml.safe_dump(lock, sort_keys=False))


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
    deps, _, _ = stage_paths(root, stage)
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
    _, outs, _ = stage_paths(root, stage)
    for out in outs:
        src = ws / out
        if not src.exists():
            raise StageFailed(stage, 1, [f"error: {out} missing in workspace {ws}"])
        _link_or_copy(src, root / out)
    res = dvc("commit", "--force", stage, cwd=root, check=False)
    if res.returncode != 0:
        raise classify(stage, res.returncode, (res.stdout + res.stderr).splitlines())
    log(f"{stage}: outputs {', '.join(outs)} brought back and committed to dvc.lock")


# ---- run copies: a flow run never edits the checkout --------------------------------------------

def git(*args: str, cwd: str | Path, check: bool = True) -> str:
    res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise FerError(f"git {' '.join(args)} failed in {cwd}: {res.stderr.strip()}")
    return res.stdout


def run_copy(root: str | Path, run_id: str) -> Path:
    """The project as one flow run sees it: a git worktree of the checkout's HEAD plus the
    checkout's uncommitted edits and new (not ignored) files, sharing its DVC cache and
    remotes. Overrides, stages, dvc.lock and experiments happen here; the checkout's
    params.yaml and dvc.lock are never written. Keyed by the run id, so a retry finds it."""
    root = Path(root).resolve()
    ws = _base_dir() / f"{root.name}-{_tag(root)}" / "runs" / run_id
    if (ws / ".git").exists():
        return ws
    ws.parent.mkdir(parents=True, exist_ok=True)
    git("worktree", "add", "--detach", "--force", str(ws), "HEAD", cwd=root)
    edited = git("diff", "--name-only", "HEAD", cwd=root).splitlines()
    new = git("ls-files", "--others", "--exclude-standard", cwd=root).splitlines()
    for rel in edited + new:
        src, dst = root / rel, ws / rel
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        elif dst.is_file():
            dst.unlink()
    cache = Path(root, dvc("cache", "dir", cwd=root).stdout.strip()).resolve()
    dvc("cache", "dir", "--local", str(cache), cwd=ws)
    for line in dvc("remote", "list", cwd=root).stdout.splitlines():
        name, _, url = line.partition(" ")
        url = url.strip().split()[0] if url.strip() else ""
        if url and "://" not in url:   # a local remote: relative paths would move with the copy
            dvc("remote", "modify", "--local", name, "url", str(Path(root, ".dvc", url).resolve()),
                cwd=ws)
    dvc("checkout", "--allow-missing", cwd=ws, check=False)   # what the shared cache has
    return ws


def adopt_results(root: str | Path, ws: str | Path, stages: list[str],
                  log: Callable[[str], None] = print) -> None:
    """Bring the results of `stages` from a run copy into the checkout, only when they are the
    checkout's: each stage's dvc.lock entry is moved over, and if `dvc status` in the checkout
    then reports a changed dependency, param or command (someone edited the checkout since the
    run started), the checkout's dvc.lock is put back byte for byte and the run fails naming
    what changed; otherwise the outputs are copied in. One run at a time (inter-process lock)."""
    import fcntl

    root, ws = Path(root).resolve(), Path(ws)
    if not stages:
        return
    lock_path = root / ".dvc" / "tmp" / "fer-adopt.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock_fh:
        fcntl.flock(lock_fh, fcntl.LOCK_EX)
        checkout_lock = root / "dvc.lock"
        before = checkout_lock.read_bytes() if checkout_lock.is_file() else None
        ran = (yaml.safe_load((ws / "dvc.lock").read_text()) or {}).get("stages") or {}
        current = yaml.safe_load(before) if before else None
        current = current or {"schema": "2.0", "stages": {}}
        for stage in stages:
            current.setdefault("stages", {})[stage] = ran[stage]
        write_text(checkout_lock, yaml.safe_dump(current, sort_keys=False))
        produced = [out for stage in stages for out in stage_paths(ws, stage)[1]]
        moved = _changed_inputs(root, stages, produced)
        if moved:
            if before is None:
                checkout_lock.unlink()
            else:
                checkout_lock.write_bytes(before)
            raise StageFailed(stages[0], 1, [
                "error: the checkout changed since this run started, so its results are not "
                "brought back (they stay in the run's DVC experiment):", *moved])
        for out in produced:
            _link_or_copy(ws / out, root / out)
            ignore = (ws / out).parent / ".gitignore"   # DVC's entry for the output: part of
            if ignore.is_file() and (ws / out).parent != ws:   # a folder dep's hash (`models`)
                shutil.copy2(ignore, root / Path(out).parent / ".gitignore")
    log(f"results of {', '.join(stages)} brought back into the checkout's dvc.lock")


def _changed_inputs(root: Path, stages: list[str], produced: list[str]) -> list[str]:
    """`dvc status` lines that say a stage's deps, params or command differ in the checkout
    (deps that are outputs of the stages being brought back together do not count)."""
    res = dvc("status", "--json", *stages, cwd=root, check=False)
    try:
        status = json.loads(res.stdout or "{}")
    except json.JSONDecodeError:
        return [f"  dvc status failed: {res.stderr.strip()}"]
    lines = []
    for stage, changes in status.items():
        for change in changes:
            if isinstance(change, str):          # "changed command", "always changed"
                lines.append(f"  {stage}: {change}")
            elif "changed deps" in change:
                for dep, how in change["changed deps"].items():
                    if not any(_overlap(dep, out) for out in produced):
                        lines.append(f"  {stage}: {dep} {how}")
    return lines


def _overlap(a: str, b: str) -> bool:
    """One path is the other or inside it (a folder dep such as `models` holds the outputs)."""
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def remove_run_copy(root: str | Path, ws: str | Path) -> None:
    git("worktree", "remove", "--force", str(ws), cwd=root, check=False)
    shutil.rmtree(ws, ignore_errors=True)
    git("worktree", "prune", cwd=root, check=False)


def _base_dir() -> Path:
    return Path(os.environ.get(WORKSPACE_ENV) or Path(tempfile.gettempdir()) / "fer-workspaces")


def _tag(root: Path) -> str:
    return hashlib.sha1(str(root).encode()).hexdigest()[:8]


# ---- run identity and reports -----------------------------------------------------------------

def save_experiment(root: str | Path, name: str) -> str | None:
    """`dvc exp save -n NAME`: the workspace (params, dvc.lock, metrics) as a DVC experiment.

    One at a time per git repository: run copies are worktrees of one repository, and two
    `dvc exp save` at once race on its shared experiment refs (seen: one experiment saved
    without its run's params)."""
    import fcntl

    common = Path(root, git("rev-parse", "--git-common-dir", cwd=root).strip()).resolve()
    with (common / "fer-exp-save.lock").open("w") as lock_fh:
        fcntl.flock(lock_fh, fcntl.LOCK_EX)
        # New files the run made (metrics, reports, DVC's .gitignore entries) belong to the
        # experiment: without them a teammate's `dvc exp apply` + `dvc pull` is not up to date.
        new = git("ls-files", "--others", "--exclude-standard", cwd=root, check=False).splitlines()
        include = [arg for path in new for arg in ("-I", path)]
        res = dvc("exp", "save", "--force", "-n", name, *include, cwd=root, check=False)
    if res.returncode != 0:
        return None
    return name


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


def keep_results(ws: str | Path, experiment: str | None,
                 log: Callable[[str], None] = print) -> list[str]:
    """A deployment run works in a clone that the worker deletes after the run: its DVC outputs
    go to the project's default DVC remote (`dvc push`) and its experiment to the clone's
    `origin` (`dvc exp push`), where the team finds them (`dvc exp pull origin NAME`). Returns
    what could not be kept, for the run's log and report (the trainings themselves succeeded)."""
    problems = []
    remote = dvc("remote", "default", cwd=ws, check=False).stdout.strip()
    if not remote:
        problems.append("no default DVC remote: this run's outputs (splits, models) are not kept "
                        "once the clone is deleted; set one (`dvc remote default storage`, "
                        "docs/team-stores.md)")
    else:
        res = dvc("push", "-q", cwd=ws, check=False)
        if res.returncode != 0:
            tail = " | ".join((res.stdout + res.stderr).strip().splitlines()[-5:])
            problems.append(f"dvc push to {remote} failed: {tail}")
        else:
            log(f"outputs pushed to DVC remote {remote}")
    if experiment:
        # Prefect's git_clone makes a shallow clone; DVC's push (dulwich) walks the history
        # and fails on the first missing parent with a bare commit id. Deepen it first.
        shallow = git("rev-parse", "--is-shallow-repository", cwd=ws, check=False).strip()
        git("fetch", "--quiet", *(["--unshallow"] if shallow == "true" else []), "origin",
            cwd=ws, check=False)
        res = dvc("exp", "push", "--no-cache", "origin", experiment, cwd=ws, check=False)
        if res.returncode != 0:
            tail = " | ".join((res.stdout + res.stderr).strip().splitlines()[-5:])
            problems.append(f"dvc exp push origin {experiment} failed (the worker needs push "
                            f"access to the repository): {tail}")
        else:
            log(f"DVC experiment {experiment} pushed to origin (`dvc exp pull origin {experiment}`)")
    return problems


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


# ---- what a flow parameter may ask of a worker (docs/security.md) ----
# A deployment's parameters come from whoever can reach the Prefect API; a worker must not let
# them point the pipeline at another folder, another store or another file. Keys by name:
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
