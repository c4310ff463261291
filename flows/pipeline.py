"""Prefect flow `fer-pipeline`: the stages of dvc.yaml, one Prefect task per stage.

The flow does not know what a stage does: each task runs `dvc repro --single-item <stage>`
(DVC skips what is up to date) and streams the stage's output into the task's log. The run is
planned and executed by fer_pipeline.runner.engine, the same code as `fer run`: the stage list
comes from dvc.yaml, so a new stage or a new `models.<name>` key in params.yaml shows up here
without a code change. Items of a stage marked `meta: {gpu: true}` (train@<model>) run
concurrently, each in its own workspace in this flow run's threads (dispatch="local") or as a
stage job, a `fer-train` flow run that any worker of the `gpu` pool picks up
(dispatch="workers"). Design notes: docs/orchestration.md; what a flow parameter may not ask
of a worker, and the failure alert: docs/security.md.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.runtime import deployment, flow_run

from fer_pipeline.errors import FerError, TransientError
from fer_pipeline.runner import engine, policy
from fer_pipeline.runner.overrides import build_overrides
from fer_pipeline.runner.stage import RUN_ID_ENV, StageFailed, check_store_outlives, run_stage
from fer_pipeline.tracking import git_info

TRAIN_DEPLOYMENT = os.environ.get("FER_TRAIN_DEPLOYMENT", "fer-train/gpu")
GPU_TAG = "gpu"                  # tasks of stages with `meta: {gpu: true}` in dvc.yaml
TRANSIENT_STATE = "FailedTransient"   # a fer-train run's final state when a retry may pass
TRAIN_ATTEMPTS = int(os.environ.get("FER_TRAIN_ATTEMPTS", "3"))   # a job's tries over workers
RETRIES = int(os.environ.get("FER_STAGE_RETRIES", "2"))
RETRY_DELAY_S = float(os.environ.get("FER_STAGE_RETRY_DELAY_S", "30"))
# dispatch="workers": how long a fer-train run may wait for a worker to pick it up, and how long
# it may take in all (a GPU slot held by another training counts), before the parent gives up.
PICKUP_TIMEOUT_S = float(os.environ.get("FER_PICKUP_TIMEOUT_S", str(15 * 60)))
TRAIN_TIMEOUT_S = float(os.environ.get("FER_TRAIN_TIMEOUT_S", str(24 * 3600)))
ALERT_WEBHOOK_ENV = "FER_ALERT_WEBHOOK"            # URL that receives a JSON POST on a failure
ALERT_SECRET_ENV = "FER_ALERT_WEBHOOK_SECRET"      # or: name of a Prefect Secret block holding it


def only_transient(task, task_run, state) -> bool:
    """retry_condition_fn: retry what may pass (TransientError: a tracking-server hiccup, a busy
    lock), never a real failure. Decided on the exception's type, not its text."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - result not retrievable: do not retry
        return False
    return isinstance(exc, TransientError)


def _run_id() -> str:
    return str(flow_run.id or "") or os.environ.get(RUN_ID_ENV) or uuid.uuid4().hex


@task(name="stage", task_run_name="{stage}", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=only_transient)
def dvc_stage(stage: str, run: engine.Run) -> dict[str, Any]:
    """One stage in the run's copy of the project: `dvc repro --single-item <stage>`."""
    logger = get_run_logger()
    result = engine.run_serial(run, stage, log=logger.info)
    logger.info("%s: %s in %.1fs", stage, result["status"], result["seconds"])
    return result


@task(name="run-in-workspace", task_run_name="{stage} in workspace", cache_policy=NO_CACHE)
def run_in_workspace(stage: str, workspace: str, run: engine.Run) -> dict[str, Any]:
    """The stage itself, in its own workspace. Tagged `gpu`, so the tag concurrency limit `gpu`
    caps how many run at once."""
    logger = get_run_logger()
    logger.info("host %s, pid %d, workspace %s", socket.gethostname(), os.getpid(), workspace)
    result = run_stage(stage, workspace, env=run.env(), log=logger.info)
    return {**result.as_dict(), "host": socket.gethostname(), "pid": os.getpid()}


