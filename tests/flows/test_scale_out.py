"""One pipeline run spread over machines that share only git, S3, PostgreSQL and Prefect.

On one box: a git daemon (the team's git remote), moto's S3 (DVC remote + MLflow artifacts),
PostgreSQL under a real `mlflow server`, a real `prefect server`; a parent machine and two
worker machines, each its own root in its own mount + PID namespace (tests/pool.py), so none
can read another's files. The parent runs the deployment fer-pipeline/on-demand with
dispatch=workers from its fresh clone; the two trainings go to the two workers as stage jobs
(data, no path). Mid-run a new commit lands on the branch (it must not reach the trainings),
and one worker machine is killed mid-training: Prefect's zombie automation marks its run
Crashed, the parent sends the job again, the other worker resumes it from the state on S3.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sandbox import ROOT, make_project, sh

pytest.importorskip("boto3")
from pool import machine, namespaces_work, start_git_daemon, start_prefect_server  # noqa: E402
from team_stack import DVC_BUCKET, PostgresMissing, s3_client, team_stack  # noqa: E402

pytestmark = pytest.mark.slow
MODELS = ("custom_cnn", "custom_cnn_aug")
EPOCHS = 12


def _source(base: Path, s3_env: dict[str, str]) -> Path:
    """The team's repository: a sandbox project (2 tiny models), raw data in DVC on S3, this
    checkout's prefect.yaml and flows/, committed."""
    repo = make_project(base, n_models=2, per_class={"train": 40, "test": 4})
    shutil.copy(ROOT / "prefect.yaml", repo / "prefect.yaml")
    shutil.copytree(ROOT / "flows", repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["mlflow"]["log_model"] = True          # the champion gets registered
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "rm", "-r", "-q", "--cached", "data/raw/fer2013", cwd=repo)
    sh("dvc", "add", "-q", "data/raw/fer2013", cwd=repo)
    sh("dvc", "remote", "add", "-d", "storage", f"s3://{DVC_BUCKET}/pipeline", cwd=repo)
    env = {**os.environ, **s3_env}
    res = subprocess.run(["dvc", "push", "-q"], cwd=repo, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "pool project", cwd=repo)
    return repo


def _history_rows(s3, key: str) -> int:
    try:
        body = s3.get_object(Bucket=DVC_BUCKET, Key=key)["Body"].read().decode()
    except Exception:  # noqa: BLE001 - not there yet
        return 0
    return max(0, len(body.splitlines()) - 1)


