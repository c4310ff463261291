"""The evaluate stage against a real MLflow server: reports, run logging, registry lifecycle."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from fer_pipeline.artifacts.evaluation import Decision
from fer_pipeline.cli import main
from fer_pipeline.errors import FerError


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


@pytest.mark.slow
def test_evaluate_reports_mlflow_and_registry_lifecycle(eval_params, run_evaluate, trained_project, capsys):
    root, infos = trained_project
    params = eval_params(root, ["small", "big"], "fer-emotion-life")

    # 1. First run (through the CLI): reports, MLflow logging, champion registered.
    assert main(["--params", str(params), "evaluate"]) == 0
    assert "Champion: `small`" in capsys.readouterr().out
    out = root / "reports" / "evaluate"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"small", "big"}
    m = metrics["small"]
    for key in ("test_accuracy", "test_macro_f1", "test_weighted_f1", "test_top2_accuracy",
                "test_accuracy_public", "test_accuracy_private", "test_accuracy_clean",
                "val_accuracy", "images_per_second", "trainable_params", "epochs_run",
                "temperature", "test_ece", "test_ece_calibrated", "test_nll",
                "test_nll_calibrated"):
        assert isinstance(m[key], int | float), key
    # Temperature fitted on val: it can only lower the NLL it was fitted for on val, and these
    # tiny models' softmax is far from calibrated, so it moves off 1.
    assert m["temperature"] != pytest.approx(1.0, abs=1e-3) and 0 <= m["test_ece"] <= 1
    # Corruption suite on every test image (70 < max_images), nine corruptions x 3 severities.
    assert m["robust_n"] == 70 and m["robust_worst_corruption"] in (
        "dark", "bright", "contrast", "blur", "noise", "jpeg", "rotation", "shift", "occlusion")
    assert m["robust_worst_drop"] == pytest.approx(
        m["robust_clean_accuracy"] - m[f"robust_{m['robust_worst_corruption']}"])
    assert m["test_n"] == 70 and m["test_n_clean"] == 63 and m["champion"] is True
    assert metrics["big"]["champion"] is False
    assert set(m["per_class"]["happy"]) == {"precision", "recall", "f1", "support"}
    for name in ("small", "big"):
        for kind in ("confusion", "confusion_normalized", "curves", "reliability", "robustness"):
            assert (out / "images" / f"{name}_{kind}.png").stat().st_size > 1000
        with (out / "coverage" / f"{name}.csv").open() as fh:
            cov = list(csv.DictReader(fh))
        assert cov[0]["threshold"] == "0.0" and float(cov[0]["coverage"]) == 1.0
        with (out / "robustness" / f"{name}.csv").open() as fh:
            assert len(list(csv.DictReader(fh))) == 27
        with (out / "confusion" / f"{name}.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 70 and set(rows[0]) == {"actual", "predicted"}
        assert (out / "per_class" / f"{name}.csv").read_text().startswith("class,precision")
    with (out / "comparison.csv").open() as fh:
        comp = {r["model"]: r for r in csv.DictReader(fh)}
    assert comp["small"]["pretrained"] == "False" and comp["small"]["champion"] == "True"
    # The trade-offs of each recipe stand beside its accuracy (words: not a DVC metric).
    assert comp["small"]["recipe"].startswith("width ") and "recipe" not in m
    md = (out / "comparison.md").read_text()
    assert "| **small** |" in md and "pretrained" in md and "img/s" in md
    assert "worst drop" in md and "ECE scaled" in md

    client = _client()
    run = client.get_run(infos["small"]["run_id"])
    assert "test_accuracy" in run.data.metrics and "test_f1_happy" in run.data.metrics
    assert "test_accuracy_clean" in run.data.metrics
    assert run.data.metrics["temperature"] == pytest.approx(m["temperature"])
    assert "test_ece_calibrated" in run.data.metrics and "robust_worst_drop" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/confusion.png", "evaluation/confusion_normalized.png",
            "evaluation/per_class.json", "evaluation/reliability.png"} <= arts

    name = "fer-emotion-life"
    champ = client.get_model_version_by_alias(name, "champion")
    assert champ.version == "1" and champ.run_id == infos["small"]["run_id"]
    assert champ.tags["classes"].split(",")[3] == "happy"
    assert float(champ.tags["temperature"]) == pytest.approx(m["temperature"], rel=1e-5)

    # 2. Nothing changed: nothing registered, no alias moved.
    res = run_evaluate(params)
    assert res.registry.new_version is False and res.registry.alias_moved is False
    assert res.registry.decision is Decision.ALREADY_CHAMPION
    assert len(client.search_model_versions(f"name='{name}'")) == 1

    # 3. `big` now validates better: new version v2 @champion, v1 @previous, history tagged.
    big_metrics = root / "reports" / "train" / "big" / "metrics.json"
    saved = big_metrics.read_text()
    big_metrics.write_text(saved.replace('"val_accuracy": 0.3', '"val_accuracy": 0.5'))
    try:
        res = run_evaluate(params)
        assert res.champion == "big" and res.registry.new_version is True
        assert res.registry.decision is Decision.PROMOTED
        assert client.get_model_version_by_alias(name, "champion").version == "2"
        assert client.get_model_version_by_alias(name, "previous").version == "1"
    finally:
        big_metrics.write_text(saved)
    # 4. `small` is this run's best but does not beat the champion's 0.5: the alias stays,
    # the decision is recorded on the version and in champion.json.
    res = run_evaluate(params)
    assert res.champion == "small" and res.registry.new_version is False
    assert res.registry.decision is Decision.KEPT and "0.5000" in res.registry.reason
    assert client.get_model_version_by_alias(name, "champion").version == "2"
    assert client.get_model_version(name, "1").tags["promotion_decision"] == "kept"
    decision = json.loads((out / "champion.json").read_text())
    assert decision["decision"] == "kept" and decision["registry"]["champion_before"]["version"] == "2"
    # 5. Rollback by hand, with a reason: v1 @champion again, v2 @previous.
    assert main(["--params", str(params), "promote", "--to", "previous",
                 "--reason", "v2's val figure was a test edit"]) == 0
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert client.get_model_version_by_alias(name, "previous").version == "2"
    assert client.get_model_version(name, "1").tags["promotion_decision"] == "manual"
    assert len(client.search_model_versions(f"name='{name}'")) == 2
    history = client.get_registered_model(name).tags["champion_history"].split(",")
    assert [h.split(":")[0:2] for h in history] == [["v1", "small"], ["v2", "big"],
                                                     ["v1", "small(manual)"]]


def test_registered_champion_pyfunc_predict(eval_params, run_evaluate, trained_project):
    """The registered model loads by alias as a pyfunc and predicts the serving payload."""
    import mlflow

    root, _ = trained_project
    params = eval_params(root, ["small", "big"], "fer-emotion-pyfunc")
    run_evaluate(params)
    model = mlflow.pyfunc.load_model("models:/fer-emotion-pyfunc@champion")
    # Same payload shape as the documented `mlflow models serve` request ({"inputs": ...}).
    payload = json.loads(json.dumps({"inputs": np.full((2, 48, 48, 1), 128.0).tolist()}))
    probs = np.asarray(model.predict(np.asarray(payload["inputs"], dtype=np.float32)))
    assert probs.shape == (2, 7)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_tta_flip_and_no_register(eval_params, run_evaluate, trained_project):
    root, _ = trained_project
    params = eval_params(root, ["small"], "fer-emotion-unused", tta="flip")
    res = run_evaluate(params, register=False)
    assert res.registry is None and res.champion == "small"
    assert "Test-time augmentation: `flip`" in (root / "reports" / "evaluate" / "comparison.md").read_text()
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        _client().get_registered_model("fer-emotion-unused")


def test_missing_model_names_the_stage(eval_params, run_evaluate, trained_project):
    root, _ = trained_project
    params = eval_params(root, ["small", "ghost"], "fer-emotion-unused")
    with pytest.raises(FerError, match=r"dvc repro train@ghost"):
        run_evaluate(params, names=["ghost"], register=False, log_mlflow=False)
    # Default (all models): the untrained one is skipped with a warning, the rest evaluated.
    res = run_evaluate(params, register=False, log_mlflow=False)
    assert res.skipped == ["ghost"] and list(res.models) == ["small"]


def test_cli_user_error_is_one_line_but_a_bug_shows_its_traceback(eval_params, trained_project,
                                                                  monkeypatch, capsys):
    root, _ = trained_project
    params = eval_params(root, ["small", "ghost"], "fer-emotion-unused")
    # A user error (a model that is not trained): exit 1, one line naming the fix.
    assert main(["--params", str(params), "evaluate", "--model", "ghost", "--no-register"]) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("fer evaluate:")]
    assert "Traceback" not in err and len(lines) == 1
    assert lines[0].startswith("fer evaluate: error: ") and "dvc repro train@ghost" in lines[0]
    # A bug inside the stage (any non-FerError) is not turned into a message: it propagates.
    from fer_pipeline.evaluate import metrics

    def broken(*args, **kwargs):
        raise RuntimeError("bug in compute_metrics")

    monkeypatch.setattr(metrics, "compute_metrics", broken)
    with pytest.raises(RuntimeError, match="bug in compute_metrics"):
        main(["--params", str(params), "evaluate", "--model", "small", "--no-register"])


@pytest.mark.slow
@pytest.mark.slow
def test_mlflow_models_serve_the_champion(eval_params, run_evaluate, trained_project, tmp_path):
    """`mlflow models serve` of models:/<name>@champion answers the documented request."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    import cv2

    root, _ = trained_project
    params = eval_params(root, ["small", "big"], "fer-emotion-serve")
    run_evaluate(params)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [str(bindir / "mlflow"), "models", "serve", "-m", "models:/fer-emotion-serve@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        stdout=(tmp_path / "serve.log").open("w"), stderr=subprocess.STDOUT, env=env,
        start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1)
                break
            except OSError:
                assert time.time() < deadline, "mlflow models serve did not start"
                time.sleep(0.5)
        face = cv2.imread(str(Path(__file__).parents[1] / "fixtures" / "happy_48.jpg"),
                          cv2.IMREAD_GRAYSCALE)
        body = json.dumps({"inputs": face.reshape(1, 48, 48, 1).tolist()}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        preds = json.loads(urllib.request.urlopen(req, timeout=60).read())["predictions"]
        assert np.asarray(preds).shape == (1, 7)
        assert sum(preds[0]) == pytest.approx(1.0, abs=1e-4)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