@flow(name="fer-train", log_prints=True)
def fer_train(job: dict[str, Any]) -> Any:
    """One stage job on a `gpu` worker (fer_pipeline.runner.worker): its own clone of the
    job's repository at the job's commit, inputs pulled from and outputs pushed to the team's
    DVC remote, the result (dvc.lock entry, small outputs) put beside them for the parent. The
    job is data (repository URL, commit, stage, overrides, run id, lock entries), every field
    checked here (docs/security.md). A failure that may pass ends in the state named
    TRANSIENT_STATE, so the parent retries it on any worker."""
    from prefect.states import Failed

    from fer_pipeline.runner.job import StageJob

    stage_job = StageJob.from_params(job)
    os.environ[RUN_ID_ENV] = stage_job.run_id
    print(f"{stage_job.stage} attempt {stage_job.attempt} of run {stage_job.run_id} on "
          f"{socket.gethostname()}: {stage_job.repository} at {stage_job.commit[:12]}")
    try:
        return _stage_job.with_options(tags=[GPU_TAG])(stage_job)   # only gpu stages travel
    except TransientError as exc:
        return Failed(name=TRANSIENT_STATE, message=str(exc))


@task(name="stage-job", task_run_name="{job.stage}", cache_policy=NO_CACHE)
def _stage_job(job: Any) -> dict[str, Any]:
    from fer_pipeline.runner import worker

    logger = get_run_logger()
    result = worker.execute(job, log=logger.info)
    return {k: v for k, v in result.items() if k not in ("lock", "files")}


@task(name="parallel-stage", task_run_name="{stage}", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=only_transient)
def parallel_stage(stage: str, run: engine.Run, dispatch: str,
                   pickup_timeout_s: float = PICKUP_TIMEOUT_S,
                   train_timeout_s: float = TRAIN_TIMEOUT_S,
                   origin: tuple[str, str] | None = None) -> dict[str, Any]:
    """An item of a gpu stage: skip if current; else run it here in its own workspace and
    bring its outputs back (dispatch=local), or send it to a worker as a stage job and merge
    what comes back through the DVC remote (dispatch=workers)."""
    logger = get_run_logger()
    if dispatch != "workers":
        def execute(name: str, ws: str) -> dict[str, Any]:
            return run_in_workspace.with_options(tags=[GPU_TAG])(name, ws, run)

        return engine.run_isolated(run, stage, log=logger.info, execute=execute)
    with engine.PROJECT_LOCK:
        skipped = engine.skip_if_current(run, stage, log=logger.info)
    if skipped is not None:
        return skipped
    return _dispatch(stage, str(run.copy), run.run_id, origin, run.overrides,
                     pickup_timeout_s, train_timeout_s)


def _dispatch(stage: str, project_dir: str, run_id: str, origin: tuple[str, str] | None,
              overrides: dict[str, Any], pickup_timeout_s: float,
              train_timeout_s: float) -> dict[str, Any]:
    """The job to a worker; a worker that died (its run Crashed, e.g. marked by the zombie
    automation) or failed transiently: the next attempt, on any worker, resumes from the state
    the dead one left on the remote."""
    from dataclasses import replace

    from prefect.deployments import run_deployment

    from fer_pipeline.runner import dispatch as jobs

    logger = get_run_logger()
    assert origin is not None, "dispatch=workers needs the run's repository and commit"
    with engine.PROJECT_LOCK:
        job, inputs = jobs.make_job(project_dir, stage, run_id, *origin, overrides)
        jobs.push_inputs(project_dir, inputs)
    logger.info("%s: inputs %s on the DVC remote; job for %s at %s", stage, inputs, origin[0],
                origin[1][:12])
    tried = []
    for attempt in range(1, TRAIN_ATTEMPTS + 1):
        job = replace(job, attempt=attempt)
        child = run_deployment(TRAIN_DEPLOYMENT, timeout=0, parameters={"job": job.to_params()},
                               flow_run_name=f"{stage} #{attempt}")
        child = wait_for_child(stage, child.id, pickup_timeout_s, train_timeout_s)
        state = child.state
        if state is not None and state.is_completed():
            break
        why = f"fer-train run {child.name} ended {state.name if state else 'without a state'}: " \
              f"{(state.message if state else '') or ''}"
        tried.append(why)
        retry = state is not None and (state.is_crashed() or state.name == TRANSIENT_STATE)
        if not retry or attempt == TRAIN_ATTEMPTS:
            raise StageFailed(stage, 1, tried)
        logger.warning("%s; attempt %d goes to any worker of the pool", why, attempt + 1)
    result = jobs.read_result(project_dir, job)
    with engine.PROJECT_LOCK:
        jobs.collect(project_dir, stage, result, log=logger.info)
    return {"stage": stage, "status": result["status"], "flow_run": child.name,
            "seconds": round(child.total_run_time.total_seconds(), 1),
            **{k: result[k] for k in ("host", "pid", "started", "ended", "attempt", "commit",
                                      "code", "resumed_files", "resumed_epochs")}}


