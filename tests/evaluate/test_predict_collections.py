"""`fer predict` on real photo collections: EXIF orientation, folders, JSON lines / CSV,
guards (non-regular, huge, decompression bombs, truncated), one model call per batch, and
nothing but results on standard output."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from fer_pipeline import params as P
from fer_pipeline.cli import main
from fer_pipeline.predict import Classifier, detect_faces, iter_predictions

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CLASSES = P.Params().data.classes


def _upright_photo() -> np.ndarray:
    face = cv2.imread(str(FIXTURES / "happy_48.jpg"), cv2.IMREAD_GRAYSCALE)
    canvas = np.full((480, 640), 190, np.uint8)
    canvas[120:320, 220:420] = cv2.resize(face, (200, 200), interpolation=cv2.INTER_CUBIC)
    return canvas


@pytest.fixture
def local_model(trained_project):
    root, _ = trained_project
    return root / "models" / "small" / "model.keras"


@pytest.fixture
def portrait(tmp_path):
    """A phone's portrait photo: pixels stored sideways, EXIF Orientation=6 (rotate 90 CW)."""
    stored = np.ascontiguousarray(np.rot90(_upright_photo(), 1))   # 90 degrees counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "portrait.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    return path


def test_exif_orientation_is_applied(local_model, portrait, capsys):
    # Without the EXIF rotation the face is sideways: the frontal detector finds nothing.
    assert detect_faces(cv2.imread(str(portrait), cv2.IMREAD_UNCHANGED)) == []
    assert main(["predict", "--model", str(local_model), str(portrait)]) == 0
    (res,) = json.loads(capsys.readouterr().out)["results"]
    assert res["image_size"] == {"width": 640, "height": 480}     # upright
    assert len(res["faces"]) == 1
    b = res["faces"][0]["box"]
    assert abs(b["x"] + b["w"] / 2 - 320) < 40 and abs(b["y"] + b["h"] / 2 - 220) < 40


def test_folders_recursive_jsonl_and_csv(local_model, portrait, tmp_path, capsys):
    album = tmp_path / "album"
    (album / "2026" / "june").mkdir(parents=True)
    (album / "empty").mkdir()
    for name in ("happy_48.jpg", "surprise_48.jpg"):
        (album / "2026" / "june" / name).write_bytes((FIXTURES / name).read_bytes())
    (album / "portrait.jpg").write_bytes(portrait.read_bytes())
    (album / "notes.txt").write_text("not an image, not an image suffix: not listed\n")
    (album / "2026" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")

    assert main(["predict", "--model", str(local_model), "--format", "jsonl", str(album),
                 str(album / "empty")]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(x) for x in captured.out.splitlines()]
    paths = [Path(r["path"]).name for r in lines]
    assert paths == ["empty", "broken.png", "happy_48.jpg", "surprise_48.jpg", "portrait.jpg"]
    by = {Path(r["path"]).name: r for r in lines}
    assert not by["empty"]["ok"] and "no image files" in by["empty"]["error"]
    assert not by["broken.png"]["ok"] and "image" in by["broken.png"]["error"]
    assert all(by[n]["ok"] and len(by[n]["faces"]) == 1
               for n in ("happy_48.jpg", "surprise_48.jpg", "portrait.jpg"))
    assert "predict: 5/5 files, 3 faces, 2 failed" in captured.err     # progress, on stderr

    assert main(["predict", "--model", str(local_model), "--format", "csv", str(album)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [Path(r["path"]).name for r in rows] == ["broken.png", "happy_48.jpg",
                                                    "surprise_48.jpg", "portrait.jpg"]
    happy = rows[1]
    assert happy["emotion"] in CLASSES and happy["face"] == "0"
    assert sum(float(happy[f"p_{c}"]) for c in CLASSES) == pytest.approx(1.0, abs=1e-3)
    assert rows[0]["ok"] == "False" and rows[0]["message"]


def test_guards_non_regular_huge_bombs_truncated(local_model, tmp_path, capsys):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)                                   # reading it would block forever
    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)           # 81 MP in a few KB
    big = tmp_path / "big.png"
    cv2.imwrite(str(big), np.random.default_rng(0).integers(0, 255, (800, 800), np.uint8))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((FIXTURES / "happy_48.jpg").read_bytes()[:300])
    good = FIXTURES / "happy_48.jpg"
    params = tmp_path / "params.yaml"
    params.write_text("predict:\n  max_file_mb: 0.2\n  max_pixels: 50000000\n")
    assert bomb.stat().st_size < 200_000 < big.stat().st_size

    code = main(["--params", str(params), "predict", "--model", str(local_model),
                 *map(str, (fifo, bomb, big, truncated, good))])
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err
    res = {Path(r["path"]).name: r for r in json.loads(captured.out)["results"]}
    assert "not a regular file" in res["pipe.jpg"]["error"]
    assert "image too large: 9000x9000" in res["bomb.png"]["error"]
    assert "file too large" in res["big.png"]["error"]
    assert not res["truncated.jpg"]["ok"]
    assert res["happy_48.jpg"]["ok"] and len(res["happy_48.jpg"]["faces"]) == 1


class _CountingModel:
    """A stand-in classifier counting model calls (what is measured here is our batching)."""

    def __init__(self):
        self.calls = []

    def predict(self, x):
        self.calls.append(len(x))
        return np.full((len(x), len(CLASSES)), 1.0 / len(CLASSES), np.float32)


def test_the_faces_of_a_batch_go_to_the_model_in_one_call(tmp_path):
    model = _CountingModel()
    clf = Classifier(model, list(CLASSES), "counting", "pyfunc")
    files = [FIXTURES / "happy_48.jpg", FIXTURES / "surprise_48.jpg", tmp_path / "missing.png"] * 3
    limits = P.PredictParams(batch_files=4)
    results = list(iter_predictions(clf, files, limits=limits))
    assert len(results) == 9 and sum(r.ok for r in results) == 6
    assert model.calls == [3, 3]      # chunks of 4 files: 3 faces, 3 faces, none (no call)


@pytest.mark.slow
def test_stdout_is_only_json_with_an_mlflow_model(tmp_path):
    """An MLflow (pyfunc) model prints Keras' progress bar on predict: it must not reach stdout
    (`fer predict photo.jpg | python -m json.tool`)."""
    import keras
    import mlflow.keras

    inp = keras.Input((48, 48, 1), dtype="float32")
    x = keras.layers.Conv2D(4, 3, activation="relu")(keras.layers.Rescaling(1 / 255)(inp))
    out = keras.layers.Dense(len(CLASSES), activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(x))
    folder = tmp_path / "mlflow-model"
    mlflow.keras.save_model(keras.Model(inp, out), str(folder))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = (f"{sys.executable} -m fer_pipeline.cli predict --model {folder} "
           f"{FIXTURES / 'happy_48.jpg'} {FIXTURES / 'surprise_48.jpg'} | "
           f"{sys.executable} -m json.tool")
    res = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert [len(r["faces"]) for r in report["results"]] == [1, 1]
    assert report["results"][0]["faces"][0]["emotion"] in CLASSES
