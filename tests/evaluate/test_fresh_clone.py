"""A fresh clone of the project evaluates what it pulled with DVC: the models' training runs
live in another machine's MLflow store, so evaluate logs the local model files into its own
store (once) and registers the champion from there. Real git, `dvc push/pull/repro`, MLflow."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from sandbox import make_project, sh

pytestmark = pytest.mark.slow   # whole pipelines in fresh clones


def _env():
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # params decide


def _repro(repo, *args):
    res = subprocess.run(["dvc", "repro", *args], cwd=repo, env=_env(), capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def _store(repo):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def test_fresh_clone_pulls_and_reruns_evaluate_with_its_own_store(tmp_path):
    origin = make_project(tmp_path, n_models=2, mlflow_uri="sqlite:///mlflow.db")
    params = yaml.safe_load((origin / "params.yaml").read_text())
    params["mlflow"]["log_model"] = True                 # as the project's params.yaml
    (origin / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with (origin / ".gitignore").open("a") as fh:
        fh.write("/mlflow.db\n/mlruns/\n")
    sh("dvc", "remote", "add", "-d", "storage", "../../storage", cwd=origin)
    _repro(origin)
    sh("git", "add", "-A", cwd=origin)
    sh("git", "commit", "-qm", "pipeline run", cwd=origin)
    sh("dvc", "push", "-q", cwd=origin)
    origin_mlflow = json.loads((origin / "reports/train/custom_cnn/mlflow.json").read_text())
    assert str(tmp_path) not in json.dumps(origin_mlflow)   # committed: no machine path

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path)
    sh("dvc", "pull", "-q", cwd=clone)
    assert "up to date" in sh("dvc", "status", cwd=clone)

    # The clone's store (its own mlflow.db) has none of the origin's runs: evaluate imports.
    out = _repro(clone, "-f", "-s", "evaluate")
    assert "not in this tracking store" in out
    client = _store(clone)
    runs = {r.info.run_name: r for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()])}
    assert {"custom_cnn-imported", "custom_cnn_aug-imported"} <= set(runs)
    imported = runs["custom_cnn-imported"]
    assert imported.data.tags["imported_from_run"] == origin_mlflow["run_id"]
    assert "test_accuracy" in imported.data.metrics          # the evaluation logged into it
    champion = json.loads((clone / "reports/evaluate/champion.json").read_text())
    assert champion["decision"] == "promoted"
    mv = client.get_model_version_by_alias("fer-emotion", "champion")
    assert mv.tags["model_name"] == champion["champion"]
    n_versions = len(client.search_model_versions("name='fer-emotion'"))

    # Again: the imported runs are reused; nothing new is registered, the alias stays.
    out = _repro(clone, "-f", "-s", "evaluate")
    assert "is already in this store" in out
    client = _store(clone)
    names = [r.info.run_name for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()])]
    assert names.count("custom_cnn-imported") == 1
    assert len(client.search_model_versions("name='fer-emotion'")) == n_versions
    assert client.get_model_version_by_alias("fer-emotion", "champion").version == mv.version
    assert json.loads((clone / "reports/evaluate/champion.json").read_text())["decision"] == \
        "already_champion"


def test_a_failed_evaluate_leaves_the_previous_reports_whole(tmp_path):
    repo = make_project(tmp_path, n_models=2)
    _repro(repo)
    out = repo / "reports/evaluate"
    # A marker in the first model's report: an evaluate that writes as it goes replaces it.
    (out / "per_class/custom_cnn.csv").write_text("marker\n")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert len(before) > 5
    # The second model's file is broken: evaluate scores the first, then fails on it.
    (repo / "models/custom_cnn_aug/model.keras").write_bytes(b"not a keras file")
    res = subprocess.run(["fer", "evaluate"], cwd=repo, env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode != 0
    assert "custom_cnn: test acc" in res.stderr            # the first model was scored
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []
