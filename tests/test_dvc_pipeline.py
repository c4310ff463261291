"""A real `dvc repro` of the data stages in a temporary git repository."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import yaml

from fer_pipeline.arrays import load_split
from sandbox import make_project, sh

pytestmark = pytest.mark.slow   # `dvc repro` of the pipeline


def test_dvc_repro_data_stages_then_nothing_then_only_split(tmp_path):
    repo = make_project(tmp_path)   # the sandbox the Prefect tests and demos use
    out = sh("dvc", "repro", "split", cwd=repo)
    for stage in ("validate", "clean", "split"):
        assert f"Running stage '{stage}'" in out
    assert len(load_split(repo / "data/processed/val.npz")) > 0
    counts = json.loads((repo / "reports/split/counts.json").read_text())
    assert counts["test"]["total"] == 21
    metrics = sh("dvc", "metrics", "show", "--json", cwd=repo)
    assert "reports/clean/summary.json" in metrics

    again = sh("dvc", "repro", "split", cwd=repo)
    assert "Running stage" not in again

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["split"]["seed"] = 7
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    changed = sh("dvc", "repro", "split", cwd=repo)
    assert "Running stage 'split'" in changed
    assert "Running stage 'validate'" not in changed and "Running stage 'clean'" not in changed


def test_dvc_repro_stops_on_hard_data_failure(tmp_path):
    repo = make_project(tmp_path)   # the sandbox the Prefect tests and demos use
    shutil.copytree(repo / "data/raw/fer2013/train/sad", repo / "data/raw/fer2013/train/Sad")
    res = subprocess.run(["dvc", "repro", "split"], cwd=repo, capture_output=True, text=True)
    assert res.returncode != 0
    assert "data checks failed" in res.stderr and "train/Sad/" in res.stderr
    assert not (repo / "data/processed/train.npz").exists()


def test_a_new_teacher_retrains_only_the_model_that_distills(tmp_path):
    """teach@<model> per model: a teacher added to teachers/ and named in one model's
    `distill` reruns every teach@ (seconds), but only that model's probabilities change, so
    only that model retrains; its teacher file holds the teacher's rows, the other's none.
    A teacher file replaced under the same name retrains the student alone too."""
    repo = make_project(tmp_path)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    first, second = list(params["models"])
    targets = [f"train@{first}", f"train@{second}"]
    out = sh("dvc", "repro", *targets, cwd=repo)
    assert f"Running stage 'teach@{first}'" in out and f"Running stage 'train@{second}'" in out

    shutil.copy(repo / "models" / first / "model.keras", repo / "teachers" / "first.keras")
    params["models"][second]["distill"] = {"weight": 0.5, "teachers": ["teachers/first.keras"],
                                           "tta": "flip", "temperature": 2.0}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    again = sh("dvc", "repro", *targets, cwd=repo)
    assert f"Running stage 'teach@{first}'" in again and f"Running stage 'teach@{second}'" in again
    assert f"Running stage 'train@{second}'" in again
    assert f"Running stage 'train@{first}'" not in again
    with np.load(repo / "data" / "teacher" / f"{second}.npz") as z:
        assert list(z["teachers"]) == ["teachers/first.keras"]
        assert z["probs"].shape == (len(load_split(repo / "data/processed/train.npz")), 7)
    with np.load(repo / "data" / "teacher" / f"{first}.npz") as z:
        assert z["probs"].shape[0] == 0 and not len(z["teachers"])

    # Same params, another teacher file: the student's probabilities change, so it retrains.
    shutil.copy(repo / "models" / second / "model.keras", repo / "teachers" / "first.keras")
    third = sh("dvc", "repro", *targets, cwd=repo)
    assert f"Running stage 'train@{second}'" in third
    assert f"Running stage 'train@{first}'" not in third
