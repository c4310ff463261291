"""`fer export` writes the evaluated champion as a release bundle; without --model and without
a champion in any tracking store, `fer predict` and `fer serve` use that bundle (a fresh clone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fer_pipeline.calibration import apply_temperature
from fer_pipeline.cli import main
from fer_pipeline.io import md5_file
from sandbox import free_port

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_the_bundle_describes_itself(released):
    root, _, out = released
    assert sorted(f.name for f in out.iterdir()) == ["MODEL_CARD.md", "confusion.png",
                                                     "model.json", "model.keras", "model.onnx",
                                                     "reliability.png"]
    man = json.loads((out / "model.json").read_text())
    assert man["model"] == "small" and man["name"] == "fer-emotion-export"
    assert man["classes"][3] == "happy" and man["tta"] == "flip"
    assert man["input"]["shape"] == [None, 48, 48, 1]
    assert man["metrics"]["val_accuracy"] == pytest.approx(0.40)
    assert 0 <= man["metrics"]["test_accuracy"] <= 1 and "test_accuracy_clean" in man["metrics"]
    assert man["model_md5"] == md5_file(out / "model.keras") and man["git_commit"]
    assert man["recipe"]["arch"] == "custom_cnn" and man["registered_version"]
    onnx = man["onnx"]        # checked against Keras on every test image at export
    assert onnx["md5"] == md5_file(out / "model.onnx") and onnx["check"]["top1_agreement"] == 1.0
    assert onnx["check"]["images"] == 70 and onnx["check"]["max_abs_diff"] <= 1e-4
    metrics = json.loads((root / "reports/evaluate/metrics.json").read_text())["small"]
    cal = man["calibration"]          # fitted on val by evaluate, shipped with the model
    assert cal["temperature"] == metrics["temperature"] and cal["fitted_on"] == "validation"
    assert cal["test_ece_calibrated"] == metrics["test_ece_calibrated"]
    assert man["robustness"]["worst_drop"] == metrics["robust_worst_drop"]
    assert set(man["data_md5"]) == {str(root / "data/val.npz"), str(root / "data/test.npz")}
    card = (out / "MODEL_CARD.md").read_text()
    for needle in ("## Intended use", "**Not for**", "label noise", "## Confusion matrix",
                   "| happy |", "## Robustness", "## Calibration", "## Limits"):
        assert needle in card, needle


def _no_store_params(tmp_path: Path, out: Path) -> Path:
    """A fresh clone: no MLflow store at all, the bundle where params say."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "predict": {"release_dir": str(out)}}))
    return params


