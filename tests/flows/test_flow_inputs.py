"""What a flow parameter may not ask of a worker, and the ImageNet weights hash check
(docs/security.md). Fast: the check functions themselves, no server."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fer_pipeline.errors import FerError
from fer_pipeline.runner import policy
from fer_pipeline.runner.stage import check_store_outlives
from sandbox import ROOT

PROFILES = ROOT / "profiles"


def test_project_dir_inside_an_allowed_root_is_accepted(tmp_path):
    (tmp_path / "clone" / "sub").mkdir(parents=True)
    assert policy.check_project_dir(tmp_path / "clone", [tmp_path / "clone"]) == \
        (tmp_path / "clone").resolve()
    assert policy.check_project_dir(tmp_path / "clone/sub", [(tmp_path / "clone").resolve()])


@pytest.mark.parametrize("where", ["/", "/etc", "{tmp}/other", "{tmp}/clone/../other",
                                   "{tmp}/link"])
def test_project_dir_outside_the_allowed_roots_is_refused(tmp_path, where):
    (tmp_path / "clone").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "clone" / "link").symlink_to(tmp_path / "other")   # a symlink out is resolved
    where = where.replace("{tmp}/link", "{tmp}/clone/link").format(tmp=tmp_path)
    with pytest.raises(FerError, match="outside the allowed roots") as err:
        policy.check_project_dir(where, [tmp_path / "clone"])
    assert policy.PROJECT_ROOTS_ENV in str(err.value)


def test_allowed_roots_are_cwd_project_dir_and_the_allow_list(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_PROJECT_DIR", str(tmp_path / "a"))
    monkeypatch.setenv(policy.PROJECT_ROOTS_ENV, f"{tmp_path / 'b'}:{tmp_path / 'c'}")
    roots = policy.allowed_project_roots(cwd=tmp_path / "run")
    assert roots == [(tmp_path / n).resolve() for n in ("run", "a", "b", "c")]


@pytest.mark.parametrize("key", ["data.raw_dir", "train.models_dir", "train.reports_dir",
                                 "train.state_dir", "mlflow.tracking_uri", "evaluate.test_path",
                                 "evaluate.reports_dir", "predict.release_dir", "serve.host",
                                 "serve.port", "train.some_new_dir", "x.cache_path",
                                 "hooks.command", "../params"])
def test_path_and_command_like_overrides_are_refused_by_name(key):
    with pytest.raises(FerError, match="override\\(s\\) refused") as err:
        policy.check_flow_inputs({key: "/etc/passwd", "train.seed": 1}, None, PROFILES)
    assert key in str(err.value) and "train.seed" not in str(err.value)


@pytest.mark.parametrize("value", ["/tmp/evil.h5", "https://example.com/w.h5", "~/w.h5"])
def test_weights_override_only_imagenet_or_null(value):
    with pytest.raises(FerError, match="models.vgg16.weights"):
        policy.check_flow_inputs({"models.vgg16.weights": value}, None, PROFILES)
    policy.check_flow_inputs({"models.vgg16.weights": "imagenet",
                            "models.resnet50.weights": None}, None, PROFILES)


def test_a_nested_value_cannot_hide_a_refused_key():
    with pytest.raises(FerError, match="data.raw_dir"):
        policy.check_flow_inputs({"data": {"raw_dir": "/srv", "max_per_class": 5}}, None, PROFILES)
    with pytest.raises(FerError, match="models.vgg16.weights"):
        policy.check_flow_inputs({"models.vgg16": {"epochs": 1, "weights": "/x.h5"}}, None,
                               PROFILES)


def test_ordinary_overrides_and_profiles_pass():
    policy.check_flow_inputs({"train.seed": 7, "models.custom_cnn.epochs": 1,
                            "data.max_per_class": 10, "evaluate.tta": "none"}, "quick", PROFILES)
    policy.check_flow_inputs(None, None, PROFILES)


@pytest.mark.parametrize("profile", ["../params", "/etc/passwd", "quick.yaml", "profiles/quick",
                                     "nope"])
def test_profile_must_be_a_name_of_profiles_yaml(profile):
    with pytest.raises(FerError, match="profile .* refused") as err:
        policy.check_flow_inputs(None, profile, PROFILES)
    assert "quick" in str(err.value)


def test_overrides_must_be_a_mapping():
    with pytest.raises(FerError, match="mapping"):
        policy.check_flow_inputs(["data.raw_dir=/x"], None, PROFILES)  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ["vgg16", "resnet50"])
def test_cached_imagenet_file_with_the_wrong_hash_is_refused(arch, tmp_path, monkeypatch):
    from fer_pipeline.train.models import IMAGENET_FILES, WeightsUnavailable, resolve_weights

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    fname, _, md5 = IMAGENET_FILES[arch]
    cached = tmp_path / "keras" / "models" / fname
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the weights")
    with pytest.raises(WeightsUnavailable) as err:
        resolve_weights(arch, "imagenet")
    msg = str(err.value)
    assert str(cached) in msg and md5 in msg
    assert hashlib.md5(b"not the weights").hexdigest() in msg and "Delete it" in msg


def test_published_hashes_match_the_installed_keras():
    """The hashes are keras's own (keras/src/applications): a Keras upgrade that changes them
    shows up here."""
    import keras.src.applications.resnet as resnet
    import keras.src.applications.vgg16 as vgg16

    from fer_pipeline.train.models import IMAGENET_FILES

    assert IMAGENET_FILES["resnet50"][2] == resnet.WEIGHTS_HASHES["resnet50"][1]
    assert IMAGENET_FILES["vgg16"][2] in Path(vgg16.__file__).read_text()
    assert IMAGENET_FILES["vgg16"][0] == vgg16.WEIGHTS_PATH_NO_TOP.rsplit("/", 1)[1]


GOOD_JOB = {"repository": "git://git.team/fer.git", "commit": "a" * 40, "stage": "train@vgg16",
            "run_id": "0b7c6f2e-1d2a-4c3b-9e8f-1234567890ab",
            "overrides": {"models.vgg16.epochs": 1},
            "locks": {"split": {"cmd": "fer split", "outs": [{"path": "data/processed/train.npz",
                                                              "md5": "0" * 32}]}}}


def test_a_stage_job_is_data_and_every_field_is_checked(monkeypatch):
    """fer-train's one parameter: a job a worker clones and runs; nothing in it is a path."""
    from fer_pipeline.runner.job import StageJob

    monkeypatch.setenv("FER_GIT_REPOSITORY", "git://git.team/fer.git")
    monkeypatch.delenv("FER_ALLOWED_REPOSITORIES", raising=False)
    job = StageJob.from_params(GOOD_JOB)
    assert job.attempt == 1 and StageJob.from_params(job.to_params()) == job
    bad = {
        "stage": [("validate", "only items of a gpu stage"),
                  ("train@x; rm -rf /", "only items of a gpu stage"),
                  ("train@../x", "only items of a gpu stage")],
        "commit": [("main", "40-hex"), ("a" * 39, "40-hex")],
        "repository": [("/srv/git/fer.git", "is a path, not a URL"),
                       ("file:///srv/git/fer.git", "is a path"),
                       ("https://u:tok@git.team/fer.git", "credentials"),
                       ("git://elsewhere/evil.git", "not one this worker clones")],
        "overrides": [({"data.raw_dir": "/etc"}, "refused")],
        "locks": [({"split": {"outs": [{"path": "/etc/passwd"}]}}, "not a project path"),
                  ({"split": {"outs": [{"path": "../x"}]}}, "not a project path")],
        "run_id": [("../../x", "not a run id")],
    }
    for field, cases in bad.items():
        for value, why in cases:
            with pytest.raises(FerError, match=why):
                StageJob.from_params({**GOOD_JOB, field: value})
    with pytest.raises(FerError, match="unknown field.*workspace"):
        StageJob.from_params({**GOOD_JOB, "workspace": "/tmp/ws"})
    monkeypatch.setenv("FER_ALLOWED_REPOSITORIES", "git://elsewhere/evil.git")
    StageJob.from_params({**GOOD_JOB, "repository": "git://elsewhere/evil.git"})


