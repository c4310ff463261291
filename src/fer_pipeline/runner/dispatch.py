"""The parent run's side of a stage job: describe it, hand it its inputs, take its result back.

A job leaves the parent as data (`job.StageJob`): the inputs it needs are pushed to the team's
DVC remote first, and what comes back (the worker's dvc.lock entry and small uncached files,
`exchange.RunStore`'s result.json) is merged into the run's copy of the project, whose models
are then pulled by hash from the remote. `dvc status` of the stage must then be clean, or the
run stops saying what differs: nothing a worker says is taken on trust.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from fer_pipeline.errors import FerError, TransientError
from fer_pipeline.io import write_text
from fer_pipeline.runner.exchange import RunStore
from fer_pipeline.runner.job import StageJob, check_repository
from fer_pipeline.runner.project import dvc, git, merge_lock, stage_paths
from fer_pipeline.runner.worker import RESULT, inputs_to_pull

# Code and configuration a worker takes from git: uncommitted edits there cannot reach it.
CODE_PATHS = ("src", "dvc.yaml", "params.yaml", "pyproject.toml", "profiles", "teachers")


def dispatch_origin(root: str | Path) -> tuple[str, str]:
    """(repository URL, commit) the workers will run, checked before anything runs: the
    checkout's code is committed, the commit is on `origin`, and origin is a URL."""
    repository = git("remote", "get-url", "origin", cwd=root, check=False).strip()
    if not repository:
        raise FerError("dispatch=workers: this checkout has no `origin` remote; workers clone "
                       "the team's git URL (git remote add origin <url>) at the run's commit")
    check_repository(repository)
    commit = git("rev-parse", "HEAD", cwd=root).strip()
    edited = git("diff", "--name-only", "HEAD", "--", *CODE_PATHS, cwd=root).split()
    if edited:
        raise FerError(f"dispatch=workers runs committed code only, and {', '.join(edited)} "
                       f"has uncommitted changes: commit and push them, or run with "
                       f"dispatch=local (overrides go through the run's parameters)")
    git("fetch", "--quiet", "origin", cwd=root, check=False)
    if not git("branch", "-r", "--contains", commit, cwd=root, check=False).strip():
        raise FerError(f"dispatch=workers: commit {commit[:12]} is not on origin ({repository}): "
                       f"`git push` it first; workers only see the git remote")
    return repository, commit


def make_job(ws: str | Path, stage: str, run_id: str, repository: str, commit: str,
             overrides: dict[str, Any]) -> tuple[StageJob, list[str]]:
    """The job for `stage` and the input paths it pulls (outputs of earlier stages)."""
    ws = Path(ws)
    lock = (yaml.safe_load((ws / "dvc.lock").read_text()) or {}).get("stages") or {}
    deps, _, _ = stage_paths(ws, stage)
    locks = {name: entry for name, entry in lock.items()
             if any(o["path"] in deps for o in entry.get("outs", []))}
    job = StageJob(repository=repository, commit=commit, stage=stage, run_id=run_id,
                   overrides=dict(overrides), locks=locks)
    return job, inputs_to_pull(deps, locks)


def push_inputs(ws: str | Path, paths: list[str]) -> None:
    if not paths:
        return
    res = dvc("push", "-q", *paths, cwd=ws, check=False)
    if res.returncode != 0:
        raise TransientError(f"dvc push of {paths} failed (workers pull them from the DVC "
                             f"remote): {(res.stdout + res.stderr).strip()[-1500:]}")


def read_result(ws: str | Path, job: StageJob) -> dict[str, Any]:
    result = RunStore(ws, job.run_id, job.stage).get_json(RESULT)
    if not result or result.get("attempt") != job.attempt or result.get("commit") != job.commit:
        raise FerError(f"{job.stage}: the worker finished but its result for attempt "
                       f"{job.attempt} at {job.commit[:12]} is not on the DVC remote")
    return result


def collect(ws: str | Path, stage: str, result: dict[str, Any],
            log: Callable[[str], None] = print) -> None:
    """Merge the worker's dvc.lock entry and small files into the run copy, pull its models
    by hash, and check the stage is now up to date."""
    ws = Path(ws)
    _, _, uncached = stage_paths(ws, stage)
    for path, text in result["files"].items():
        if path not in uncached:
            raise FerError(f"{stage}: the worker returned {path!r}, not an uncached output")
        write_text(ws / path, text)
    merge_lock(ws, {stage: result["lock"]})
    res = dvc("pull", "-q", stage, cwd=ws, check=False)
    if res.returncode != 0:
        raise TransientError(f"dvc pull of {stage}'s outputs failed: "
                             f"{(res.stdout + res.stderr).strip()[-1500:]}")
    # `dvc commit` re-hashes what is now here (the same hashes) and writes DVC's .gitignore
    # entries for the outputs, as a local `dvc repro` does: `dvc pull` does not, and the
    # evaluate stage's `models` folder dep hashes them, so without them the run's experiment
    # and a teammate's checkout of it would disagree about evaluate.
    res = dvc("commit", "--force", "-q", stage, cwd=ws, check=False)
    if res.returncode != 0:
        raise FerError(f"dvc commit of {stage}'s pulled outputs failed: "
                       f"{(res.stdout + res.stderr).strip()[-1500:]}")
    status = dvc("status", "--json", stage, cwd=ws, check=False)
    changes = json.loads(status.stdout or "{}") if status.returncode == 0 else {"error": status.stderr}
    if changes:
        raise FerError(f"{stage}: after merging the worker's result, `dvc status` is not clean: "
                       f"{json.dumps(changes)[:1500]}")
    log(f"{stage}: result of attempt {result['attempt']} on {result['host']} merged; outputs "
        f"pulled from the DVC remote; dvc status clean")
