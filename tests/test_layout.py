"""Who may import whom (docs/development.md): checked on the source, so a wrong-way import
fails here instead of surfacing as a cycle or a stage that reruns for another stage's edit."""

from __future__ import annotations

import ast
from pathlib import Path

from sandbox import ROOT

PKG = ROOT / "src" / "fer_pipeline"
# Base modules: errors, params, shared helpers. They import nothing but each other.
BASE = {"errors", "params", "io", "arrays", "tracking", "keras_mlflow", "plots", "champion",
        "synthetic", "profiles", "tta", "release", "calibration",
        "corruptions", "backend", "soft_labels", "artifacts", "templates"}
STAGES = {"data", "teach", "train", "evaluate", "predict", "export"}   # each: base + its own only
RUNNER = {"runner"}                      # base + each other (they shell out to `dvc`, git)
APPS = {"serve": {"predict"}, "web": set(),        # predict over HTTP: base + predict
        "worker": set()}                             # fer worker: base only


def _unit(path: Path) -> str:
    """fer_pipeline/train/stage.py -> train; fer_pipeline/params.py -> params."""
    return path.relative_to(PKG).with_suffix("").parts[0]


def _project_imports(path: Path) -> set[str]:
    units = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "fer_pipeline" and len(parts) > 1:
                units.add(parts[1])
    return units


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if p.name != "__init__.py")


def test_every_module_has_a_place_in_the_layout():
    known = BASE | STAGES | RUNNER | set(APPS) | {"cli"}
    assert {_unit(p) for p in _modules()} <= known


def test_imports_point_one_way():
    wrong = []
    for path in _modules():
        unit = _unit(path)
        allowed = (BASE if unit in BASE else BASE | RUNNER if unit in RUNNER
                   else BASE | {unit} if unit in STAGES
                   else BASE | APPS[unit] if unit in APPS
                   else BASE | STAGES | RUNNER | set(APPS))  # cli: everything
        for target in sorted(_project_imports(path) - allowed - {unit}):
            wrong.append(f"{path.relative_to(ROOT)} imports fer_pipeline.{target}")
    assert not wrong, "imports against the layout:\n  " + "\n  ".join(wrong)


def test_only_the_cli_knows_argparse():
    users = [str(p.relative_to(ROOT)) for p in _modules()
             if _unit(p) != "cli" and "argparse" in _stdlib_imports(p)]
    assert not users


def test_no_sys_path_edits_in_package_flows_or_tests():
    offenders = [str(p.relative_to(ROOT)) for d in ("src", "flows", "tests")
                 for p in (ROOT / d).rglob("*.py")
                 if "sys.path.insert" in p.read_text() and p.name != "test_layout.py"]
    assert not offenders


def _stdlib_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module.split(".")[0])
    return out