def test_a_worker_refuses_a_commit_its_packages_do_not_fit(tmp_path):
    from fer_pipeline.runner.worker import environment_problems

    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = ["pyyaml>=6", "numpy<1.0", '
        '"surely-not-installed-pkg>=1", "pywin32>=300; sys_platform == \'win32\'"]\n')
    problems = environment_problems(tmp_path / "pyproject.toml")
    assert len(problems) == 2, problems
    assert problems[0].startswith("numpy<1.0 (installed: ")
    assert problems[1] == "surely-not-installed-pkg>=1 (not installed)"
    assert environment_problems(ROOT / "pyproject.toml") == []   # this venv fits this checkout


def test_dispatch_to_workers_needs_pushed_committed_code_and_a_url(tmp_path, monkeypatch):
    from fer_pipeline.runner.dispatch import dispatch_origin
    from sandbox import sh

    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "a.py").write_text("x = 1\n")
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A", cwd=repo)
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "a", cwd=repo)
    with pytest.raises(FerError, match="no `origin` remote"):
        dispatch_origin(repo)
    sh("git", "remote", "add", "origin", str(tmp_path / "bare.git"), cwd=repo)
    with pytest.raises(FerError, match="is a path, not a URL"):
        dispatch_origin(repo)
    sh("git", "remote", "set-url", "origin", "git://127.0.0.1:9/fer.git", cwd=repo)
    monkeypatch.setenv("FER_GIT_REPOSITORY", "git://127.0.0.1:9/fer.git")
    (repo / "src" / "a.py").write_text("x = 2\n")
    with pytest.raises(FerError, match="src/a.py has uncommitted changes"):
        dispatch_origin(repo)
    sh("git", "checkout", "-q", "--", "src/a.py", cwd=repo)
    with pytest.raises(FerError, match="is not on origin"):
        dispatch_origin(repo)


@pytest.mark.parametrize("url", ["https://user:token@example.com/fer.git",
                                 "http://token@example.com/fer.git"])
def test_deploy_refuses_a_repository_url_with_credentials(url):
    from flows import deploy

    with pytest.raises(SystemExit, match="Secret block"):
        deploy.main(["--repository", url])


def test_a_deployment_run_refuses_an_mlflow_store_inside_its_clone(tmp_path, monkeypatch):
    """The worker deletes the clone after the run: a store in it would lose the runs and the
    registry. The team's server, or a store outside the clone, passes."""
    import yaml

    from sandbox import tiny_params

    clone = tmp_path / "clone"
    clone.mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for uri, ok in (("sqlite:///mlflow.db", False), ("mlruns", False),
                    (f"sqlite:///{tmp_path / 'team' / 'mlflow.db'}", True),
                    ("http://127.0.0.1:5000", True)):
        (clone / "params.yaml").write_text(yaml.safe_dump(tiny_params(mlflow_uri=uri)))
        if ok:
            check_store_outlives(clone)
        else:
            with pytest.raises(FerError, match="inside this run's clone.*MLFLOW_TRACKING_URI"):
                check_store_outlives(clone)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.team:5000")
    check_store_outlives(clone)   # the worker's environment wins over params.yaml
