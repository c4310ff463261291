"""Workers get their code from git, bounded waits for workers, and the failure alert.

A real Prefect server (the test harness), deployments registered by flows/deploy.py from a
local git repository (a sandbox project holding this checkout's prefect.yaml and flows/), a
real `prefect worker start` process that runs prefect.yaml's pull steps (git_clone +
set_working_directory), and a tiny HTTP server on 127.0.0.1 standing in for the alert webhook.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from flows.pipeline import fer_pipeline
from prefect import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
)
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from pool import start_git_daemon
from prefect_runs import finish_runs
from sandbox import ROOT, make_project, sh

BIN = Path(sys.executable).parent
MARKER = "fer-pipeline code loaded from"

pytestmark = pytest.mark.slow   # a Prefect server, a real worker, a git daemon


@pytest.fixture(scope="module", autouse=True)
def _project_tracking_store():
    """The flows log to the sandbox's own MLflow store (its params.yaml): env would win."""
    old = os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    if old is not None:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> Iterator[str]:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["FER_WORKSPACE_DIR"] = str(tmp_path_factory.mktemp("workspaces"))
    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def source_repo(tmp_path_factory) -> Path:
    """The repository the workers clone: a committed sandbox project (data in git) with this
    checkout's prefect.yaml and flows/; its pipeline.py prints where it was loaded from."""
    repo = make_project(tmp_path_factory.mktemp("source"), n_models=1)
    shutil.copy(ROOT / "prefect.yaml", repo / "prefect.yaml")
    shutil.copytree(ROOT / "flows", repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    with open(repo / "flows/pipeline.py", "a") as f:
        f.write(f'\nprint(f"{MARKER} {{__file__}}", flush=True)\n')
    # The team's DVC remote (a folder here; S3 in tests/test_team_stores.py): a clone pushes
    # its outputs there before the worker deletes it.
    sh("dvc", "remote", "add", "-d", "storage", str(repo.parent / "dvc-remote"), cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "flows", cwd=repo)
    return repo


@pytest.fixture(scope="module")
def deployed(prefect_server, source_repo) -> dict[str, str]:
    """`flows/deploy.py` run in the source repository, FER_GIT_* unset: the single-machine
    defaults (no origin remote: the repository's own path, its current branch)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FER_GIT_", "FER_PROJECT"))}
    env.update(PREFECT_API_URL=prefect_server, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    res = subprocess.run([sys.executable, "flows/deploy.py"], cwd=source_repo, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"workers clone {source_repo} (branch main)" in res.stdout
    return env


def run(coro):
    return asyncio.run(coro)


async def _logs(flow_run_id) -> list[str]:
    async with get_client() as client:
        logs = await client.read_logs(LogFilter(flow_run_id={"any_": [flow_run_id]}))
        return [log.message for log in logs]


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def webhook(monkeypatch) -> Iterator[list[dict]]:
    """A JSON webhook on 127.0.0.1; FER_ALERT_WEBHOOK points at it for this test."""
    _Hook.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("FER_ALERT_WEBHOOK", f"http://127.0.0.1:{server.server_port}/fer")
    yield _Hook.received
    server.shutdown()


def test_a_real_worker_clones_the_code_and_runs_the_flow_in_the_clone(deployed, source_repo,
                                                                      tmp_path):
    head = sh("git", "rev-parse", "HEAD", cwd=source_repo).strip()

    async def trigger(params: dict) -> object:
        async with get_client() as client:
            dep = await client.read_deployment_by_name("fer-pipeline/on-demand")
            assert dep.pull_steps[0]["prefect.deployments.steps.git_clone"] == {
                "id": "clone", "repository": str(source_repo), "branch": "main"}
            return await client.create_flow_run_from_deployment(dep.id, parameters=params)

    good = run(trigger({}))                                   # project_dir: the clone
    refused = run(trigger({"project_dir": str(source_repo)}))  # a folder outside the run's roots
    workdir = tmp_path / "worker"
    workdir.mkdir()
    # `fer worker` (devices first; no GPU here, so allowed explicitly), which execs the real
    # `prefect worker start --pool gpu --type process`.
    worker = subprocess.Popen([BIN / "fer", "worker", "--pool", "gpu", "--allow-no-gpu",
                               "--name", "clone-worker"], cwd=workdir,
                              env=deployed, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)

    (fr, refused_fr), log = finish_runs(worker, [good.id, refused.id], timeout_s=600, grace_s=30)
    assert fr.state.is_completed(), f"{fr.state}\n{log[-4000:]}"
    # The code came from a fresh clone: the entrypoint was loaded from it...
    loaded = re.findall(rf"{MARKER} (\S+)", log)
    assert loaded, log[-4000:]
    clone = Path(loaded[0]).parents[1]
    assert clone.name == f"{source_repo.name}-main" and clone != source_repo
    assert not clone.is_relative_to(source_repo) and not clone.is_relative_to(workdir)
    assert clone.parent.name.endswith("prefect")       # the process worker's per-run temp dir
    assert not clone.exists()                          # ...removed after the run
    # ...and the flow worked in the clone (project_dir = the working directory) at the
    # source's HEAD.
    lines = [m for m in run(_logs(fr.id)) if m.startswith("project ")]
    assert lines and lines[0].startswith(f"project {clone}, git {head} (dirty: false)"), lines
    assert (source_repo / "dvc.lock").exists() is False   # the source was never written
    # A project_dir outside the run's clone / allowed roots fails before anything runs.
    assert refused_fr.state.is_failed(), f"{refused_fr.state}\n{log[-4000:]}"
    assert "outside the allowed roots" in refused_fr.state.message
    # What the deleted clone made was kept: outputs in the DVC remote, the experiment pushed to
    # the repository it came from.
    assert "fer worker: pool gpu, Keras backend tensorflow" in log
    pushed = sorted(p.name for p in (source_repo.parent / "dvc-remote").rglob("*") if p.is_file())
    assert pushed, "no outputs pushed to the DVC remote"
    refs = sh("git", "for-each-ref", "refs/exps", cwd=source_repo)
    assert f"prefect-{fr.name}" in refs, refs


def test_no_worker_for_the_trainings_fails_fast_and_cancels_the_child(deployed, tmp_path,
                                                                      webhook):
    repo = make_project(tmp_path, n_models=1)
    # dispatch=workers sends jobs that name a git URL and a pushed commit, and moves inputs
    # through the DVC remote: a git daemon and a local remote stand in for the team's.
    sh("dvc", "remote", "add", "-d", "storage", str(tmp_path / "dvc-remote"), cwd=repo)
    sh("git", "commit", "-qam", "DVC remote", cwd=repo)
    gitbase = tmp_path / "git-server"
    gitbase.mkdir()
    sh("git", "clone", "-q", "--bare", str(repo), str(gitbase / "fer.git"), cwd=tmp_path)
    daemon = start_git_daemon(gitbase, tmp_path)
    url = f"{daemon.url}/fer.git"
    sh("git", "remote", "add", "origin", url, cwd=repo)
    sh("git", "fetch", "-q", "origin", cwd=repo)
    os.environ["FER_GIT_REPOSITORY"] = url
    try:
        state = fer_pipeline(project_dir=str(repo), dispatch="workers", pickup_timeout_s=3,
                             save_experiment=False, return_state=True)
    finally:
        del os.environ["FER_GIT_REPOSITORY"]
        daemon.stop()
    assert state.is_failed()
    msg = state.message
    assert "no worker picked up fer-train run train@custom_cnn" in msg, msg
    assert "--pool gpu --work-queue train" in msg and "was cancelled" in msg

    async def children():
        async with get_client() as client:
            dep = await client.read_deployment_by_name("fer-train/gpu")
            return await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))

    (child,) = [c for c in run(children()) if c.parameters["job"]["run_id"] ==
                str(state.state_details.flow_run_id) and c.name == "train@custom_cnn #1"]
    assert child.parameters["job"]["repository"] == url   # data, no path
    assert child.state.is_cancelled() and "no worker picked up" in child.state.message
    # The failure hook reported it too.
    assert [p["state"] for p in webhook] == ["Failed"]
    assert "no worker picked up" in webhook[0]["message"]


def test_a_failed_run_is_reported_to_the_webhook(prefect_server, tmp_path, webhook):
    repo = make_project(tmp_path, n_models=1)
    shutil.copytree(repo / "data/raw/fer2013/train/sad", repo / "data/raw/fer2013/train/Sad")
    state = fer_pipeline(project_dir=str(repo), save_experiment=False, return_state=True)
    assert state.is_failed()
    (alert,) = webhook
    assert alert["flow"] == "fer-pipeline" and alert["state"] == "Failed"
    assert alert["flow_run_id"] == str(state.state_details.flow_run_id)

    async def flow_run_name():
        async with get_client() as client:
            return (await client.read_flow_run(state.state_details.flow_run_id)).name

    assert alert["flow_run_name"] == run(flow_run_name())
    assert "data checks failed" in alert["message"] and "train/Sad/" in alert["message"]
    assert alert["parameters"]["project_dir"] == str(repo)

    async def artifact():
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["fer-pipeline-failure"])))

    arts = run(artifact())
    assert any(alert["flow_run_name"] in a.data and "data checks failed" in a.data for a in arts)


def test_refused_overrides_fail_before_anything_runs(prefect_server, tmp_path, webhook):
    repo = make_project(tmp_path, n_models=1)
    state = fer_pipeline(project_dir=str(repo), overrides={"data.raw_dir": "/etc"},
                         save_experiment=False, return_state=True)
    assert state.is_failed() and "data.raw_dir" in state.message
    assert "override(s) refused" in state.message

    async def task_runs():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))

    assert run(task_runs()) == []                       # no stage ran
    assert webhook and "override(s) refused" in webhook[0]["message"]
