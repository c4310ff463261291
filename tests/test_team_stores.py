"""The team's shared stores, started for real (tests/team_stack.py): MLflow's registry on
PostgreSQL with artifacts in S3 (moto's S3 server), DVC outputs in an S3 bucket. A pipeline run
registers its champion there, pushes its outputs, and a fresh clone pulls them from S3 and
`fer predict` answers with the registry's champion, not a bundled release. No mocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sandbox import ROOT, make_project
from team_stack import DVC_BUCKET, PostgresMissing, TeamStack, pg_bindir, s3_client, team_stack

pytestmark = pytest.mark.slow

FER = str(Path(sys.executable).parent / "fer")   # the venv's console script
MODEL = "fer-emotion"


def _run(*cmd: str, cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


def _point_dvc_at_bucket(repo: Path, stack: TeamStack, env: dict[str, str]) -> None:
    """What each teammate runs once per checkout: endpoint and keys are local settings
    (.dvc/config.local, gitignored), so nothing machine-specific is committed."""
    for key, value in (("endpointurl", stack.s3_endpoint), ("access_key_id", "testing"),
                       ("secret_access_key", "testing"), ("region", "us-east-1")):
        _run("dvc", "remote", "modify", "--local", "storage", key, value, cwd=repo, env=env)


def _bucket_keys(stack: TeamStack, bucket: str) -> set[str]:
    pages = s3_client(stack.s3_endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


def _lock_md5s(repo: Path, under: str) -> set[str]:
    """The hashes dvc.lock records for the outputs under `under` (models/: DVC-cached)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])
            if out["path"].startswith(under)}


def test_pipeline_on_team_stores_and_a_fresh_clone_predicts_with_the_champion(tmp_path):
    try:
        pg_bindir()
    except PostgresMissing as exc:
        pytest.skip(str(exc))
    t0 = time.monotonic()
    laps: dict[str, float] = {}

    def lap(name: str) -> None:
        laps[name] = time.monotonic() - t0 - sum(laps.values())

    with team_stack(tmp_path / "stack") as stack:
        lap("stack up")
        env = {**os.environ, **stack.env}    # MLFLOW_TRACKING_URI: the team's server wins
        origin = make_project(tmp_path, n_models=1, mlflow_uri="sqlite:///mlflow.db")
        params = yaml.safe_load((origin / "params.yaml").read_text())
        params["mlflow"]["log_model"] = True                 # as the project's params.yaml
        (origin / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        _run("dvc", "remote", "add", "-d", "storage", f"s3://{DVC_BUCKET}/fer-pipeline",
             cwd=origin, env=env)
        _point_dvc_at_bucket(origin, stack, env)
        _run("dvc", "repro", cwd=origin, env=env)
        lap("dvc repro")
        _run("git", "add", "-A", cwd=origin, env=env)
        _run("git", "commit", "-qm", "pipeline run on team stores", cwd=origin, env=env)
        _run("dvc", "push", "-q", cwd=origin, env=env)
        lap("dvc push")
        assert not (origin / "mlflow.db").exists()       # nothing went to a local store

        # The champion is in the PostgreSQL-backed registry ...
        from mlflow.tracking import MlflowClient

        client = MlflowClient(stack.mlflow_uri)
        mv = client.get_model_version_by_alias(MODEL, "champion")
        champion = json.loads((origin / "reports/evaluate/champion.json").read_text())
        assert champion["decision"] == "promoted"
        assert mv.tags["model_name"] == champion["champion"]
        import psycopg2

        with psycopg2.connect(stack.postgres_url.replace("+psycopg2", "")) as conn, \
                conn.cursor() as cur:
            cur.execute("SELECT name, alias, version FROM registered_model_aliases")
            assert (MODEL, "champion", int(mv.version)) in cur.fetchall()

        # ... its model files are in the MLflow bucket, where its artifact location says ...
        assert mv.source.startswith("models:/m-"), mv.source    # a logged model (MLflow 3)
        logged = client.get_logged_model(mv.model_id or mv.source[len("models:/"):])
        location = logged.artifact_location
        assert location.startswith("mlflow-artifacts:/"), location   # served by the server
        prefix = "mlflow/" + location[len("mlflow-artifacts:/"):].strip("/")
        mlflow_keys = _bucket_keys(stack, stack.mlflow_bucket)
        model_files = {k for k in mlflow_keys if k.startswith(prefix + "/")}
        assert prefix + "/MLmodel" in model_files, sorted(mlflow_keys)[:20]
        assert any(k.endswith(".keras") for k in model_files), sorted(model_files)

        # ... and the DVC outputs are in the DVC bucket (content-addressed: the trained models
        # by their dvc.lock hashes), with nothing left to push.
        dvc_keys = _bucket_keys(stack, DVC_BUCKET)
        models = {f"fer-pipeline/files/md5/{m[:2]}/{m[2:]}" for m in _lock_md5s(origin, "models")}
        assert models and models <= dvc_keys, (sorted(models - dvc_keys), sorted(dvc_keys)[:10])
        assert "in sync" in _run("dvc", "status", "--cloud", cwd=origin, env=env)

        # A fresh clone: the committed config names the bucket, nothing of this machine.
        clone = tmp_path / "clone"
        _run("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path, env=env)
        committed = (clone / ".dvc/config").read_text()
        assert f"s3://{DVC_BUCKET}/fer-pipeline" in committed
        assert "127.0.0.1" not in committed and "testing" not in committed
        assert not (clone / ".dvc/config.local").exists()
        model_file = f"models/{champion['champion']}/model.keras"
        assert not (clone / model_file).exists()         # DVC-tracked: not in git
        _point_dvc_at_bucket(clone, stack, env)
        _run("dvc", "pull", "-q", cwd=clone, env=env)
        lap("clone + dvc pull")
        assert "up to date" in _run("dvc", "status", cwd=clone, env=env)
        assert (clone / model_file).read_bytes() == (origin / model_file).read_bytes()

        # fer predict with the team's server: the registry's champion, loaded from S3.
        res = subprocess.run([FER, "predict", str(ROOT / "tests/fixtures/happy_48.jpg")],
                             cwd=clone, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        lap("fer predict")
        answer = json.loads(res.stdout)
        assert answer["model"] == f"models:/{MODEL}@champion", answer["model"]
        assert answer["version"] == str(mv.version)
        assert "bundled release" not in res.stderr
        classes = params["data"]["classes"]
        assert answer["classes"] == classes and len(classes) == 7
        [result] = answer["results"]
        assert result["ok"], result
        assert result["faces"], result
        probs = result["faces"][0]["probabilities"]
        assert list(probs) == classes
        assert abs(sum(probs.values()) - 1) < 0.01
    lap("stack down")
    print("team stores test: " + ", ".join(f"{k} {v:.0f} s" for k, v in laps.items())
          + f"; total {time.monotonic() - t0:.0f} s")
    # Everything is stopped: the servers' ports refuse connections.
    import urllib.request

    with pytest.raises(OSError):
        urllib.request.urlopen(stack.mlflow_uri + "/health", timeout=2)
