"""One pipeline run, planned and executed the same way by `fer run` and the Prefect flow.

    run = open_run(checkout, run_id, overrides, models=..., targets=...)
    for step in plan(run):        # dvc.yaml order; a foreach stage is one step of items
        ...                       # run_serial / run_isolated here, or a stage job on a worker
    finish(run, experiment=...)   # DVC experiment, results kept, adopted
    close(run)                    # the run copy removed

The run works in its own copy of the checkout (workspace.run_copy): overrides, stages,
dvc.lock and the experiment happen there. The flow wraps each call in a Prefect task; `fer run`
calls them in order. Items of a stage marked `meta: {gpu: true}` in dvc.yaml run each in its
own workspace (run_isolated) or as a stage job on a worker (runner.dispatch), so several run
at once; the rest run one at a time in the run copy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fer_pipeline import params as P
from fer_pipeline.errors import FerError
from fer_pipeline.runner import workspace
from fer_pipeline.runner.experiment import keep_results, save_experiment
from fer_pipeline.runner.overrides import changes, model_names, write_overrides
from fer_pipeline.runner.project import (
    dvc,
    gpu_stages,
    holds_gpu,
    remote_urls,
    stage_groups,
    stage_is_current,
    upstream,
)
from fer_pipeline.runner.stage import init_tracking_store, run_stage, stage_env

# Everything that touches the run copy's DVC state (status, dvc.lock, dvc commit) is done by
# one thread at a time; the isolated stages themselves run in parallel in their workspaces.
PROJECT_LOCK = threading.Lock()

Log = Callable[[str], None]


@dataclass
class Run:
    """A run in progress: the checkout it started from, its copy, its identity."""

    checkout: Path
    copy: Path
    run_id: str
    changed: dict[str, list[Any]]          # {dotted key: [old, new]} written to the copy
    models: list[str] | None = None        # train only these `models` keys
    targets: set[str] | None = None        # only these stages and what they depend on
    gpu: set[str] = field(default_factory=set)
    _env: dict[str, str] | None = field(default=None, repr=False)

    @property
    def overrides(self) -> dict[str, Any]:
        return {key: new for key, (_, new) in self.changed.items()}

    def env(self) -> dict[str, str]:
        """A stage's environment: MLflow at the checkout's store, the run id (params.yaml is
        read for it once per run, not once per stage)."""
        if self._env is None:
            self._env = stage_env(self.checkout, self.run_id)
        return dict(self._env)


@dataclass
class Step:
    """Stages of one dvc.yaml entry: `parallel` items (a gpu stage) may run at once."""

    stages: list[str]
    parallel: bool


def open_run(checkout: str | Path, run_id: str, overrides: dict[str, Any], *,
             models: list[str] | None = None, targets: list[str] | None = None,
             pull: bool = False, log: Log = print) -> Run:
    """Check the request, make the run copy, write the overrides there, and (a fresh clone)
    pull the raw data and every output the DVC remote holds, so unchanged stages are skipped."""
    checkout = Path(checkout).resolve()
    known = model_names(checkout)
    unknown = sorted(set(models or []) - set(known))
    if unknown:
        raise FerError(f"unknown model(s) {unknown}; params.yaml models: {known}")
    P.load(checkout / "params.yaml", overrides)   # a typo fails here, before anything is copied
    wanted = upstream(checkout, targets) if targets else None
    changed = changes(checkout, overrides)
    copy = workspace.run_copy(checkout, run_id)   # an existing one (a retry) is taken over
    log(f"run copy: {copy} (the checkout is not written)")
    write_overrides(copy, overrides)
    for key, (old, new) in changed.items():
        log(f"param {key}: {old!r} -> {new!r}")
    if pull and remote_urls(copy):
        res = dvc("pull", "--allow-missing", cwd=copy, check=False)
        if res.returncode != 0:
            raise FerError("`dvc pull` of the data and up-to-date outputs failed: "
                           + " | ".join((res.stdout + res.stderr).strip().splitlines()[-6:])
                           + ". The run needs the raw images (remote `fer2013`, see "
                           "`dvc remote list`; a copy elsewhere: `dvc remote modify --local "
                           "fer2013 url /path/to/dvc-remote`)")
        log("pulled the data and up-to-date outputs from the DVC remotes")
    run = Run(checkout, copy, run_id, changed, models, wanted, gpu_stages(copy))
    init_tracking_store(copy, run.env())
    return run


def plan(run: Run) -> list[Step]:
    """The steps of this run in dvc.yaml order, limited to `models` and `targets`."""
    steps = []
    for group in stage_groups(run.copy):
        items = [s for s in group if not run.models or "@" not in s
                 or s.split("@", 1)[1] in run.models]
        if run.targets is not None:
            items = [s for s in items if s in run.targets]
        if items:
            steps.append(Step(items, parallel=holds_gpu(items[0], run.gpu)))
    return steps


def run_serial(run: Run, stage: str, log: Log = print) -> dict[str, Any]:
    """One stage in the run copy (DVC skips it when it is up to date)."""
    with PROJECT_LOCK:
        result = run_stage(stage, run.copy, env=run.env(), log=log)
    return result.as_dict()


def skip_if_current(run: Run, stage: str, log: Log = print) -> dict[str, Any] | None:
    """The "skipped" result when DVC would skip `stage` (call under PROJECT_LOCK), else None:
    an up-to-date item gets no workspace and goes to no worker."""
    if not stage_is_current(stage, run.copy):
        return None
    log(f"Stage '{stage}' didn't change, skipping")
    return {"stage": stage, "status": "skipped", "seconds": 0.0, "workspace": None}


def dry_plan(checkout: str | Path, targets: list[str] | None = None) -> list[Step]:
    """The plan of a run of the checkout as it stands, without a run copy (`fer run --dry`)."""
    checkout = Path(checkout).resolve()
    return plan(Run(checkout, checkout, "dry", {}, targets=upstream(checkout, targets)
                    if targets else None, gpu=gpu_stages(checkout)))


def run_isolated(run: Run, stage: str, log: Log = print,
                 execute: Callable[[str, str], dict[str, Any]] | None = None) -> dict[str, Any]:
    """One parallel item on this machine: skipped when current; else in its own workspace,
    its outputs brought back into the run copy. `execute(stage, workspace)` runs it (the flow
    passes a task tagged `gpu`); default: run_stage here."""
    with PROJECT_LOCK:
        if (skipped := skip_if_current(run, stage, log)) is not None:
            return skipped
        ws = str(workspace.prepare_workspace(run.copy, stage))
    if execute is None:
        result = run_stage(stage, ws, env=run.env(), log=log).as_dict()
    else:
        result = execute(stage, ws)
    with PROJECT_LOCK:
        workspace.bring_back(run.copy, stage, ws, log=log)
    return {**result, "workspace": ws}


def finish(run: Run, *, experiment: str | None, ran: list[str], keep: bool = False,
           adopt: bool = False, log: Log = print) -> dict[str, Any]:
    """Record the run: the DVC experiment `experiment` (None: not saved); `keep` (a clone that
    is deleted afterwards): outputs and experiment pushed to the remotes; `adopt`: results of
    the stages that ran brought into the checkout when they are its own (no overrides, the
    checkout unchanged since the start). The run copy is removed last."""
    saved, not_saved = None, None
    if experiment:
        try:
            saved = save_experiment(run.copy, experiment)
            log(f"DVC experiment: {saved}")
        except FerError as exc:
            not_saved = str(exc)
            log(f"DVC experiment not saved: {exc}")
    problems = keep_results(run.copy, saved, log=log) if keep else []
    for problem in problems:
        log(f"results not kept: {problem}")
    if adopt and not run.changed:
        workspace.adopt_results(run.checkout, run.copy, ran, log=log)
    elif adopt:
        log(f"overrides given: results stay in DVC experiment {saved}, the checkout's dvc.lock "
            f"is unchanged")
    report = run.copy / "reports" / "evaluate" / "comparison.md"
    comparison = report.read_text() if report.is_file() else None
    return {"experiment": saved, "not_saved": not_saved, "not_kept": problems,
            "comparison": comparison}


def close(run: Run) -> None:
    workspace.remove_run_copy(run.checkout, run.copy)


def run_all(run: Run, log: Log = print) -> list[dict[str, Any]]:
    """Every step here, one stage after another in the run copy (`fer run`; the flow runs
    a step's parallel items at once, each isolated)."""
    results = []
    for step in plan(run):
        for stage in step.stages:
            log(f"== {stage}")
            results.append(run_serial(run, stage, log))
    return results
