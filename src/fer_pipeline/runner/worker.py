"""Run one stage job on a worker, in the worker's own root, with the job's commit's code.

1. a clone of the job's repository at the job's commit (from a mirror kept in the root);
2. the worker's installed packages checked against that commit's pyproject.toml (refuses with
   what to reinstall when they do not fit);
3. the job's params overrides written into the clone's params.yaml, its lock entries merged into
   the clone's dvc.lock, and `dvc pull` of exactly the stage's inputs from the team's remote;
4. the resume state of an earlier attempt (another worker that died) fetched from the remote,
   and kept there while the stage runs (`exchange.StateSync`);
5. `dvc repro --single-item <stage>` with the clone's own `src/` first on PYTHONPATH, MLflow at
   the worker's MLFLOW_TRACKING_URI (tagged with the true commit);
6. `dvc push` of its outputs; the result (its dvc.lock entry and small uncached outputs) put
   beside them on the remote and returned.

Everything is written under the root (FER_WORKER_ROOT, default ~/.cache/fer-worker): mirrors,
the job's clone, the DVC cache and DVC's site cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from fer_pipeline.errors import FerError, TransientError
from fer_pipeline.runner.exchange import RunStore, StateSync
from fer_pipeline.runner.job import StageJob
from fer_pipeline.runner.overrides import write_overrides
from fer_pipeline.runner.project import (
    dvc,
    git,
    gpu_stages,
    holds_gpu,
    merge_lock,
    stage_paths,
)
from fer_pipeline.runner.stage import check_store_outlives, run_stage, stage_env

ROOT_ENV = "FER_WORKER_ROOT"
RESULT = "result.json"


def worker_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or Path.home() / ".cache" / "fer-worker").resolve()


def checkout(job: StageJob, root: Path, log: Callable[[str], None]) -> Path:
    """A fresh clone of the job's repository at its commit, from the root's mirror."""
    mirror = root / "mirrors" / (hashlib.sha1(job.repository.encode()).hexdigest()[:16] + ".git")
    try:
        if mirror.is_dir():
            git("remote", "update", "--prune", cwd=mirror)
        else:
            mirror.parent.mkdir(parents=True, exist_ok=True)
            git("clone", "--quiet", "--mirror", job.repository, str(mirror), cwd=root)
    except FerError as exc:
        raise TransientError(f"cannot fetch {job.repository}: {exc}") from None
    if git("cat-file", "-t", job.commit, cwd=mirror, check=False).strip() != "commit":
        raise FerError(f"commit {job.commit} is not in {job.repository}: push it before "
                       f"dispatching (the workers only see the git remote)")
    work = root / "jobs" / job.run_id / job.stage.replace("@", "-")
    shutil.rmtree(work, ignore_errors=True)
    work.parent.mkdir(parents=True, exist_ok=True)
    git("clone", "--quiet", "--no-checkout", str(mirror), str(work), cwd=root)
    git("checkout", "--quiet", "--detach", job.commit, cwd=work)
    git("remote", "set-url", "origin", job.repository, cwd=work)
    log(f"clone of {job.repository} at {job.commit[:12]} in {work}")
    return work


def environment_problems(pyproject: Path) -> list[str]:
    """Requirements of the commit's pyproject.toml that this interpreter does not satisfy."""
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement

    if not pyproject.is_file():
        return [f"{pyproject.name} missing at this commit: nothing says which packages its code "
                f"needs"]
    deps = tomllib.loads(pyproject.read_text()).get("project", {}).get("dependencies", [])
    problems = []
    for spec in deps:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req} (not installed)")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{req} (installed: {have})")
    return problems


def check_environment(work: Path, job: StageJob) -> None:
    problems = environment_problems(work / "pyproject.toml")
    if problems:
        raise FerError(f"this worker's packages do not fit commit {job.commit[:12]}: "
                       + "; ".join(problems) + f". Reinstall the worker at that commit "
                       f"(`git checkout {job.commit[:12]} && make setup`) and restart it")


def inputs_to_pull(deps: list[str], locks: dict[str, dict[str, Any]]) -> list[str]:
    """The stage's deps that are outputs of the stages in `locks` (the rest is in git)."""
    outs = {o["path"] for entry in locks.values() for o in entry.get("outs", [])}
    return [d for d in deps if d in outs]


def configure_dvc(work: Path, root: Path) -> None:
    """This root's DVC cache and site cache (DVC's default site cache lies in /var/tmp)."""
    dvc("cache", "dir", "--local", str(root / "dvc-cache"), cwd=work)
    dvc("config", "--local", "core.site_cache_dir", str(root / "dvc-site-cache"), cwd=work)


def state_folder(work: Path, stage: str) -> Path:
    """Where the stage keeps its resume state: params train.state_dir / <model>."""
    params = yaml.safe_load((work / "params.yaml").read_text()) or {}
    state_dir = (params.get("train") or {}).get("state_dir") or ".cache/train"
    return work / state_dir / stage.split("@", 1)[1]


