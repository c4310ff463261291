"""What a flow parameter may not ask of a worker, and the ImageNet weights hash check
(docs/security.md). Fast: the check functions themselves, no server."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fer_pipeline import orchestrate as orch
from fer_pipeline.errors import FerError
from fer_pipeline.sandbox import ROOT

PROFILES = ROOT / "profiles"


def test_project_dir_inside_an_allowed_root_is_accepted(tmp_path):
    (tmp_path / "clone" / "sub").mkdir(parents=True)
    assert orch.check_project_dir(tmp_path / "clone", [tmp_path / "clone"]) == \
        (tmp_path / "clone").resolve()
    assert orch.check_project_dir(tmp_path / "clone/sub", [(tmp_path / "clone").resolve()])


@pytest.mark.parametrize("where", ["/", "/etc", "{tmp}/other", "{tmp}/clone/../other",
                                   "{tmp}/link"])
def test_project_dir_outside_the_allowed_roots_is_refused(tmp_path, where):
    (tmp_path / "clone").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "clone" / "link").symlink_to(tmp_path / "other")   # a symlink out is resolved
    where = where.replace("{tmp}/link", "{tmp}/clone/link").format(tmp=tmp_path)
    with pytest.raises(FerError, match="outside the allowed roots") as err:
        orch.check_project_dir(where, [tmp_path / "clone"])
    assert orch.PROJECT_ROOTS_ENV in str(err.value)


def test_allowed_roots_are_cwd_project_dir_and_the_allow_list(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_PROJECT_DIR", str(tmp_path / "a"))
    monkeypatch.setenv(orch.PROJECT_ROOTS_ENV, f"{tmp_path / 'b'}:{tmp_path / 'c'}")
    roots = orch.allowed_project_roots(cwd=tmp_path / "run")
    assert roots == [(tmp_path / n).resolve() for n in ("run", "a", "b", "c")]


@pytest.mark.parametrize("key", ["data.raw_dir", "train.models_dir", "train.reports_dir",
                                 "train.state_dir", "mlflow.tracking_uri", "evaluate.test_path",
                                 "evaluate.reports_dir", "predict.release_dir", "serve.host",
                                 "serve.port", "train.some_new_dir", "x.cache_path",
                                 "hooks.command", "../params"])
def test_path_and_command_like_overrides_are_refused_by_name(key):
    with pytest.raises(FerError, match="override\\(s\\) refused") as err:
        orch.check_flow_inputs({key: "/etc/passwd", "train.seed": 1}, None, PROFILES)
    assert key in str(err.value) and "train.seed" not in str(err.value)


@pytest.mark.parametrize("value", ["/tmp/evil.h5", "https://example.com/w.h5", "~/w.h5"])
def test_weights_override_only_imagenet_or_null(value):
    with pytest.raises(FerError, match="models.vgg16.weights"):
        orch.check_flow_inputs({"models.vgg16.weights": value}, None, PROFILES)
    orch.check_flow_inputs({"models.vgg16.weights": "imagenet",
                            "models.resnet50.weights": None}, None, PROFILES)


def test_a_nested_value_cannot_hide_a_refused_key():
    with pytest.raises(FerError, match="data.raw_dir"):
        orch.check_flow_inputs({"data": {"raw_dir": "/srv", "max_per_class": 5}}, None, PROFILES)
    with pytest.raises(FerError, match="models.vgg16.weights"):
        orch.check_flow_inputs({"models.vgg16": {"epochs": 1, "weights": "/x.h5"}}, None,
                               PROFILES)


def test_ordinary_overrides_and_profiles_pass():
    orch.check_flow_inputs({"train.seed": 7, "models.custom_cnn.epochs": 1,
                            "data.max_per_class": 10, "evaluate.tta": "none"}, "quick", PROFILES)
    orch.check_flow_inputs(None, None, PROFILES)


@pytest.mark.parametrize("profile", ["../params", "/etc/passwd", "quick.yaml", "profiles/quick",
                                     "nope"])
def test_profile_must_be_a_name_of_profiles_yaml(profile):
    with pytest.raises(FerError, match="profile .* refused") as err:
        orch.check_flow_inputs(None, profile, PROFILES)
    assert "quick" in str(err.value)


def test_overrides_must_be_a_mapping():
    with pytest.raises(FerError, match="mapping"):
        orch.check_flow_inputs(["data.raw_dir=/x"], None, PROFILES)  # type: ignore[arg-type]


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


def test_fer_train_runs_only_train_items_in_a_workspace(tmp_path, monkeypatch):
    monkeypatch.setenv(orch.WORKSPACE_ENV, str(tmp_path / "ws"))
    ok = tmp_path / "ws" / "repo-1234" / "train-vgg16"
    assert orch.check_train_inputs("train@vgg16", ok) == ok.resolve()
    for stage in ("validate", "evaluate", "train@x; rm -rf /", "train@../x"):
        with pytest.raises(FerError, match="only train@<model>"):
            orch.check_train_inputs(stage, ok)
    for ws in (tmp_path / "elsewhere", tmp_path / "ws", tmp_path / "ws/../other", Path("/")):
        with pytest.raises(FerError, match="refuses workspace"):
            orch.check_train_inputs("train@vgg16", ws)


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

    from fer_pipeline.sandbox import tiny_params

    clone = tmp_path / "clone"
    clone.mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for uri, ok in (("sqlite:///mlflow.db", False), ("mlruns", False),
                    (f"sqlite:///{tmp_path / 'team' / 'mlflow.db'}", True),
                    ("http://127.0.0.1:5000", True)):
        (clone / "params.yaml").write_text(yaml.safe_dump(tiny_params(mlflow_uri=uri)))
        if ok:
            orch.check_store_outlives(clone)
        else:
            with pytest.raises(FerError, match="inside this run's clone.*MLFLOW_TRACKING_URI"):
                orch.check_store_outlives(clone)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.team:5000")
    orch.check_store_outlives(clone)   # the worker's environment wins over params.yaml
