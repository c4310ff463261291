"""Fast checks of the run engine's parts: failure classes, retries, overrides, the plan."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from prefect import flow

from fer_pipeline.errors import ERROR_FILE_ENV, FerError, ParamsError, TransientError
from fer_pipeline.runner import engine, overrides, project
from fer_pipeline.runner.stage import StageFailed, StageResult, TransientStageError, classify
from flows import pipeline
from sandbox import ROOT


def test_classify_by_the_type_fer_reported_not_by_text():
    down = ["fer train: error: MLflow tracking server http://x:5000 is unreachable"]
    exc = classify("train@a", 75, down, {"type": "TrackingUnavailable", "transient": True})
    assert isinstance(exc, TransientStageError) and isinstance(exc, TransientError)
    real = ["noise", "fer validate: error: data checks failed (pipeline stopped):",
            "  - unknown class folder train/Sad/", "ERROR: failed to reproduce 'validate'"]
    exc = classify("validate", 1, real, {"type": "DataChecksFailed", "transient": False})
    assert type(exc) is StageFailed and isinstance(exc, FerError)
    assert "train/Sad/" in str(exc) and "noise" not in str(exc)
    # Text that merely looks transient is not: only fer's report or DVC's busy lock count.
    assert type(classify("x", 1, ["Connection refused"], None)) is StageFailed
    busy = ["ERROR: Unable to acquire lock. Most likely another DVC process is running"]
    assert isinstance(classify("x", 1, busy, None), TransientStageError)


def test_fer_reports_its_error_type_to_the_runner(tmp_path):
    """The channel the runner reads through `dvc repro`: `fer` writes the FerError's type."""
    report = tmp_path / "err.json"
    env = dict(os.environ, **{ERROR_FILE_ENV: str(report)})
    env["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:9"   # nothing listens: TrackingUnavailable
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    res = subprocess.run(["fer", "train", "--model", "fernet"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 75, res.stderr
    assert json.loads(report.read_text())["transient"] is True
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_only_transient_failures_are_retried(monkeypatch, prefect_harness):
    calls = []

    def flaky(stage, cwd, env=None, log=print, force=False):
        calls.append(stage)
        if stage == "down" and len(calls) == 1:
            raise TransientStageError(stage, 1, ["Connection refused"])
        if stage == "bad":
            raise StageFailed(stage, 1, ["fer validate: error: data checks failed"])
        return StageResult(stage, "ran", 0.0)

    monkeypatch.setattr(engine, "run_stage", flaky)
    task = pipeline.dvc_stage.with_options(retries=2, retry_delay_seconds=0)
    run = engine.Run(ROOT, ROOT, "rid", {})

    @flow
    def one(stage: str):
        return task(stage, run)

    assert one("down")["status"] == "ran" and calls == ["down", "down"]
    calls.clear()
    state = one("bad", return_state=True)
    assert state.is_failed() and calls == ["bad"]
    assert "data checks failed" in state.message


def test_overrides_keep_comments(tmp_path):
    (tmp_path / "params.yaml").write_text(
        "# top comment\ndata:\n  max_per_class: null  # cap\nmodels:\n  a: {arch: fernet, epochs: 10}\n"
        "  b:\n    arch: custom_cnn\n    epochs: 10\n")
    ovr = overrides.build_overrides({"split.seed": 7}, epochs=1, max_per_class=50, root=tmp_path)
    assert ovr == {"data.max_per_class": 50, "models.a.epochs": 1, "models.b.epochs": 1,
                   "split.seed": 7}
    changed = overrides.write_overrides(tmp_path, ovr)
    assert changed["data.max_per_class"] == [None, 50]
    text = (tmp_path / "params.yaml").read_text()
    assert "# top comment" in text and "# cap" in text
    assert overrides.write_overrides(tmp_path, ovr) == {}


def test_a_misspelt_override_fails_before_anything_runs(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    before = (tmp_path / "params.yaml").read_text()
    with pytest.raises(ParamsError, match=r"models\.fernt \(did you mean models\.fernet\?\)"):
        overrides.write_overrides(tmp_path, {"models.fernt.epochs": 1})
    with pytest.raises(ParamsError, match="models.fernet.epochs must be int"):
        overrides.write_overrides(tmp_path, {"models.fernet.epochs": "one"})
    assert (tmp_path / "params.yaml").read_text() == before


@pytest.mark.slow
def test_the_flow_rejects_a_misspelt_override_naming_the_key(tmp_path, prefect_harness):
    from sandbox import make_project

    repo = make_project(tmp_path, n_models=1)
    before = (repo / "params.yaml").read_text()
    state = pipeline.fer_pipeline(project_dir=str(repo), overrides={"models.custom_cn.epochs": 1},
                                  save_experiment=False, return_state=True)
    assert state.is_failed()
    assert "models.custom_cn (did you mean models.custom_cnn?)" in state.message
    assert (repo / "params.yaml").read_text() == before
    assert not (repo / "data" / "interim").exists()   # no stage ran


def test_stage_groups_follow_dvc_yaml():
    groups = project.stage_groups(ROOT)
    flat = [s for g in groups for s in g]
    assert flat[:3] == ["validate", "clean", "split"]
    train = next(g for g in groups if g[0].startswith("train@"))
    assert {s.split("@")[1] for s in train} == set(overrides.model_names(ROOT))


def test_gpu_stages_come_from_the_pipelines_own_metadata(tmp_path):
    assert project.gpu_stages(ROOT) == {"train"}          # dvc.yaml: train's `meta: {gpu: true}`
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  prep: {cmd: echo, meta: {gpu: true}}\n  fit:\n    foreach: [a, b]\n"
        "    do:\n      cmd: echo ${item}\n      meta: {gpu: false}\n  score: {cmd: echo}\n")
    assert project.gpu_stages(tmp_path) == {"prep"}
    assert project.holds_gpu("prep", {"prep"}) and not project.holds_gpu("fit@a", {"prep"})


def test_the_plan_follows_dvc_yaml_models_and_targets():
    names = overrides.model_names(ROOT)
    run = engine.Run(ROOT, ROOT, "rid", {}, gpu=project.gpu_stages(ROOT))
    steps = engine.plan(run)
    assert [s.stages for s in steps][:3] == [["validate"], ["clean"], ["split"]]
    train = next(s for s in steps if s.stages[0].startswith("train@"))
    assert train.parallel and len(train.stages) == len(names)
    assert not any(s.parallel for s in steps if s is not train)
    run.models = [names[0]]
    assert next(s for s in engine.plan(run) if s.parallel).stages == [f"train@{names[0]}"]
    # Targets: what `dvc repro <target>` would consider, in dvc.yaml order.
    run.models, run.targets = None, project.upstream(ROOT, [f"train@{names[0]}"])
    assert [s.stages for s in engine.plan(run)] == [
        ["validate"], ["clean"], ["split"], [f"teach@{names[0]}"], [f"train@{names[0]}"]]
    with pytest.raises(FerError, match="unknown stage 'trian'"):
        project.upstream(ROOT, ["trian"])


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_a_run_copy_holds_the_checkouts_edits_and_absolute_remotes(tmp_path, monkeypatch):
    """workspace.run_copy: HEAD plus uncommitted edits and new files, the checkout's DVC cache,
    local remotes made absolute (read through DVC's API: `dvc remote list` wraps long paths at
    80 columns, which once lost a remote); the experiment saved from it holds the run's new
    files; the checkout is never written."""
    from fer_pipeline.runner import experiment, workspace
    from sandbox import sh

    repo = tmp_path / ("a-folder-name-long-enough-to-wrap-" * 3) / "repo"
    repo.mkdir(parents=True)
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh("git", "config", "user.email", "t@fer", cwd=repo)
    sh("git", "config", "user.name", "t", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    (repo / "dvc.yaml").write_text("stages:\n  s:\n    cmd: cp in.txt out.txt\n"
                                   "    deps: [in.txt]\n    outs: [out.txt]\n")
    (repo / "in.txt").write_text("committed\n")
    sh("dvc", "remote", "add", "team", "../../team-remote", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "a one-stage project with a relative local remote", cwd=repo)
    (repo / "in.txt").write_text("edited, not committed\n")
    (repo / "notes.md").write_text("new, not committed\n")
    monkeypatch.setenv(workspace.WORKSPACE_ENV, str(tmp_path / "ws"))
    before = sh("git", "status", "--porcelain", cwd=repo)

    copy = workspace.run_copy(repo, "run-1")
    assert copy.is_relative_to(tmp_path / "ws")
    assert (copy / "in.txt").read_text() == "edited, not committed\n"
    assert (copy / "notes.md").is_file()
    assert project.remote_urls(copy)["team"] == str((repo / "../../team-remote").resolve())
    assert workspace.run_copy(repo, "run-1") == copy             # a retry takes it over
    sh("dvc", "repro", "-q", cwd=copy)
    (copy / "made-by-the-run.json").write_text("{}")
    assert experiment.save_experiment(copy, "exp-1") == "exp-1"
    ref = next(r for r in sh("git", "for-each-ref", "--format=%(refname)", "refs/exps",
                             cwd=repo).split() if r.endswith("/exp-1"))
    assert sh("git", "show", f"{ref}:made-by-the-run.json", cwd=repo) == "{}"
    assert "out.txt" in sh("git", "show", f"{ref}:dvc.lock", cwd=repo)
    workspace.remove_run_copy(repo, copy)
    assert not copy.exists()
    assert sh("git", "status", "--porcelain", cwd=repo) == before
    assert not (repo / "out.txt").exists() and not (repo / "dvc.lock").exists()