def wait_for_child(stage: str, child_id: Any, pickup_timeout_s: float,
                   train_timeout_s: float, poll_s: float = 2.0) -> Any:
    """The child fer-train run once final. Not picked up by a worker within `pickup_timeout_s`,
    or not finished within `train_timeout_s`: it is cancelled (no orphan left in the queue for a
    worker to start later) and the stage fails saying what to do."""
    from prefect import get_client

    started = time.monotonic()
    with get_client(sync_client=True) as client:
        while True:
            child = client.read_flow_run(child_id)
            waited = time.monotonic() - started
            state = child.state
            if state is not None and state.is_final():
                return child
            queued = state is None or state.is_scheduled() or state.is_pending()
            if queued and waited > pickup_timeout_s:
                why = (f"no worker picked up fer-train run {child.name} ({TRAIN_DEPLOYMENT}, "
                       f"pool gpu, queue train) within {pickup_timeout_s:g}s. Start one on a GPU "
                       f"machine: `make worker QUEUE=train` (prefect worker start --pool gpu "
                       f"--work-queue train), or raise pickup_timeout_s / FER_PICKUP_TIMEOUT_S; "
                       f"or run with dispatch=local. The run was cancelled")
            elif waited > train_timeout_s:
                why = (f"fer-train run {child.name} did not finish within {train_timeout_s:g}s "
                       f"(train_timeout_s / FER_TRAIN_TIMEOUT_S); it was cancelled")
            else:
                time.sleep(poll_s)
                continue
            _cancel(client, child, why)
            raise StageFailed(stage, 1, [why])


def _cancel(client: Any, child: Any, why: str) -> None:
    """Cancel a child run: a queued one at once, a running one through its worker
    (Cancelling: the worker stops the process)."""
    from prefect.states import Cancelled, Cancelling

    running = child.state is not None and child.state.is_running()
    state = Cancelling(message=why) if running else Cancelled(message=why)
    client.set_flow_run_state(child.id, state, force=True)


def report_failure(flow: Any, run: Any, state: Any) -> None:
    """on_failure/on_crashed hook: a log line, a `fer-pipeline-failure` artifact and, when
    FER_ALERT_WEBHOOK (or the Secret block named by FER_ALERT_WEBHOOK_SECRET) is set, a JSON
    POST to it. Never raises: a broken alert channel must not hide the run's own failure."""
    from prefect.logging.loggers import flow_run_logger

    logger = flow_run_logger(run, flow)
    payload = {"flow": flow.name, "flow_run_name": run.name, "flow_run_id": str(run.id),
               "deployment_id": str(run.deployment_id) if run.deployment_id else None,
               "state": state.name, "message": state.message or "",
               "parameters": run.parameters, "host": socket.gethostname()}
    logger.error("fer-pipeline run %s ended %s: %s", run.name, state.name, payload["message"])
    try:
        create_markdown_artifact(
            key="fer-pipeline-failure", description="fer-pipeline: the last failed run",
            markdown=f"# fer-pipeline run {run.name}: {state.name}\n\n```\n"
                     f"{payload['message']}\n```\n\nflow run id `{run.id}`")
    except Exception as exc:  # noqa: BLE001 - reporting must not fail the hook
        logger.warning("failure artifact not created: %s", exc)
    url = _alert_url(logger)
    if not url:
        return
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(payload, default=str).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:   # noqa: S310 - URL from env
            logger.info("failure alert sent (HTTP %s)", resp.status)
    except Exception as exc:  # noqa: BLE001
        logger.warning("failure alert to the webhook failed: %s", exc)


def _alert_url(logger: Any) -> str | None:
    if os.environ.get(ALERT_WEBHOOK_ENV):
        return os.environ[ALERT_WEBHOOK_ENV]
    block = os.environ.get(ALERT_SECRET_ENV)
    if not block:
        return None
    try:
        from prefect.blocks.system import Secret

        return str(Secret.load(block, _sync=True).get())
    except Exception as exc:  # noqa: BLE001
        logger.warning("alert webhook Secret block %r not loaded: %s", block, exc)
        return None


