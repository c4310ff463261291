"""The DVC project as the runner sees it: `dvc` and `git` as subprocesses, the stage list,
one stage's paths, which stages hold a GPU, and dvc.lock merges.

dvc.yaml stays the one definition of the stages: names come from `dvc stage list`, paths from
DVC's own parser, and a stage's `meta: {gpu: true}` (ignored by DVC itself) says that its
items hold an accelerator, so they run in their own workspace or on a GPU worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from fer_pipeline.errors import FerError
from fer_pipeline.io import write_text


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


def git(*args: str, cwd: str | Path, check: bool = True) -> str:
    res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise FerError(f"git {' '.join(args)} failed in {cwd}: {res.stderr.strip()}")
    return res.stdout


def remote_urls(root: str | Path) -> dict[str, str]:
    """{remote name: URL} as DVC resolves them (a local path absolute). Read through DVC's API:
    `dvc remote list` wraps long lines at 80 columns."""
    from dvc.repo import Repo

    with Repo(str(Path(root).resolve())) as repo:
        return {name: str(conf.get("url", "")) for name, conf in repo.config["remote"].items()}


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


def gpu_stages(root: str | Path) -> set[str]:
    """Top-level stages of dvc.yaml whose `meta` (or a foreach's `do.meta`) says `gpu: true`."""
    stages = (yaml.safe_load((Path(root) / "dvc.yaml").read_text()) or {}).get("stages", {})
    out = set()
    for name, spec in stages.items():
        spec = spec or {}
        meta = (spec.get("do") or {}).get("meta") if "foreach" in spec else spec.get("meta")
        if isinstance(meta, dict) and meta.get("gpu") is True:
            out.add(name)
    return out


def holds_gpu(stage: str, gpu: set[str]) -> bool:
    """`train@fernet` holds a GPU when `train` is in `gpu` (gpu_stages)."""
    return stage.split("@", 1)[0] in gpu


def upstream(root: str | Path, targets: list[str]) -> set[str]:
    """The stages `dvc repro <targets>` would consider: the targets and everything they
    depend on (stage names as `dvc stage list` prints them)."""
    from dvc.repo import Repo

    root = Path(root).resolve()
    names: set[str] = set()
    with Repo(str(root)) as repo:
        for target in targets:
            try:
                stages = repo.stage.collect(f"{root / 'dvc.yaml'}:{target}", with_deps=True)
            except Exception as exc:  # noqa: BLE001 - DVC's own message names the target
                raise FerError(f"unknown stage {target!r}: {exc}") from None
            names.update(st.addressing.split(":")[-1] for st in stages)
    return names


def stage_is_current(stage: str, root: str | Path) -> bool:
    """True when DVC would skip the stage (deps, params and outs as recorded in dvc.lock)."""
    res = dvc("status", "--json", stage, cwd=root, check=False)
    if res.returncode != 0:
        return False
    try:
        return not json.loads(res.stdout or "{}")
    except json.JSONDecodeError:
        return False


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
