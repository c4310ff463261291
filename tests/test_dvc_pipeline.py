"""A real `dvc repro` of the data stages in a temporary git repository."""

import json
import shutil
import subprocess

import yaml

from fer_pipeline.arrays import load_split
from fer_pipeline.sandbox import make_project, sh


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