@flow(name="fer-pipeline", log_prints=True, on_failure=[report_failure],
      on_crashed=[report_failure])
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
    pickup_timeout_s: float | None = None,
    train_timeout_s: float | None = None,
    pull: bool | None = None,
) -> dict[str, Any]:
    """Run dvc.yaml's stages.

    Args:
        project_dir: the DVC project (default: FER_PROJECT_DIR or the working directory; in a
            deployment run the working directory, i.e. the run's git clone).
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
        pickup_timeout_s: dispatch="workers": a training no worker picked up within this is
            cancelled and fails the run (default FER_PICKUP_TIMEOUT_S or 15 minutes).
        train_timeout_s: dispatch="workers": a training not finished within this is cancelled
            and fails the run (default FER_TRAIN_TIMEOUT_S or 24 hours).
        pull: `dvc pull --allow-missing` the data and outputs before the stages (default: in a
            deployment run, i.e. a worker's fresh clone).

    Parameters are checked before anything runs (docs/security.md): on a worker, project_dir
    must lie in an allowed root; overrides may not set a path, server or command param; profile
    is a name of profiles/*.yaml.

    The run works in its own copy of the project (`workspace.run_copy`, keyed by the flow run
    id): overrides are applied there, never to the checkout's params.yaml, so a kill, a crash
    or a second run at the same time cannot leave the checkout changed.
    """
    logger = get_run_logger()
    if deployment.id:
        # Run by a worker, parameters from the API: the project is the run's clone (the working
        # directory, prefect.yaml's pull steps) unless project_dir names an allowed one.
        root = str(Path(project_dir or ".").resolve())
        policy.check_project_dir(root, policy.allowed_project_roots())
        check_store_outlives(root)
    else:
        root = str(Path(project_dir or os.environ.get("FER_PROJECT_DIR") or ".").resolve())
    policy.check_flow_inputs(overrides, profile, Path(root, "profiles"))
    run_id = _run_id()
    os.environ[RUN_ID_ENV] = run_id
    git = git_info(root)
    logger.info("project %s, git %s (dirty: %s), %s=%s", root, git["commit"], git["dirty"],
                RUN_ID_ENV, run_id)
    params = build_overrides(overrides, models=models, epochs=epochs,
                             max_per_class=max_per_class, profile=profile, root=root)
    origin = None
    if dispatch == "workers":
        from fer_pipeline.runner.dispatch import dispatch_origin

        origin = dispatch_origin(root)   # committed, pushed, a URL: refused here otherwise
        logger.info("trainings go to workers as jobs: %s at %s", *origin)
    run = engine.open_run(root, run_id, params, models=models,
                          pull=pull if pull is not None else bool(deployment.id),
                          log=logger.info)
    timeouts = (PICKUP_TIMEOUT_S if pickup_timeout_s is None else pickup_timeout_s,
                TRAIN_TIMEOUT_S if train_timeout_s is None else train_timeout_s)
    results = _run(run, dispatch, timeouts, origin)
    name = f"prefect-{flow_run.name or run_id[:8]}"
    done = engine.finish(
        run, experiment=name if save_experiment and git["commit"] != "unknown" else None,
        ran=[s["stage"] for s in results if s["status"] == "ran"],
        keep=bool(deployment.id),        # the worker deletes this clone after the run
        adopt=adopt, log=logger.info)
    identity = {"prefect_flow_run": run_id, "flow_run_name": flow_run.name,
                "mlflow_tag": f"pipeline_run_id = {run_id}", "git_commit": git["commit"],
                "git_dirty": git["dirty"], "dvc_experiment": done["experiment"] or "",
                "overrides": run.changed}
    create_markdown_artifact(key="fer-pipeline-report",
                             markdown=_report(identity, results, done["comparison"]),
                             description="fer-pipeline: stages, run identity, model comparison")
    engine.close(run)
    return {"run_id": run_id, "stages": results, "experiment": done["experiment"],
            "overrides": run.changed}


def _run(run: engine.Run, dispatch: str,
         timeouts: tuple[float, float] = (PICKUP_TIMEOUT_S, TRAIN_TIMEOUT_S),
         origin: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for step in engine.plan(run):
        if not step.parallel:   # in order, in the run copy (teach@<model>: seconds each)
            results.extend(dvc_stage(s, run) for s in step.stages)
            continue
        futures = [parallel_stage.submit(s, run, dispatch, *timeouts, origin)
                   for s in step.stages]
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
            raise StageFailed(step.stages[0].split("@")[0], 1,
                              [line for exc in failed for line in str(exc).splitlines()])
    return results


def _report(identity: dict[str, Any], results: list[dict[str, Any]],
            comparison: str | None) -> str:
    lines = ["# fer-pipeline run", "", "| | |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in identity.items()]
    lines += ["", "Find it in MLflow: runs tagged `pipeline_run_id` = the flow run id; in DVC: "
              "`dvc exp show` (experiment above) or the git commit.", "",
              "## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} |" for r in results]
    lines += ["", "## Model comparison", "",
              comparison or "_The evaluate stage did not run in this run: no comparison._"]
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
