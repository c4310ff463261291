"""`fer run` (the README's `make run`) works in a temporary copy: the checkout never changes."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from sandbox import make_project, sh

pytestmark = pytest.mark.slow   # whole pipelines through `fer run`


def _tracked_state(repo):
    return {p: (repo / p).read_bytes() for p in ("params.yaml", "dvc.yaml")}


def test_fer_run_leaves_the_checkout_untouched_and_records_an_experiment(tmp_path):
    repo = make_project(tmp_path, n_models=1)
    before = _tracked_state(repo)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # params decide
    res = subprocess.run(["fer", "run", "-n", "smoke", "-S", "models.custom_cnn.epochs=2"],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "the checkout is unchanged" in res.stdout
    # The checkout: no tracked file changed, no stage output or lock written into it.
    assert sh("git", "status", "--porcelain", cwd=repo).strip() == ""
    assert _tracked_state(repo) == before
    assert not (repo / "dvc.lock").exists() and not (repo / "reports").exists()
    # The experiment holds the run: its params (with the override), lock and reports.
    ref = sh("git", "for-each-ref", "--format=%(refname)", "refs/exps", cwd=repo).split()
    (smoke,) = [r for r in ref if r.endswith("/smoke")]
    params = yaml.safe_load(sh("git", "show", f"{smoke}:params.yaml", cwd=repo))
    assert params["models"]["custom_cnn"]["epochs"] == 2
    assert "Champion" in sh("git", "show", f"{smoke}:reports/evaluate/comparison.md", cwd=repo)
    mlflow_json = sh("git", "show", f"{smoke}:reports/train/custom_cnn/mlflow.json", cwd=repo)
    assert str(tmp_path) not in mlflow_json          # no path of this machine in a committed file
    # MLflow logged into the checkout's store (params: base/mlflow.db), not the throw-away copy.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.data.tags.get("model_name") for r in runs] == ["custom_cnn"]


def test_fer_run_on_a_fresh_clone_fetches_the_raw_data_from_a_relative_remote(tmp_path):
    """The README's `make run` on a fresh clone: the raw images exist only in the team's remote,
    configured with a URL relative to the checkout (as `.dvc/config` ships it). The temporary
    copy under .dvc/tmp cannot resolve that URL, so `fer run` fetches from the checkout first."""
    origin = make_project(tmp_path / "origin", n_models=1)
    sh("git", "rm", "-rq", "--cached", "data/raw/fer2013", cwd=origin)
    sh("dvc", "remote", "add", "fer2013", "../../team-remote", cwd=origin)  # -> tmp/origin/team-remote
    sh("dvc", "add", "-q", "data/raw/fer2013", cwd=origin)
    dvcfile = yaml.safe_load((origin / "data/raw/fer2013.dvc").read_text())
    dvcfile["outs"][0]["remote"] = "fer2013"
    (origin / "data/raw/fer2013.dvc").write_text(yaml.safe_dump(dvcfile, sort_keys=False))
    sh("dvc", "push", "-q", "data/raw/fer2013.dvc", cwd=origin)
    sh("git", "add", "-A", cwd=origin)
    sh("git", "commit", "-qm", "raw data in DVC", cwd=origin)

    clone = tmp_path / "origin" / "clone"   # beside repo: ../../team-remote resolves the same
    sh("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path)
    assert not (clone / "data/raw/fer2013").exists()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    res = subprocess.run(["fer", "run", "-n", "fresh", "-S", "models.custom_cnn.epochs=1"],
                         cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert sh("git", "status", "--porcelain", cwd=clone).strip() == ""
    ref = sh("git", "for-each-ref", "--format=%(refname)", "refs/exps", cwd=clone).split()
    (fresh,) = [r for r in ref if r.endswith("/fresh")]
    counts = yaml.safe_load(sh("git", "show", f"{fresh}:reports/split/counts.json", cwd=clone))
    assert counts, "the run's split stage saw the fetched images"


def test_a_smoke_profile_after_a_real_champion_leaves_the_alias_and_says_so(tmp_path):
    from mlflow.tracking import MlflowClient

    repo = make_project(tmp_path, n_models=1, mlflow_uri="sqlite:///mlflow.db")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["mlflow"]["log_model"] = True
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "profiles").mkdir(exist_ok=True)
    (repo / "profiles/smoke.yaml").write_text(          # what the quick profile says about it
        "models.custom_cnn.epochs: 2\nregistry.promote: false\n")
    with (repo / ".gitignore").open("a") as fh:
        fh.write("/mlflow.db\n/mlruns/\n")
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "log models; smoke profile", cwd=repo)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # The real champion: the project's own pipeline, promotion on (params.yaml's default).
    res = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("fer-emotion", "champion")

    res = subprocess.run(["fer", "run", "--profile", "smoke", "-n", "smoke"], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (f"registry: @champion unchanged, still v{champion.version} (custom_cnn); candidate "
            "custom_cnn") in res.stdout
    assert "not_asked (registry.promote is false" in res.stdout
    versions = client.search_model_versions("name='fer-emotion'")
    assert len(versions) == 2                          # the smoke model: registered, recorded
    assert client.get_model_version_by_alias("fer-emotion", "champion").version == champion.version
    smoke = max(versions, key=lambda v: int(v.version))
    assert smoke.tags["promotion_decision"] == "not_asked"


def test_two_runs_at_once_keep_their_own_results(tmp_path):
    """Two `fer run`s started together in one checkout (one DVC cache, one MLflow store, one
    git repository): each experiment holds its own params and metrics, each MLflow run its own
    run id, and the checkout is untouched."""
    import mlflow

    repo = make_project(tmp_path, n_models=1)
    before = _tracked_state(repo)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs = {epochs: subprocess.Popen(
        ["fer", "run", "-n", f"e{epochs}", "-S", f"models.custom_cnn.epochs={epochs}"],
        cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for epochs in (1, 2)}
    outs = {epochs: p.communicate(timeout=900)[0] for epochs, p in procs.items()}
    for epochs, p in procs.items():
        assert p.returncode == 0, outs[epochs][-3000:]
    assert sh("git", "status", "--porcelain", cwd=repo).strip() == ""
    assert _tracked_state(repo) == before
    refs = sh("git", "for-each-ref", "--format=%(refname)", "refs/exps", cwd=repo).split()
    for epochs in (1, 2):
        (ref,) = [r for r in refs if r.endswith(f"/e{epochs}")]
        params = yaml.safe_load(sh("git", "show", f"{ref}:params.yaml", cwd=repo))
        metrics = yaml.safe_load(sh("git", "show", f"{ref}:reports/train/custom_cnn/metrics.json",
                                    cwd=repo))
        assert params["models"]["custom_cnn"]["epochs"] == epochs
        assert metrics["epochs_run"] == epochs
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    trained = {r.data.tags.get("pipeline_run_id"): r for r in runs
               if r.data.tags.get("model_name") == "custom_cnn"}
    assert set(trained) == {"e1", "e2"}
    assert {k: int(r.data.params["model.epochs"]) for k, r in trained.items()} == {"e1": 1, "e2": 2}
