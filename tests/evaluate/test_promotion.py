"""The promotion policy against a real MLflow server: who may take @champion, and races."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from fer_pipeline.artifacts.evaluation import ChampionRecord, Decision
from fer_pipeline.cli import main


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


@pytest.mark.slow
def test_not_asked_runs_and_stale_models_never_take_the_alias(eval_params, run_evaluate,
                                                             trained_project):
    root, _ = trained_project
    name = "fer-emotion-policy"
    # A profile-like run (registry.promote false) registers and records, no alias.
    params = eval_params(root, ["small", "big"], name)
    text = params.read_text().replace("promote: true", "promote: false")
    params.write_text(text)
    res = run_evaluate(params)
    assert res.registry.decision is Decision.NOT_ASKED and "registry.promote" in res.registry.reason
    client = _client()
    assert client.get_registered_model(name).aliases == {}
    assert client.get_model_version(name, "1").tags["promotion_decision"] == "not_asked"
    # --promote asks explicitly: no champion yet, so it is promoted.
    assert main(["--params", str(params), "evaluate", "--promote"]) == 0
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    # A model validated on other data is stale: reported, never ranked.
    small = root / "reports" / "train" / "small" / "metrics.json"
    saved = small.read_text()
    small.write_text(json.dumps({**json.loads(saved), "data_md5_val": "0" * 32}))
    try:
        res = run_evaluate(params, promote=True)
        assert res.models["small"].metrics.stale is True and res.champion == "big"
        assert "small" in json.loads((root / "reports/evaluate/champion.json").read_text())["stale"]
    finally:
        small.write_text(saved)


def test_a_champion_validated_on_other_data_is_rescored_first(eval_params, run_evaluate,
                                                              trained_project):
    root, _ = trained_project
    name = "fer-emotion-rescore"
    params = eval_params(root, ["small"], name)
    assert run_evaluate(params).registry.decision is Decision.PROMOTED
    client = _client()
    client.set_model_version_tag(name, "1", "val_data_md5", "validated-elsewhere")
    big = eval_params(root, ["big"], name)
    res = run_evaluate(big)
    before = res.registry.champion_before
    assert before.val_data_md5 == "validated-elsewhere"
    assert 0.0 <= before.rescored_val_accuracy <= 1.0
    assert f"{before.rescored_val_accuracy:.4f}" in res.registry.reason
    # champion.json records the rescoring the decision rests on.
    record = ChampionRecord.read(root / "reports/evaluate/champion.json")
    assert record.registry.champion_before.rescored_val_accuracy == before.rescored_val_accuracy


@pytest.mark.slow
def test_two_evaluates_at_once_register_once_and_agree(eval_params, trained_project,
                                                       eval_mlflow_server):
    root, _ = trained_project
    name = "fer-emotion-race"
    params = eval_params(root, ["small", "big"], name)
    env = dict(os.environ, MLFLOW_TRACKING_URI=eval_mlflow_server)
    procs = [subprocess.Popen(["fer", "--params", str(params), "evaluate"], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    client = _client()
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) == 1                                   # one version per model source
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "1" and champion.tags["model_name"] == "small"
    aliases = client.get_registered_model(name).aliases
    assert aliases.get("previous") != "1"                       # never previous == champion
    history = client.get_registered_model(name).tags["champion_history"].split(",")
    assert [h.split(":")[0] for h in history] == ["v1"]        # one promotion, nothing lost
    # The later process found the model already @champion (it saw the first one's work).
    assert client.get_model_version(name, "1").tags["promotion_decision"] in (
        "promoted", "already_champion")
