"""Prefect flow `fer-pipeline`: the stages of dvc.yaml, one Prefect task per stage.

The flow does not know what a stage does: each task runs `dvc repro --single-item <stage>`
(DVC skips what is up to date) and streams the stage's output into the task's log. The stage
list comes from dvc.yaml (`dvc stage list`), so a new stage or a new `models.<name>` key in
params.yaml shows up here without a code change. Items of a foreach stage (train@<model>)
run concurrently, each in its own workspace (see fer_pipeline.orchestrate), either in this
flow run's threads (dispatch="local") or as `fer-train` flow runs that any worker of the
`gpu` pool picks up (dispatch="workers"). Design notes: docs/orchestration.md.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.runtime import flow_run

from fer_pipeline import orchestrate as orch
from fer_pipeline import params as P
from fer_pipeline.errors import FerError, TransientError
from fer_pipeline.tracking import git_info

TRAIN_DEPLOYMENT = os.environ.get("FER_TRAIN_DEPLOYMENT", "fer-train/gpu")
GPU_STAGES = {"train"}           # foreach stages whose items hold a GPU: tagged `gpu`
GPU_TAG = "gpu"
RUN_INFO = ".fer-run.json"       # written by fer-train into its workspace
RETRIES = int(os.environ.get("FER_STAGE_RETRIES", "2"))
RETRY_DELAY_S = float(os.environ.get("FER_STAGE_RETRY_DELAY_S", "30"))

# Everything that touches the project's DVC state (status, reading stages, dvc commit) is done
# by one thread at a time; the stages themselves run in parallel in their own workspaces.
_PROJECT_LOCK = threading.Lock()


def only_transient(task, task_run, state) -> bool:
    """retry_condition_fn: retry what may pass (TransientError: a tracking-server hiccup, a busy
    lock), never a real failure. Decided on the exception's type, not its text."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - result not retrievable: do not retry
        return False
    return isinstance(exc, TransientError)


def _run_id() -> str:
    return str(flow_run.id or "") or os.environ.get(orch.RUN_ID_ENV) or uuid.uuid4().hex


@task(name="stage", task_run_name="{stage}", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=only_transient)
def dvc_stage(stage: str, project_dir: str, run_id: str, store_dir: str) -> dict[str, Any]:
    """One stage in the run's copy of the project: `dvc repro --single-item <stage>`
    (MLflow: the checkout `store_dir`'s store)."""
    logger = get_run_logger()
    with _PROJECT_LOCK:
        result = orch.run_stage(stage, project_dir, env=orch.stage_env(store_dir, run_id),
                                log=logger.info)
    logger.info("%s: %s in %.1fs", stage, result.status, result.seconds)
    return result.as_dict()


@task(name="run-in-workspace", task_run_name="{stage} in workspace", cache_policy=NO_CACHE)
def run_in_workspace(stage: str, workspace: str, project_dir: str, run_id: str) -> dict[str, Any]:
    """The stage itself, in its own workspace (MLflow: the checkout `project_dir`'s store).
    Tagged `gpu` for training stages, so the tag concurrency limit `gpu` caps how many run at
    once."""
    logger = get_run_logger()
    logger.info("host %s, pid %d, workspace %s", socket.gethostname(), os.getpid(), workspace)
    result = orch.run_stage(stage, workspace, env=orch.stage_env(project_dir, run_id), log=logger.info)
    return {**result.as_dict(), "workspace": workspace, "host": socket.gethostname(),
            "pid": os.getpid()}


@flow(name="fer-train", log_prints=True)
def fer_train(stage: str, workspace: str, project_dir: str, run_id: str) -> dict[str, Any]:
    """One foreach item (e.g. train@vgg16) in a prepared workspace: the unit a `gpu` worker runs.
    `project_dir` is the checkout (for its MLflow store)."""
    os.environ[orch.RUN_ID_ENV] = run_id
    started = time.time()
    # Who ran it, for the parent's report (the return value itself is not persisted), and on a
    # failure whether it may pass: the parent sees this run's state, not the exception's type.
    info: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(),
                            "worker_pid": os.getppid(), "flow_run": flow_run.name,
                            "started": started}
    try:
        return _tagged(stage)(stage, workspace, project_dir, run_id)
    except FerError as exc:
        info["error"] = {"transient": exc.transient, "message": str(exc)}
        raise
    finally:
        info["ended"] = time.time()
        Path(workspace, RUN_INFO).write_text(json.dumps(info))