def test_predict_without_model_or_store_uses_the_release(released, tmp_path):
    _, _, out = released
    params = _no_store_params(tmp_path, out)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    crop = str(FIXTURES / "happy_48.jpg")
    res = subprocess.run([sys.executable, "-m", "fer_pipeline.cli", "--params", str(params),
                          "predict", crop], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report["model"] == "release:fer-emotion-export/small (model.onnx)"
    assert report["tta"] == "flip" and str(tmp_path.parent) not in res.stdout   # no local paths
    assert "using the bundled release" in res.stderr and "no MLflow store" in res.stderr
    assert not (tmp_path / "mlflow.db").exists()           # asking created no store
    # The same probabilities as the bundle's model file with the bundle's augmentation.
    direct = subprocess.run([sys.executable, "-m", "fer_pipeline.cli", "predict", "--model",
                             str(out / "model.keras"), "--tta", "flip", crop], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    raw = json.loads(direct.stdout)["results"][0]["faces"][0]["probabilities"]
    # ... scaled by the bundle's temperature (a bare model file has none: T = 1).
    t = json.loads((out / "model.json").read_text())["calibration"]["temperature"]
    assert report["temperature"] == t and json.loads(direct.stdout)["temperature"] == 1.0
    scaled = apply_temperature(np.array([list(raw.values())]), t)[0]
    face = report["results"][0]["faces"][0]
    assert list(face["probabilities"].values()) == pytest.approx(scaled, abs=1e-4)
    assert face["uncertain"] == (face["confidence"] < report["min_confidence"])


_PREDICT_AND_LIST_MODULES = """
import json, sys
from fer_pipeline.cli import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in ("tensorflow", "keras", "mlflow", "jax", "torch") if m in sys.modules)
print(json.dumps({"rc": rc, "heavy_imports": heavy}), file=sys.stderr)
"""


def test_the_release_runs_on_onnx_runtime_without_importing_tensorflow(released, tmp_path):
    """predict.runtime auto takes the bundle's model.onnx: the same answers as its model.keras,
    and neither TensorFlow, Keras nor MLflow is imported (the slow part of a cold start)."""
    _, _, out = released
    params = _no_store_params(tmp_path, out)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    crop = str(FIXTURES / "happy_48.jpg")

    def run(runtime: str) -> tuple[dict, dict]:
        p = yaml.safe_load(params.read_text())
        p["predict"]["runtime"] = runtime
        path = tmp_path / f"params-{runtime}.yaml"
        path.write_text(yaml.safe_dump(p))
        res = subprocess.run([sys.executable, "-c", _PREDICT_AND_LIST_MODULES, "--params",
                              str(path), "predict", crop], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        info = json.loads(res.stderr.strip().splitlines()[-1])
        assert info["rc"] == 0, res.stderr[-3000:]
        return json.loads(res.stdout), info

    onnx, onnx_info = run("auto")
    keras_, keras_info = run("keras")
    assert onnx["model"] == "release:fer-emotion-export/small (model.onnx)"
    assert keras_["model"] == "release:fer-emotion-export/small (model.keras)"
    assert onnx_info["heavy_imports"] == [] and "keras" in keras_info["heavy_imports"]
    face, want = onnx["results"][0]["faces"][0], keras_["results"][0]["faces"][0]
    assert face["emotion"] == want["emotion"]
    assert face["probabilities"] == pytest.approx(want["probabilities"], abs=1e-4)


def test_a_tampered_bundle_is_refused(released, tmp_path):
    import shutil

    _, _, out = released
    copy = tmp_path / "release"
    shutil.copytree(out, copy)
    (copy / "model.keras").write_bytes((copy / "model.keras").read_bytes() + b"\0")
    params = _no_store_params(tmp_path, copy)
    assert main(["--params", str(params), "predict", str(FIXTURES / "happy_48.jpg")]) == 1


def test_serve_without_model_or_store_answers_from_the_release(released, tmp_path):
    import signal
    import time

    import httpx

    _, _, out = released
    params = _no_store_params(tmp_path, out)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-m", "fer_pipeline.cli", "--params", str(params),
                             "serve", "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                r = httpx.post(f"{url}/predict", content=(FIXTURES / "happy_48.jpg").read_bytes(),
                               headers={"content-type": "image/jpeg"}, timeout=30)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.communicate()[0][-3000:]
                time.sleep(0.5)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"]["source"].startswith("release:fer-emotion-export/small")
        face = body["results"][0]["faces"][0]
        assert face["emotion"] in body["model"]["classes"] and "happy" in face["probabilities"]
        card = httpx.get(f"{url}/model").json()["card"]
        assert card["manifest"]["model"] == "small"
        assert "## Intended use" in card["model_card_markdown"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.parametrize("members", [1, 2])
def test_a_mixed_precision_model_is_released_as_a_float32_copy(tmp_path, members):
    """A model trained in bf16 (AMX/AVX512-BF16 CPUs) exports to an ONNX graph that ONNX Runtime
    refuses (float16 and bfloat16 mixed in one op); the release takes a float32 copy of the same
    weights, which exports and agrees with the model as trained. An ensemble (`members: 2`,
    networks nested in the model) is copied and exported alike."""
    import keras

    from fer_pipeline import params as P
    from fer_pipeline.arrays import SplitArrays, save_split
    from fer_pipeline.export import agreement, as_float32, export_onnx
    from fer_pipeline.synthetic import make_arrays
    from fer_pipeline.train.models import build_model
    from fer_pipeline.train.recipe import _layers

    before = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        trained = build_model(P.model_params(arch="fernet", width=0.125, dense_units=[],
                                            members=members), 7, seed=0).model
    finally:
        keras.mixed_precision.set_global_policy(before)
    x, y = make_arrays(28)
    data = tmp_path / "test.npz"
    save_split(data, SplitArrays(x, y, np.arange(len(y)).astype(str),
                                 np.array(["PublicTest"] * len(y)), [str(c) for c in range(7)]))
    copy = as_float32(trained)
    assert copy is not trained and as_float32(copy) is copy
    nested = _layers(copy)     # every layer, the members' own included
    assert (len(nested) > len(copy.layers)) == (members > 1)     # the members' own layers too
    assert {la.dtype_policy.name for la in nested} == {"float32"}
    check = export_onnx(copy, tmp_path / "m.onnx", data)["check"]
    assert check["top1_agreement"] == 1.0
    report = agreement(trained, copy, data)
    assert report["trained_policy"] == "mixed_bfloat16" and report["top1_agreement"] > 0.8
    assert all(np.array_equal(a, b) for a, b in zip(trained.get_weights(), copy.get_weights(),
                                                    strict=True))
