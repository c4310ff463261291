"""Fast checks of the orchestration helpers: failure classes, retries, overrides."""

from __future__ import annotations

import sys

import pytest
from prefect import flow

from project import ROOT

sys.path.insert(0, str(ROOT))

from fer_pipeline import orchestrate as orch  # noqa: E402
from flows import pipeline  # noqa: E402


def test_classify_transient_vs_real():
    down = ["fer train: error: MLflow tracking server http://x:5000 (from MLFLOW_TRACKING_URI) is "
            "unreachable: [Errno 111] Connection refused. Start it, ..."]
    assert isinstance(orch.classify("train@a", 1, down), orch.TransientStageError)
    real = ["noise", "fer validate: error: data checks failed (pipeline stopped):",
            "  - unknown class folder train/Sad/", "ERROR: failed to reproduce 'validate'"]
    exc = orch.classify("validate", 1, real)
    assert type(exc) is orch.StageFailed
    assert "train/Sad/" in str(exc) and "noise" not in str(exc)


def test_only_transient_failures_are_retried(monkeypatch, prefect_harness):
    calls = []

    def flaky(stage, cwd, env=None, log=print, force=False):
        calls.append(stage)
        if stage == "down" and len(calls) == 1:
            raise orch.TransientStageError(stage, 1, ["Connection refused"])
        if stage == "bad":
            raise orch.StageFailed(stage, 1, ["fer validate: error: data checks failed"])
        return orch.StageResult(stage, "ran", 0.0)

    monkeypatch.setattr(orch, "run_stage", flaky)
    task = pipeline.dvc_stage.with_options(retries=2, retry_delay_seconds=0)

    @flow
    def one(stage: str):
        return task(stage, ".", "rid")

    assert one("down")["status"] == "ran" and calls == ["down", "down"]
    calls.clear()
    state = one("bad", return_state=True)
    assert state.is_failed() and calls == ["bad"]
    assert "data checks failed" in state.message


def test_overrides_keep_comments(tmp_path):
    (tmp_path / "params.yaml").write_text(
        "# top comment\ndata:\n  max_per_class: null  # cap\nmodels:\n  a: {epochs: 10}\n"
        "  b:\n    epochs: 10\n")
    ovr = orch.build_overrides({"split.seed": 7}, epochs=1, max_per_class=50, root=tmp_path)
    assert ovr == {"data.max_per_class": 50, "models.a.epochs": 1, "models.b.epochs": 1,
                   "split.seed": 7}
    changed = orch.apply_overrides(tmp_path, ovr)
    assert changed["data.max_per_class"] == [None, 50]
    text = (tmp_path / "params.yaml").read_text()
    assert "# top comment" in text and "# cap" in text
    assert orch.apply_overrides(tmp_path, ovr) == {}


def test_stage_groups_follow_dvc_yaml():
    groups = orch.stage_groups(ROOT)
    flat = [s for g in groups for s in g]
    assert flat[:3] == ["validate", "clean", "split"]
    train = next(g for g in groups if g[0].startswith("train@"))
    assert {s.split("@")[1] for s in train} == set(orch.model_names(ROOT))


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