def _tagged(stage: str):
    group = stage.split("@", 1)[0]
    return run_in_workspace.with_options(tags=[GPU_TAG] if group in GPU_STAGES else [])


@task(name="parallel-stage", task_run_name="{stage}", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=only_transient)
def parallel_stage(stage: str, project_dir: str, run_id: str, dispatch: str,
                   store_dir: str) -> dict[str, Any]:
    """A foreach item: skip if current; else run it in its own workspace (here or on a worker),
    then copy its outputs back and `dvc commit` them into the run copy's dvc.lock (nothing else
    writes the run copy, so what is committed is what the stage ran on)."""
    logger = get_run_logger()
    with _PROJECT_LOCK:
        if orch.stage_is_current(stage, project_dir):
            logger.info("Stage '%s' didn't change, skipping", stage)
            return {"stage": stage, "status": "skipped", "seconds": 0.0, "workspace": None}
        ws = str(orch.prepare_workspace(project_dir, stage))
    if dispatch == "workers":
        from prefect.deployments import run_deployment

        Path(ws, RUN_INFO).unlink(missing_ok=True)   # a retry must not read the last try's
        child = run_deployment(TRAIN_DEPLOYMENT, timeout=None, poll_interval=2,
                               parameters={"stage": stage, "workspace": ws,
                                           "project_dir": store_dir, "run_id": run_id},
                               flow_run_name=f"{stage}")
        info_file = Path(ws, RUN_INFO)
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        if not child.state or not child.state.is_completed():
            msg = (child.state.message if child.state else "") or "no state"
            error = info.get("error") or {}
            cls = orch.TransientStageError if error.get("transient") else orch.StageFailed
            state_name = child.state.name if child.state else "without a state"
            raise cls(stage, 1, [f"fer-train run {child.name} ended {state_name}: "
                                 f"{error.get('message') or msg}"])
        # The child's return value is not persisted (no result storage needed): report its run.
        result = {"stage": stage, "status": "ran", "workspace": ws, "flow_run": child.name,
                  "seconds": round(child.total_run_time.total_seconds(), 1), **info}
    else:
        result = _tagged(stage)(stage, ws, store_dir, run_id)
    with _PROJECT_LOCK:
        orch.bring_back(project_dir, stage, ws, log=logger.info)
    return result


@flow(name="fer-pipeline", log_prints=True)
def fer_pipeline(
    project_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
    models: list[str] | None = None,
    epochs: int | None = None,
    max_per_class: int | None = None,
    profile: str | None = None,
    dispatch: Literal["local", "workers"] = "local",
    save_experiment: bool = True,
    adopt: bool = True,
) -> dict[str, Any]:
    """Run dvc.yaml's stages.

    Args:
        project_dir: the DVC project (default: FER_PROJECT_DIR or the working directory).
        overrides: dotted params, e.g. {"models.vgg16.batch_size": 32}; like `dvc exp run -S`.
        models: train only these `models` keys (default: all of them).
        epochs: shortcut for models.<each selected>.epochs.
        max_per_class: shortcut for data.max_per_class (quick runs).
        profile: a profiles/<name>.yaml applied first (e.g. quick).
        dispatch: "local" runs foreach items in this run's threads; "workers" sends each to the
            `fer-train/gpu` deployment so different workers run them.
        save_experiment: record the finished run as DVC experiment `prefect-<run name>`.
        adopt: bring the results back into the checkout's dvc.lock and outputs when the run had
            no overrides and the checkout has not changed since it started (else they stay in
            the experiment).

    The run works in its own copy of the project (`orchestrate.run_copy`, keyed by the flow run
    id): overrides are applied there, never to the checkout's params.yaml, so a kill, a crash
    or a second run at the same time cannot leave the checkout changed.
    """
    logger = get_run_logger()
    root = str(Path(project_dir or os.environ.get("FER_PROJECT_DIR") or ".").resolve())
    run_id = _run_id()
    os.environ[orch.RUN_ID_ENV] = run_id
    git = git_info(root)
    logger.info("project %s, git %s (dirty: %s), %s=%s", root, git["commit"], git["dirty"],
                orch.RUN_ID_ENV, run_id)

    all_models = orch.model_names(root)
    unknown = sorted(set(models or []) - set(all_models))
    if unknown:
        raise FerError(f"unknown model(s) {unknown}; params.yaml models: {all_models}")
    params = orch.build_overrides(overrides, models=models, epochs=epochs,
                                  max_per_class=max_per_class, profile=profile, root=root)
    P.load(Path(root, "params.yaml"), params)   # a typo fails here, before anything is copied
    ws = str(orch.run_copy(root, run_id))
    logger.info("run copy: %s (the checkout is not written)", ws)
    changed = orch.apply_overrides(ws, params)
    for key, (old, new) in changed.items():
        logger.info("param %s: %r -> %r", key, old, new)
    result = _run(ws, root, run_id, git, changed, models, dispatch, save_experiment)
    if adopt and not changed:
        orch.adopt_results(root, ws, [s["stage"] for s in result["stages"]
                                      if s["status"] == "ran"], log=logger.info)
    elif changed:
        logger.info("overrides given: results stay in DVC experiment %s, the checkout's "
                    "dvc.lock is unchanged", result["experiment"])
    orch.remove_run_copy(root, ws)
    return result


