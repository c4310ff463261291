"""The Prefect flow against a real Prefect server (the test harness) and a real worker process.

One temporary git + DVC project (tests/sandbox.py: this project's dvc.yaml and src/, tiny
synthetic data, two 1-epoch models) runs end to end, then again with nothing changed; a
second project with a bad class folder runs through `prefect deploy` + `prefect worker start`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flows.pipeline import fer_pipeline
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from prefect_runs import finish_runs
from sandbox import ROOT, make_project

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow   # a Prefect server and worker, whole pipelines


@pytest.fixture(scope="module", autouse=True)
def _project_tracking_store():
    """The flow must log to the project's own store (params.yaml), whatever an earlier test
    module left in MLFLOW_TRACKING_URI (env wins over params)."""
    old = os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    if old is not None:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["FER_WORKSPACE_DIR"] = str(tmp_path_factory.mktemp("workspaces"))
    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("e2e"))


def run(coro):
    return asyncio.run(coro)


async def _task_runs(flow_run_id):
    async with get_client() as client:
        flt = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        return await client.read_task_runs(flow_run_filter=flt)


async def _artifact(key):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async with get_client() as client:
        arts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        return arts[0] if arts else None


def test_flow_end_to_end_then_nothing_to_do(prefect_server, project):
    params_before = (project / "params.yaml").read_bytes()
    t0 = time.monotonic()
    state = fer_pipeline(project_dir=str(project), return_state=True)
    first_s = time.monotonic() - t0
    assert state.is_completed(), state.message
    out = state.result()
    stages = {s["stage"]: s["status"] for s in out["stages"]}
    models = ["custom_cnn", "custom_cnn_aug"]
    assert set(stages) >= {"validate", "clean", "split", *(f"train@{m}" for m in models)}
    assert set(stages.values()) == {"ran"}
    assert out["overrides"] == {}
    assert (project / "params.yaml").read_bytes() == params_before   # never written
    # One task per stage, all Completed, visible by stage name.
    runs = run(_task_runs(state.state_details.flow_run_id))
    names = {tr.name: tr.state.type.value for tr in runs}
    for stage in stages:
        assert names.get(stage) == "COMPLETED", names
    # No overrides and an unchanged checkout: the results are brought back and recorded by DVC;
    # MLflow runs (in the checkout's store) carry the run id.
    assert (project / "models/custom_cnn/model.keras").is_file()
    lock = (project / "dvc.lock").read_text()
    assert "train@custom_cnn_aug" in lock and "train@custom_cnn:" in lock
    assert subprocess.run([str(BIN / "dvc"), "status", "--json"], cwd=project, capture_output=True,
                          text=True).stdout.strip() == "{}"            # dvc status tells the truth
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project.parent / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fer-emotion")
    tagged = client.search_runs([exp.experiment_id],
                                f"tags.pipeline_run_id = '{out['run_id']}'")
    assert len(tagged) == len(models)
    assert out["experiment"] and out["experiment"].startswith("prefect-")
    art = run(_artifact("fer-pipeline-report"))
    assert art is not None and "Champion" in art.data and out["run_id"] in art.data

    t0 = time.monotonic()
    again = fer_pipeline(project_dir=str(project), return_state=True)
    second_s = time.monotonic() - t0
    assert again.is_completed(), again.message
    assert {s["status"] for s in again.result()["stages"]} == {"skipped"}
    assert second_s < max(30.0, first_s / 2), (first_s, second_s)
    print(f"\nfirst run {first_s:.1f}s, nothing-changed run {second_s:.1f}s")

    # Overrides: the run works on its own copy; the checkout stays byte for byte as it was and
    # the results are the run's DVC experiment.
    lock_before = (project / "dvc.lock").read_bytes()
    third = fer_pipeline(project_dir=str(project), models=["custom_cnn"],
                         overrides={"train.seed": 7}, return_state=True)
    assert third.is_completed(), third.message
    res = third.result()
    assert res["overrides"] == {"train.seed": [42, 7]}
    assert {s["stage"]: s["status"] for s in res["stages"]}["train@custom_cnn"] == "ran"
    assert (project / "params.yaml").read_bytes() == params_before
    assert (project / "dvc.lock").read_bytes() == lock_before
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=project,
                          capture_output=True, text=True).stdout.split()
    (ref,) = [r for r in refs if r.endswith("/" + res["experiment"])]
    exp_params = subprocess.run(["git", "show", f"{ref}:params.yaml"], cwd=project,
                                capture_output=True, text=True).stdout
    assert "seed: 7" in exp_params


def test_failing_stage_fails_the_run_with_its_message(prefect_server, tmp_path):
    repo = make_project(tmp_path, n_models=1)
    shutil.copytree(repo / "data/raw/fer2013/train/sad", repo / "data/raw/fer2013/train/Sad")
    state = fer_pipeline(project_dir=str(repo), save_experiment=False, return_state=True)
    assert state.is_failed()
    assert "stage 'validate' failed" in state.message
    assert "data checks failed" in state.message and "train/Sad/" in state.message
    runs = {tr.name: tr.state.type.value for tr in run(_task_runs(state.state_details.flow_run_id))}
    assert runs["validate"] == "FAILED" and "clean" not in runs


def _code_repo(base: Path) -> Path:
    """What the workers clone (prefect.yaml's git_clone): this checkout's flows/ and
    prefect.yaml, committed (hermetic: not the checkout's origin, not its last commit)."""
    code = base / "code"
    shutil.copytree(ROOT / "flows", code / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "prefect.yaml", code / "prefect.yaml")
    for args in (["init", "-q", "-b", "main"], ["add", "-A"],
                 ["-c", "user.email=t@fer", "-c", "user.name=t", "commit", "-qm", "code"]):
        subprocess.run(["git", *args], cwd=code, check=True, capture_output=True)
    return code


def test_deployments_and_a_real_worker(prefect_server, tmp_path):
    # The sandbox projects live under tmp_path: allowed on the worker by FER_ALLOWED_PROJECT_ROOTS
    # (a flow parameter alone cannot point a worker at a folder, docs/security.md).
    env = dict(os.environ, PREFECT_API_URL=prefect_server, FER_GIT_REPOSITORY=str(_code_repo(tmp_path)),
               FER_GIT_BRANCH="main", FER_ALLOWED_PROJECT_ROOTS=str(tmp_path),
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    res = subprocess.run([sys.executable, "flows/deploy.py"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr

    async def deployments():
        async with get_client() as client:
            return {n: await client.read_deployment_by_name(n)
                    for n in ("fer-pipeline/nightly", "fer-pipeline/on-demand", "fer-train/gpu")}

    deps = run(deployments())
    nightly = deps["fer-pipeline/nightly"]
    assert nightly.work_pool_name == "gpu"
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert deps["fer-pipeline/on-demand"].schedules == []
    assert deps["fer-pipeline/on-demand"].work_pool_name == "gpu"
    assert deps["fer-train/gpu"].work_queue_name == "train"

    # A short, failing run of the on-demand deployment, picked up by a real worker process.
    repo = make_project(tmp_path, n_models=1)
    shutil.copytree(repo / "data/raw/fer2013/train/sad", repo / "data/raw/fer2013/train/Sad")

    async def trigger():
        async with get_client() as client:
            return await client.create_flow_run_from_deployment(
                deps["fer-pipeline/on-demand"].id,
                parameters={"project_dir": str(repo), "save_experiment": False})

    flow_run = run(trigger())

    async def trigger_nightly():   # at the same time, through the other deployment
        async with get_client() as client:
            return await client.create_flow_run_from_deployment(
                deps["fer-pipeline/nightly"].id,
                parameters={"project_dir": str(repo), "save_experiment": False})

    nightly_run = run(trigger_nightly())
    worker = subprocess.Popen([BIN / "prefect", "worker", "start", "--pool", "gpu", "--type", "process",
                               "--name", "test-worker"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)

    (fr, nightly_fr), log = finish_runs(worker, [flow_run.id, nightly_run.id], timeout_s=300,
                                        grace_s=20)
    assert fr.state.is_failed(), f"{fr.state}\n{log[-3000:]}"
    assert "data checks failed" in fr.state.message and "train/Sad/" in fr.state.message
    assert "test-worker" in log or fr.work_pool_name == "gpu"
    # One concurrency limit over both deployments: the worker ran them one after the other.
    assert nightly_fr.state.is_failed(), f"{nightly_fr.state}\n{log[-3000:]}"
    first, second = sorted([fr, nightly_fr], key=lambda f: f.start_time)
    assert second.start_time >= first.end_time, (first.start_time, first.end_time,
                                                 second.start_time)
