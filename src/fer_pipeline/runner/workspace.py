"""Where a run works: its own copy of the project, and one workspace per parallel stage.

A run copy (`run_copy`) is a git worktree of the checkout's HEAD plus its uncommitted edits,
sharing its DVC cache: overrides, stages, dvc.lock and the experiment happen there, and the
checkout changes only when `adopt_results` brings back results that are the checkout's own.

Parallel stages on one machine: two `dvc repro` processes in one project fight over DVC's repo
lock and dvc.lock, so each such stage runs in its own workspace (dvc.yaml, params.yaml,
dvc.lock, its deps as hard links, the shared cache) and `bring_back` copies its outputs into
the run copy and `dvc commit`s them, one stage at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import yaml

from fer_pipeline.io import write_text
from fer_pipeline.runner.project import dvc, git, remote_urls, stage_paths
from fer_pipeline.runner.stage import StageFailed, classify

WORKSPACE_ENV = "FER_WORKSPACE_DIR"


def workspace_dir(root: str | Path, stage: str) -> Path:
    """Per-project, per-stage directory outside the project (DVC must not see its dvc.yaml).
    Stable across retries, so a resumable stage (training) finds its state again."""
    root = Path(root).resolve()
    return _base_dir() / f"{root.name}-{_tag(root)}" / stage.replace("@", "-")


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
    for name, url in remote_urls(root).items():
        if "://" not in url:   # a local remote: a relative path would move with the copy
            dvc("remote", "modify", "--local", name, "url", url, cwd=ws)
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