def test_a_run_spreads_over_machines_that_share_only_git_s3_postgres_and_prefect(tmp_path):
    if not namespaces_work():
        pytest.skip("mount + PID namespaces not permitted here (unshare): isolation unprovable")
    from prefect import get_client

    t0 = time.monotonic()
    try:
        stack_cm = team_stack(tmp_path / "stores")
        stack = stack_cm.__enter__()
    except PostgresMissing as exc:
        pytest.skip(str(exc))
    machines = []
    servers = []
    try:
        s3_env = {**stack.env, "AWS_ENDPOINT_URL_S3": stack.s3_endpoint}
        source = _source(tmp_path / "source", s3_env)
        commit_a = sh("git", "rev-parse", "HEAD", cwd=source).strip()
        gitbase = tmp_path / "git-server"
        gitbase.mkdir()
        sh("git", "clone", "-q", "--bare", str(source), str(gitbase / "fer.git"), cwd=tmp_path)
        daemon = start_git_daemon(gitbase, tmp_path)
        servers.append(daemon)
        url = f"{daemon.url}/fer.git"
        prefect = start_prefect_server(tmp_path / "prefect-server")
        servers.append(prefect)
        shared = {**s3_env, "PREFECT_API_URL": prefect.url, "FER_GIT_REPOSITORY": url,
                  "MLFLOW_TRACKING_URI": stack.mlflow_uri}

        # Deployments, pool, `gpu` limit 2, zombie automation (40 s without a heartbeat).
        env = {**os.environ, **shared, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        res = subprocess.run([sys.executable, "flows/deploy.py", "--gpus", "2", "--repository", url,
                              "--branch", "main", "--zombie-after-s", "40"], cwd=source, env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr

        base = tmp_path / "machines"
        parent, wa, wb = (machine(base, n, shared) for n in ("parent", "worker-a", "worker-b"))
        roots = [m.root for m in (parent, wa, wb)]
        for m in (parent, wa, wb):
            (m.root / "marker").write_text(m.name)
        hidden = {m.name: [r for r in roots if r != m.root] + [source.parent, gitbase]
                  for m in (parent, wa, wb)}
        # Isolation is real: from inside a machine, the others' roots are empty.
        probe = wa.run(["cat", str(wb.root / "marker"), str(parent.root / "marker")],
                       hidden["worker-a"])
        assert probe.returncode != 0 and "worker-b" not in probe.stdout, probe
        assert wa.run(["cat", str(wa.root / "marker")], hidden["worker-a"]).stdout == "worker-a"

        fer = str(Path(sys.executable).parent / "fer")
        parent.start([fer, "worker", "--pool", "gpu", "--queue", "default", "--name", "parent"],
                      hidden["parent"])
        for m in (wa, wb):
            m.start([fer, "worker", "--pool", "gpu", "--queue", "train", "--limit", "1",
                     "--name", m.name], hidden[m.name])
        machines += [parent, wa, wb]

        overrides = {f"models.{m}.{k}": v for m in MODELS
                     for k, v in (("epochs", EPOCHS), ("early_stopping_patience", 100))}

        async def trigger():
            async with get_client() as client:
                dep = await client.read_deployment_by_name("fer-pipeline/on-demand")
                return await client.create_flow_run_from_deployment(
                    dep.id, parameters={"dispatch": "workers", "overrides": overrides,
                                        "pickup_timeout_s": 600})

        from prefect.settings import PREFECT_API_URL, temporary_settings

        api = temporary_settings({PREFECT_API_URL: prefect.url})
        api.__enter__()
        fr = asyncio.run(trigger())
        run_id = str(fr.id)
        s3 = s3_client(stack.s3_endpoint)

        # Both trainings start, one on each worker.
        jobs = {}
        deadline = time.monotonic() + 900
        while len(jobs) < 2:
            assert time.monotonic() < deadline, _logs(machines)
            for m in (wa, wb):
                for d in (m.root / "worker" / "jobs" / run_id).glob("train-*"):
                    jobs.setdefault(d.name, m)
            _assert_alive(machines)
            time.sleep(0.5)
        assert {m.name for m in jobs.values()} == {"worker-a", "worker-b"}, jobs
        # A commit pushed now must not reach this run's trainings.
        (source / "src" / "fer_pipeline" / "__init__.py").open("a").write('LEAKED = "B"\n')
        sh("git", "commit", "-qam", "after the run started", cwd=source)
        sh("git", "push", "-q", str(gitbase / "fer.git"), "main", cwd=source)

        # Kill the machine of train@custom_cnn once its state on S3 holds 2 finished epochs.
        victim = jobs["train-custom_cnn"]
        survivor = wb if victim is wa else wa
        key = f"pipeline/runs/{run_id}/train-custom_cnn/state/history.csv"
        while _history_rows(s3, key) < 2:
            assert time.monotonic() < deadline, _logs(machines)
            _assert_alive(machines)
            time.sleep(0.3)
        killed_at = time.time()
        victim.kill()

        async def final():
            async with get_client() as client:
                while True:
                    run = await client.read_flow_run(fr.id)
                    if run.state and run.state.is_final():
                        return run
                    await asyncio.sleep(2)

        run = asyncio.run(asyncio.wait_for(final(), timeout=1200))
        assert run.state.is_completed(), f"{run.state}\n{_logs(machines)}"

        async def children():
            async with get_client() as client:
                from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

                dep = await client.read_deployment_by_name("fer-train/gpu")
                return await client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))

        kids = asyncio.run(children())
        # The children's parameters are data: no path of any machine.
        for kid in kids:
            text = json.dumps(kid.parameters)
            assert str(tmp_path) not in text and '"/' not in text, text
            assert kid.parameters["job"]["commit"] == commit_a
        crashed = [k for k in kids if k.state.is_crashed()]
        assert [k.name for k in crashed] == ["train@custom_cnn #1"], [(k.name, k.state) for k in kids]
        assert "heartbeat" in crashed[0].state.message
        # Noticed in minutes, not at the 24 h train timeout.
        retry = next(k for k in kids if k.name == "train@custom_cnn #2")
        assert retry.state.is_completed()
        assert retry.start_time.timestamp() - killed_at < 240
        # The two trainings overlapped in time on two different workers.
        other = next(k for k in kids if k.name == "train@custom_cnn_aug #1")
        first = crashed[0]
        assert first.start_time < other.end_time and other.start_time < first.end_time

        # Results on S3: the commit the run started at, the commit's own code, and the retry
        # resumed past epoch 1 from the dead worker's state.
        results = {m: json.loads(s3.get_object(
            Bucket=DVC_BUCKET, Key=f"pipeline/runs/{run_id}/train-{m}/result.json")["Body"].read())
            for m in MODELS}
        for r in results.values():
            assert r["commit"] == commit_a and r["code"] == "src/fer_pipeline/__init__.py", r
        assert results["custom_cnn"]["attempt"] == 2 and results["custom_cnn"]["resumed_epochs"] >= 2
        assert results["custom_cnn_aug"]["attempt"] == 1
        # Its resume state went once the training finished.
        left = s3.list_objects_v2(Bucket=DVC_BUCKET, Prefix=f"pipeline/runs/{run_id}/train-custom_cnn/state/")
        assert left.get("KeyCount", 0) == 0

        # MLflow: the trainings tagged with the true commit, none left RUNNING.
        import mlflow

        client = mlflow.MlflowClient(stack.mlflow_uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string=f"tags.pipeline_run_id = '{run_id}'")
        trained = [r for r in runs if r.data.tags.get("model_name") in MODELS]
        assert trained and all(r.info.status != "RUNNING" for r in runs), \
            [(r.data.tags.get("model_name"), r.info.status) for r in runs]
        assert all(r.data.tags.get("git_commit", "").startswith(commit_a) for r in trained)
        # One registered version.
        name = yaml.safe_load((source / "params.yaml").read_text())["registry"]["model_name"]
        assert len(client.search_model_versions(f"name = '{name}'")) == 1

        # A teammate's fresh clone gets the run: the experiment from git, the outputs from S3,
        # and DVC finds everything up to date.
        mate = tmp_path / "teammate"
        sh("git", "clone", "-q", url, str(mate), cwd=tmp_path)
        env_mate = {**os.environ, **s3_env}
        exp = f"prefect-{run.name}"
        for cmd in (["dvc", "exp", "pull", "origin", exp], ["dvc", "exp", "apply", exp],
                    ["dvc", "pull", "-q"], ["dvc", "status", "--json"]):
            res = subprocess.run(cmd, cwd=mate, env=env_mate, capture_output=True, text=True)
            assert res.returncode == 0, (cmd, res.stdout, res.stderr)
        status = json.loads(res.stdout or "{}")
        listing = subprocess.run(["find", "models", "-type", "f"], cwd=mate, capture_output=True,
                                 text=True).stdout
        assert status == {}, (res.stdout, listing)
        assert (mate / "models" / "custom_cnn" / "model.keras").is_file()
        for kid in sorted(kids, key=lambda k: k.start_time):
            who = jobs.get(f"train-{kid.name.split('@')[1].split()[0]}")
            where = who.name if kid.name.endswith("#1") else survivor.name
            print(f"  {kid.name:26s} {kid.state.name:10s} on {where:8s} "
                  f"{kid.start_time:%H:%M:%S} -> {kid.end_time:%H:%M:%S}")
        print(f"  {victim.name} killed at {time.strftime('%H:%M:%S', time.localtime(killed_at))}"
              f"; train@custom_cnn resumed on {survivor.name} after "
              f"{results['custom_cnn']['resumed_epochs']} finished epochs")
        print(f"scale-out test: {time.monotonic() - t0:.0f} s in all")
    finally:
        if "api" in locals():
            api.__exit__(None, None, None)
        for m in machines:
            m.stop()
        for s in servers:
            s.stop()
        stack_cm.__exit__(None, None, None)


def _assert_alive(machines) -> None:
    for m in machines:
        assert m.proc.poll() is None, f"{m.name} exited:\n{m.output()[-4000:]}"


def _logs(machines) -> str:
    return "\n".join(f"==== {m.name}\n{m.output()[-3000:]}" for m in machines)