def _run(ws: str, root: str, run_id: str, git: dict[str, str], changed: dict[str, Any],
         models: list[str] | None, dispatch: str, save_experiment: bool) -> dict[str, Any]:
    logger = get_run_logger()
    results: list[dict[str, Any]] = []
    for group in orch.stage_groups(ws):
        if len(group) == 1 and "@" not in group[0]:
            results.append(dvc_stage(group[0], ws, run_id, root))
            continue
        items = [s for s in group if not models or "@" not in s or s.split("@", 1)[1] in models]
        if items:
            orch.init_tracking_store(ws, orch.stage_env(root, run_id))
        futures = [parallel_stage.submit(s, ws, run_id, dispatch, root) for s in items]
        wait(futures)
        failed = []
        for fut in futures:
            try:
                results.append(fut.result())
            except Exception as exc:  # noqa: BLE001 - report every failed item, then fail
                failed.append(exc)
        if failed:
            if len(failed) == 1:
                raise failed[0]
            raise orch.StageFailed(group[0].split("@")[0], 1,
                                   [line for exc in failed for line in str(exc).splitlines()])

    experiment = None
    if save_experiment and git["commit"] != "unknown":
        experiment = orch.save_experiment(ws, f"prefect-{flow_run.name or run_id[:8]}")
        logger.info("DVC experiment: %s", experiment or "not saved (see `dvc exp save`)")

    identity = {"prefect_flow_run": run_id, "flow_run_name": flow_run.name,
                "mlflow_tag": f"pipeline_run_id = {run_id}", "git_commit": git["commit"],
                "git_dirty": git["dirty"], "dvc_experiment": experiment or "",
                "overrides": changed}
    create_markdown_artifact(key="fer-pipeline-report", markdown=_report(identity, results, ws),
                             description="fer-pipeline: stages, run identity, model comparison")
    return {"run_id": run_id, "stages": results, "experiment": experiment, "overrides": changed}


def _report(identity: dict[str, Any], results: list[dict[str, Any]], root: str) -> str:
    lines = ["# fer-pipeline run", "", "| | |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in identity.items()]
    lines += ["", "Find it in MLflow: runs tagged `pipeline_run_id` = the flow run id; in DVC: "
              "`dvc exp show` (experiment above) or the git commit.", "",
              "## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} |" for r in results]
    lines += ["", "## Model comparison", "", orch.comparison_markdown(root)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python flows/pipeline.py [--epochs N] [--models a b] [-S key=value]...` (make flow)."""
    import argparse

    ap = argparse.ArgumentParser(description="run the fer-pipeline flow in this process")
    ap.add_argument("--project-dir")
    ap.add_argument("--models", nargs="+")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--max-per-class", type=int)
    ap.add_argument("--profile")
    ap.add_argument("-S", "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="param override, value in YAML (repeatable)")
    ap.add_argument("--dispatch", choices=["local", "workers"], default="local")
    ap.add_argument("--no-experiment", action="store_true", help="skip `dvc exp save`")
    args = ap.parse_args(argv)
    from fer_pipeline.params import parse_overrides

    try:
        overrides = parse_overrides(args.sets)
    except FerError as exc:
        ap.error(str(exc))
    state = fer_pipeline(project_dir=args.project_dir, overrides=overrides or None,
                         models=args.models, epochs=args.epochs, max_per_class=args.max_per_class,
                         profile=args.profile, dispatch=args.dispatch,
                         save_experiment=not args.no_experiment, return_state=True)
    if not state.is_completed():
        print(state.message, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