def fail_stale_runs(job: StageJob, keep: str | None, log: Callable[[str], None]) -> None:
    """MLflow runs of this job's earlier attempts left RUNNING by a dead worker end FAILED
    (the one the resume state continues is kept)."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        model = job.stage.split("@", 1)[1]
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string=f"tags.pipeline_run_id = '{job.run_id}' and "
                          f"tags.model_name = '{model}' and attributes.status = 'RUNNING'")
        for run in runs:
            if run.info.run_id != keep:
                client.set_terminated(run.info.run_id, status="FAILED")
                log(f"MLflow run {run.info.run_id} of a dead attempt marked FAILED")
    except Exception as exc:  # noqa: BLE001 - bookkeeping; the training itself goes on
        log(f"stale MLflow runs not checked: {exc}")


def execute(job: StageJob, root: Path | None = None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the job (module docstring); the result also lands on the remote as result.json."""
    root = (root or worker_root()).resolve()
    started = time.time()
    clock = _Clock()
    work = checkout(job, root, log)
    check_environment(work, job)
    if not holds_gpu(job.stage, gpu_stages(work)):
        raise FerError(f"stage job: {job.stage} is not an item of a gpu stage in the dvc.yaml of "
                       f"commit {job.commit[:12]} (`meta: {{gpu: true}}`): it runs in the parent")
    configure_dvc(work, root)
    write_overrides(work, job.overrides, validate=False)
    merge_lock(work, job.locks)
    deps, _, uncached = stage_paths(work, job.stage)
    pull = inputs_to_pull(deps, job.locks)
    clock.lap("clone")
    if pull:
        res = dvc("pull", "-q", *pull, cwd=work, check=False)
        if res.returncode != 0:
            raise TransientError(f"dvc pull of {job.stage}'s inputs {pull} failed: "
                                 f"{(res.stdout + res.stderr).strip()[-1500:]}")
        log(f"pulled {', '.join(pull)} from the DVC remote")
    clock.lap("pull")
    store = RunStore(work, job.run_id, job.stage)
    state = state_folder(work, job.stage)
    restored = store.pull_dir(state)
    resumed_epochs = 0
    if restored:
        history = state / "history.csv"
        resumed_epochs = max(0, len(history.read_text().splitlines()) - 1) if history.is_file() else 0
        log(f"resume state of an earlier attempt: {restored} file(s), {resumed_epochs} finished "
            f"epoch(s), from {store.url}/state")
    keep = None
    if (state / "mlflow_run.json").is_file():
        import json

        keep = json.loads((state / "mlflow_run.json").read_text()).get("run_id")
    fail_stale_runs(job, keep, log)

    check_store_outlives(work)
    env = stage_env(work, job.run_id)
    env["PYTHONPATH"] = str(work / "src") + os.pathsep + env.get("PYTHONPATH", "")
    with StateSync(store, state, log_fn=log):
        result = run_stage(job.stage, work, env=env, log=log, force=False)
    clock.lap("stage")
    res = dvc("push", "-q", job.stage, cwd=work, check=False)
    if res.returncode != 0:
        raise TransientError(f"dvc push of {job.stage}'s outputs failed: "
                             f"{(res.stdout + res.stderr).strip()[-1500:]}")
    clock.lap("push")
    lock = (yaml.safe_load((work / "dvc.lock").read_text()) or {})["stages"][job.stage]
    files = {path: (work / path).read_bytes().decode() for path in uncached
             if (work / path).is_file()}
    commit = git("rev-parse", "HEAD", cwd=work).strip()
    out = {"stage": job.stage, "status": result.status, "commit": commit,
           "attempt": job.attempt, "host": socket.gethostname(), "pid": os.getpid(),
           "started": started, "ended": time.time(), "resumed_files": restored,
           "resumed_epochs": resumed_epochs,
           "code": _code_origin(work, env), "lock": lock, "files": files,
           "seconds": clock.laps}
    store.remove("state")
    shutil.rmtree(work, ignore_errors=True)
    clock.lap("result")
    store.put_json(RESULT, out)
    log(f"{job.stage}: {result.status}; outputs pushed, result at {store.url}/{RESULT}")
    return out


class _Clock:
    """Seconds per phase of a job (clone, pull, stage, push, result): its overhead is all but
    `stage`."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = round(now - self._t, 2)
        self._t = now


def _code_origin(work: Path, env: dict[str, str]) -> str:
    """Where the stage's `fer_pipeline` came from, relative to the clone ("src/..." = the
    commit's code, not the worker's install)."""
    res = subprocess.run([sys.executable, "-c", "import fer_pipeline; print(fer_pipeline.__file__)"],
                         cwd=work, env=env, capture_output=True, text=True)
    path = Path(res.stdout.strip())
    try:
        return str(path.relative_to(work))
    except ValueError:
        return f"<outside the clone>/{path.name}"
