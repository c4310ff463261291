"""Prefect flow `fer-pipeline`: the stages of dvc.yaml, one Prefect task per stage.

The flow does not know what a stage does: each task runs `dvc repro --single-item <stage>`
(DVC skips what is up to date) and streams the stage's output into the task's log. The stage
list comes from dvc.yaml (`dvc stage list`), so a new stage or a new `models.<name>` key in
params.yaml shows up here without a code change. Items of a foreach stage (train@<model>)
run concurrently, each in its own workspace (see fer_pipeline.orchestrate), either in this
flow run's threads (dispatch="local") or as `fer-train` flow runs that any worker of the
`gpu` pool picks up (dispatch="workers"). Design notes: docs/orchestration.md; what a flow
parameter may not ask of a worker, and the failure alert: docs/security.md.
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
from prefect.runtime import deployment, flow_run

from fer_pipeline import orchestrate as orch
from fer_pipeline import params as P
from fer_pipeline.errors import FerError, TransientError
from fer_pipeline.tracking import git_info

TRAIN_DEPLOYMENT = os.environ.get("FER_TRAIN_DEPLOYMENT", "fer-train/gpu")
GPU_STAGES = {"train"}           # foreach stages whose items hold a GPU: tagged `gpu`
GPU_TAG = "gpu"
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
    os.environ[orch.RUN_ID_ENV] = stage_job.run_id
    print(f"{stage_job.stage} attempt {stage_job.attempt} of run {stage_job.run_id} on "
          f"{socket.gethostname()}: {stage_job.repository} at {stage_job.commit[:12]}")
    try:
        return _stage_job.with_options(tags=_gpu_tags(stage_job.stage))(stage_job)
    except TransientError as exc:
        return Failed(name=TRANSIENT_STATE, message=str(exc))


@task(name="stage-job", task_run_name="{job.stage}", cache_policy=NO_CACHE)
def _stage_job(job: Any) -> dict[str, Any]:
    from fer_pipeline.runner import worker

    logger = get_run_logger()
    result = worker.execute(job, log=logger.info)
    return {k: v for k, v in result.items() if k not in ("lock", "files")}


def _gpu_tags(stage: str) -> list[str]:
    """`gpu` for items of GPU_STAGES: the tag concurrency limit caps how many run at once."""
    return [GPU_TAG] if stage.split("@", 1)[0] in GPU_STAGES else []


@task(name="parallel-stage", task_run_name="{stage}", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=only_transient)
def parallel_stage(stage: str, project_dir: str, run_id: str, dispatch: str,
                   store_dir: str, pickup_timeout_s: float = PICKUP_TIMEOUT_S,
                   train_timeout_s: float = TRAIN_TIMEOUT_S,
                   origin: tuple[str, str] | None = None,
                   overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A foreach item: skip if current; else run it here in its own workspace and bring its
    outputs back (dispatch=local), or send it to a worker as a stage job and merge what comes
    back through the DVC remote (dispatch=workers)."""
    logger = get_run_logger()
    with _PROJECT_LOCK:
        if orch.stage_is_current(stage, project_dir):
            logger.info("Stage '%s' didn't change, skipping", stage)
            return {"stage": stage, "status": "skipped", "seconds": 0.0, "workspace": None}
        if dispatch != "workers":
            ws = str(orch.prepare_workspace(project_dir, stage))
    if dispatch != "workers":
        result = run_in_workspace.with_options(tags=_gpu_tags(stage))(stage, ws, store_dir, run_id)
        with _PROJECT_LOCK:
            orch.bring_back(project_dir, stage, ws, log=logger.info)
        return result
    return _dispatch(stage, project_dir, run_id, origin, overrides or {},
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
    with _PROJECT_LOCK:
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
            raise orch.StageFailed(stage, 1, tried)
        logger.warning("%s; attempt %d goes to any worker of the pool", why, attempt + 1)
    result = jobs.read_result(project_dir, job)
    with _PROJECT_LOCK:
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
            raise orch.StageFailed(stage, 1, [why])


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

    The run works in its own copy of the project (`orchestrate.run_copy`, keyed by the flow run
    id): overrides are applied there, never to the checkout's params.yaml, so a kill, a crash
    or a second run at the same time cannot leave the checkout changed.
    """
    logger = get_run_logger()
    if deployment.id:
        # Run by a worker, parameters from the API: the project is the run's clone (the working
        # directory, prefect.yaml's pull steps) unless project_dir names an allowed one.
        root = str(Path(project_dir or ".").resolve())
        orch.check_project_dir(root, orch.allowed_project_roots())
        orch.check_store_outlives(root)
    else:
        root = str(Path(project_dir or os.environ.get("FER_PROJECT_DIR") or ".").resolve())
    orch.check_flow_inputs(overrides, profile, Path(root, "profiles"))
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
    origin = None
    if dispatch == "workers":
        from fer_pipeline.runner.dispatch import dispatch_origin

        origin = dispatch_origin(root)   # committed, pushed, a URL: refused here otherwise
        logger.info("trainings go to workers as jobs: %s at %s", *origin)
    ws = str(orch.run_copy(root, run_id))
    logger.info("run copy: %s (the checkout is not written)", ws)
    changed = orch.apply_overrides(ws, params)
    for key, (old, new) in changed.items():
        logger.info("param %s: %r -> %r", key, old, new)
    if pull if pull is not None else bool(deployment.id):
        # A fresh clone on a worker: the raw data and every output the remote holds, so
        # stages whose inputs did not change are skipped.
        res = orch.dvc("pull", "--allow-missing", cwd=ws, check=False)
        if res.returncode != 0:
            raise orch.classify("pull", res.returncode, (res.stdout + res.stderr).splitlines())
        logger.info("pulled the data and up-to-date outputs from the DVC remote")
    timeouts = (PICKUP_TIMEOUT_S if pickup_timeout_s is None else pickup_timeout_s,
                TRAIN_TIMEOUT_S if train_timeout_s is None else train_timeout_s)
    result = _run(ws, root, run_id, git, changed, models, dispatch, save_experiment, timeouts,
                  origin)
    if adopt and not changed:
        orch.adopt_results(root, ws, [s["stage"] for s in result["stages"]
                                      if s["status"] == "ran"], log=logger.info)
    elif changed:
        logger.info("overrides given: results stay in DVC experiment %s, the checkout's "
                    "dvc.lock is unchanged", result["experiment"])
    orch.remove_run_copy(root, ws)
    return result


def _run(ws: str, root: str, run_id: str, git: dict[str, str], changed: dict[str, Any],
         models: list[str] | None, dispatch: str, save_experiment: bool,
         timeouts: tuple[float, float] = (PICKUP_TIMEOUT_S, TRAIN_TIMEOUT_S),
         origin: tuple[str, str] | None = None) -> dict[str, Any]:
    logger = get_run_logger()
    results: list[dict[str, Any]] = []
    for group in orch.stage_groups(ws):
        if len(group) == 1 and "@" not in group[0]:
            results.append(dvc_stage(group[0], ws, run_id, root))
            continue
        items = [s for s in group if not models or "@" not in s or s.split("@", 1)[1] in models]
        if not group[0].startswith("train@"):   # teach@<model>: seconds each, here, in order
            results.extend(dvc_stage(s, ws, run_id, root) for s in items)
            continue
        if items:
            orch.init_tracking_store(ws, orch.stage_env(root, run_id))
        job_overrides = {key: new for key, (_, new) in changed.items()}
        futures = [parallel_stage.submit(s, ws, run_id, dispatch, root, *timeouts, origin,
                                         job_overrides) for s in items]
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
    if deployment.id:
        # The worker deletes this clone after the run: push what the team needs to find.
        for problem in orch.keep_results(ws, experiment, log=logger.info):
            logger.warning("results not kept: %s", problem)

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
