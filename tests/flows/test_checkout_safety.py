"""A flow run never changes the checkout: killed with SIGKILL mid-training, or two at once.

Each run is a real `python -m flows.pipeline` process (against a real Prefect server) on a
sandbox project; the checkout's params.yaml and dvc.lock must be byte-identical afterwards and
`dvc status` must still tell the truth.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox import ROOT, make_project, sh


@pytest.fixture(scope="module")
def api_url():
    """One real Prefect server for the flow processes of this module."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


def _flow(api_url: str, repo: Path, workspaces: Path, tmp: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(FER_WORKSPACE_DIR=str(workspaces), PREFECT_API_URL=api_url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--project-dir", str(repo),
                             *args], cwd=tmp, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _snapshot(repo: Path) -> dict[str, bytes | None]:
    return {name: (repo / name).read_bytes() if (repo / name).exists() else None
            for name in ("params.yaml", "dvc.lock")}


def _store(repo: Path) -> None:
    """The team's MLflow store exists before runs start (two runs creating one SQLite file at
    the same instant is MLflow's race, not ours)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo.parent / 'mlflow.db'}")
    client.create_experiment("fer-emotion")


def _project(tmp_path: Path) -> tuple[Path, dict[str, bytes | None], Path]:
    """(sandbox checkout with its MLflow store, its params.yaml/dvc.lock bytes, workspaces)."""
    repo = make_project(tmp_path, n_models=1)
    _store(repo)
    return repo, _snapshot(repo), tmp_path / "ws"


def _assert_unchanged(repo: Path, before: dict[str, bytes | None]) -> None:
    assert _snapshot(repo) == before
    assert sh("git", "status", "--porcelain", cwd=repo).strip() == ""


@pytest.mark.slow
def test_sigkill_mid_training_leaves_the_checkout_as_it_was(tmp_path, api_url):
    repo, before, workspaces = _project(tmp_path)
    proc = _flow(api_url, repo, workspaces, tmp_path, "--epochs", "200", "-S", "train.seed=7",
                 "--no-experiment")
    deadline = time.time() + 600
    while not list(workspaces.glob("**/train-custom_cnn/.cache/train/custom_cnn/history.csv")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "training never started"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)       # the flow, dvc and the training, mid-epoch
    proc.wait(timeout=30)
    _assert_unchanged(repo, before)
    status = sh("dvc", "status", cwd=repo)
    assert "train@custom_cnn" in status      # nothing trained in the checkout, and DVC says so


@pytest.mark.slow
def test_two_runs_at_once_each_keep_their_own_params(tmp_path, api_url):
    repo, before, workspaces = _project(tmp_path)
    for seed in (7, 8):
        (tmp_path / f"r{seed}").mkdir()
    runs = [_flow(api_url, repo, workspaces, tmp_path / f"r{seed}", "-S", f"train.seed={seed}")
            for seed in (7, 8)]
    logs = [p.communicate(timeout=900)[0] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], "\n".join(log[-2000:] for log in logs)
    _assert_unchanged(repo, before)
    refs = [r for r in sh("git", "for-each-ref", "--format=%(refname)", "refs/exps",
                          cwd=repo).split() if "/prefect-" in r]   # the runs' experiments
    import yaml

    seeds = sorted(yaml.safe_load(sh("git", "show", f"{ref}:params.yaml", cwd=repo))["train"]["seed"]
                   for ref in refs)
    assert seeds == [7, 8], seeds   # each run's experiment holds its own override
