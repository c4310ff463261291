"""dvc.yaml's deps are true: each stage lists exactly the source files and params its code reads.

Every stage of a sandbox copy of the project runs its dvc.yaml command in a fresh interpreter
that records (a) every project source file it loaded and (b) every params field it read (the
params classes are instrumented in that interpreter only). A file or param read but not
listed would leave outputs marked up to date after an edit; one listed but never read reruns a
stage for nothing. Both fail here, naming the stage and the file or key.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fer_pipeline import params as P
from sandbox import make_project

# Read by the code but deliberately not deps: they change where results are sent or how much
# is logged, never an output (dvc.yaml's header says so).
NOT_DEPS = ("mlflow", "train.verbose")

SECTION_OF = {"DataParams": "data", "ValidateParams": "validate", "CleanParams": "clean",
              "SplitParams": "split", "TrainParams": "train", "MlflowParams": "mlflow",
              "EvaluateParams": "evaluate", "RegistryParams": "registry"}
# A model's recipe: the shared class and one per arch (a new arch needs no edit here).
MODEL_CLASSES = {"ModelParams": "", **{cls.__name__: "" for cls in P.ARCH_CLASSES.values()},
                 "AugmentParams": "augmentation.", "ReduceLRParams": "reduce_lr.",
                 "DistillParams": "distill."}

RECORDER = r'''
import atexit, json, os, sys
from fer_pipeline import params as P

read = set()
on = [False]   # reads while params.yaml is loaded (its own checks) are not the stage's reads

def _record(cls):
    names = set(cls.model_fields)
    def getattribute(self, name, _names=names, _cls=cls.__name__):
        if on[0] and name in _names:
            read.add(f"{_cls}.{name}")
        return object.__getattribute__(self, name)
    cls.__getattribute__ = getattribute

for _name in %(classes)r:
    _record(getattr(P, _name))

_load = P.load
def _recording_load(*args, **kwargs):
    on[0] = False
    result = _load(*args, **kwargs)
    on[0] = True
    return result
P.load = _recording_load

def _dump():
    pkg = os.path.dirname(os.path.abspath(sys.modules["fer_pipeline"].__file__))
    files = set()
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and os.path.abspath(f).startswith(pkg + os.sep):
            files.add(os.path.relpath(os.path.abspath(f), os.path.dirname(os.path.dirname(pkg))))
    with open(os.environ["FER_DEPS_RECORD"], "w") as fh:
        json.dump({"files": sorted(files), "params": sorted(read)}, fh)

atexit.register(_dump)
from fer_pipeline.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _stages(repo: Path) -> list[tuple[str, str, list[str], list[str]]]:
    """(name, cmd, source deps as .py files, params deps) in dvc.yaml order, via DVC's parser."""
    from dvc.repo import Repo

    out = []
    cwd = os.getcwd()
    os.chdir(repo)   # DVC resolves a stage's wdir against the working directory
    try:
        stages = _collect(Repo, repo, out)
    finally:
        os.chdir(cwd)
    return stages


def _collect(Repo, repo: Path, out: list) -> list:
    with Repo(str(repo)) as r:
        for st in r.index.stages:
            files, params = [], []
            for d in st.deps:
                if type(d).__name__ == "ParamsDependency":
                    params += list(d.params)
                    continue
                path = repo / str(d.def_path)
                if str(d.def_path).startswith("src/"):
                    files += ([str(p.relative_to(repo)) for p in sorted(path.rglob("*.py"))]
                              if path.is_dir() else [str(d.def_path)])
            out.append((st.name, st.cmd, files, params))
    return out


def _leaf(cls: str, field: str, stage: str) -> str:
    if cls in MODEL_CLASSES:
        model = stage.split("@", 1)[1] if "@" in stage else None
        return f"models.{model}.{MODEL_CLASSES[cls]}{field}" if model else "models"
    return f"{SECTION_OF[cls]}.{field}"


def _covered(key: str, declared: list[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


@pytest.mark.slow
def test_every_stage_reads_exactly_its_dvc_deps(tmp_path):
    repo = make_project(tmp_path, n_models=1, per_class={"train": 6, "test": 2})
    recorder = tmp_path / "record_fer.py"
    recorder.write_text(RECORDER % {"classes": [*SECTION_OF, *MODEL_CLASSES]})
    problems = []
    for stage, cmd, files, params in _stages(repo):
        argv = shlex.split(cmd)
        assert argv[0] == "fer", f"{stage}: cmd {cmd!r} does not run the `fer` command"
        record = tmp_path / f"{stage}.json"
        env = dict(os.environ, FER_DEPS_RECORD=str(record))
        env.pop("MLFLOW_TRACKING_URI", None)
        res = subprocess.run([sys.executable, str(recorder), *argv[1:]], cwd=repo, env=env,
                             capture_output=True, text=True)
        assert res.returncode == 0, f"{stage} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        seen = json.loads(record.read_text())
        loaded = set(seen["files"])
        for f in sorted(loaded - set(files)):
            problems.append(f"{stage}: loads {f}, not in its dvc.yaml deps")
        for f in sorted(set(files) - loaded):
            problems.append(f"{stage}: lists {f} in deps but never loads it")
        read = {_leaf(*item.split("."), stage) for item in seen["params"]}
        for key in sorted(read):
            if not _covered(key, params) and not _covered(key, list(NOT_DEPS)):
                problems.append(f"{stage}: reads param {key}, not in its dvc.yaml params")
        for d in params:
            if not any(_covered(k, [d]) or _covered(d, [k]) for k in read):
                problems.append(f"{stage}: lists param {d} but never reads it")
    assert not problems, "dvc.yaml deps are not true:\n  " + "\n  ".join(problems)
