"""A real `dvc repro` of the data stages in a temporary git repository."""

import json
import shutil
import subprocess
from pathlib import Path

import yaml

from fer_pipeline.data.arrays import load_split
from fer_pipeline.synthetic import make_raw_tree
from project import ROOT, tiny_params


def sh(*cmd: str, cwd: Path) -> str:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def make_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    make_raw_tree(repo / "data/raw/fer2013", {"train": 8, "test": 3})
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(Path("data/raw/fer2013"))))
    sh("git", "init", "-q", cwd=repo)
    sh("git", "config", "user.email", "t@t", cwd=repo)
    sh("git", "config", "user.name", "t", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "init", cwd=repo)
    return repo


def test_dvc_repro_data_stages_then_nothing_then_only_split(tmp_path):
    repo = make_repo(tmp_path)
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
    repo = make_repo(tmp_path)
    shutil.copytree(repo / "data/raw/fer2013/train/sad", repo / "data/raw/fer2013/train/Sad")
    res = subprocess.run(["dvc", "repro", "split"], cwd=repo, capture_output=True, text=True)
    assert res.returncode != 0
    assert "data checks failed" in res.stderr and "train/Sad/" in res.stderr
    assert not (repo / "data/processed/train.npz").exists()
