"""`fer predict` on real FER-2013 images: 48x48 crops, a synthetic photo, bad inputs, registry."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from faces import rolled_face
from fer_pipeline import params as P
from fer_pipeline.artifacts.evaluation import EvaluationMetrics
from fer_pipeline.calibration import apply_temperature
from fer_pipeline.cli import main
from fer_pipeline.errors import FerError
from fer_pipeline.predict import crop_face, detect_faces, drop_nested, find_faces, predict_files

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DEFAULTS = P.Params()   # what `fer predict` uses outside a project


def _predict(paths, model=None, params=DEFAULTS):
    return predict_files(paths, model, params.data.classes, params.registry, params.mlflow,
                         limits=params.predict)


@pytest.fixture
def photo(tmp_path):
    """A 640x480 'photo': a FER face upscaled to 200x200 pasted at (220, 120) on a gray canvas."""
    face = cv2.imread(str(FIXTURES / "happy_48.jpg"), cv2.IMREAD_GRAYSCALE)
    canvas = np.full((480, 640), 190, np.uint8)
    canvas[120:320, 220:420] = cv2.resize(face, (200, 200), interpolation=cv2.INTER_CUBIC)
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR))
    return path


@pytest.fixture
def bad_files(tmp_path):
    noface = tmp_path / "noface.png"
    yy, xx = np.mgrid[0:300, 0:400]
    cv2.imwrite(str(noface), ((xx + yy) % 256).astype(np.uint8))
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    return noface, text, tmp_path / "missing.png"


@pytest.fixture
def local_model(trained_project):
    root, _ = trained_project
    return root / "models" / "small" / "model.keras"


def test_haar_cascade_finds_the_pasted_face(photo):
    boxes = detect_faces(cv2.imread(str(photo), cv2.IMREAD_GRAYSCALE))
    assert len(boxes) == 1
    x, y, w, h = boxes[0]
    assert abs(x + w / 2 - 320) < 40 and abs(y + h / 2 - 220) < 40 and 120 < w < 280


def test_a_box_inside_a_found_face_is_dropped_but_separate_faces_stay():
    """The surprise face, upscaled with a margin: the cascade also fires on its nose/mouth
    (seen on fer serve's page); that nested box is not a second face."""
    face = cv2.imread(str(FIXTURES / "surprise_48.jpg"), cv2.IMREAD_GRAYSCALE)
    face = cv2.resize(cv2.copyMakeBorder(face, 8, 8, 8, 8, cv2.BORDER_REPLICATE), (300, 300),
                      interpolation=cv2.INTER_CUBIC)
    canvas = np.full((420, 760), 200, np.uint8)
    canvas[60:360, 420:720] = face
    canvas[60:360, 40:340] = face
    boxes = detect_faces(canvas)
    assert len(boxes) == 2 and {b[0] < 380 for b in boxes} == {True, False}
    assert drop_nested([(0, 0, 100, 100), (30, 30, 20, 20), (90, 90, 50, 50)]) == [
        (0, 0, 100, 100), (90, 90, 50, 50)]     # a small overlap is another face


def _turn_to_upright(crop: np.ndarray, upright: np.ndarray) -> int:
    """The turn (degrees, steps of 5) that best aligns `crop` with the `upright` face crop."""
    def corr(phi):
        m = cv2.getRotationMatrix2D((24, 24), phi, 1.0)
        turned = cv2.warpAffine(crop, m, (48, 48), borderMode=cv2.BORDER_REPLICATE)
        return np.corrcoef(turned[8:40, 8:40].ravel().astype(float),
                           upright[8:40, 8:40].ravel().astype(float))[0, 1]
    return max(range(-45, 46, 5), key=corr)


@pytest.mark.parametrize(("name", "degrees"), [("happy_48.jpg", 30), ("surprise_48.jpg", -30)])
def test_roll_search_finds_a_tilted_face_and_crops_it_upright(name, degrees):
    """The cascade misses a face rolled by 30 degrees; the roll search finds it, says which
    way it leans, and crops it upright (a straight crop of its box stays tilted)."""
    img = rolled_face(name, degrees)
    assert detect_faces(img) == [] and find_faces(img, []) == []
    faces = find_faces(img, P.PredictParams().roll_angles)
    assert len(faces) == 1
    face = faces[0]
    assert np.sign(face.roll) == np.sign(degrees) and abs(face.roll - degrees) <= 15
    x, y, w, h = face.box
    assert abs(x + w / 2 - img.shape[1] / 2) < 30 and abs(y + h / 2 - img.shape[0] / 2) < 30
    straight = rolled_face(name, 0)
    upright = crop_face(straight, detect_faces(straight)[0])
    assert abs(_turn_to_upright(face.crop, upright)) <= 15          # as the classifier wants it
    assert abs(_turn_to_upright(crop_face(img, face.box), upright)) >= 25   # a straight crop


def test_predict_reports_the_roll_and_draws_the_tilted_box(local_model, tmp_path, capsys):
    path = tmp_path / "tilted.png"
    cv2.imwrite(str(path), rolled_face("surprise_48.jpg", -30))
    assert main(["predict", "--model", str(local_model), "--annotate", str(tmp_path / "a.png"),
                 str(path)]) == 0
    face = json.loads(capsys.readouterr().out)["results"][0]["faces"][0]
    assert face["roll"] < -15
    drawn = cv2.imread(str(tmp_path / "a.png"))
    green = (drawn[..., 1] > 150) & (drawn[..., 0] < 80) & (drawn[..., 2] < 80)
    ys, xs = np.nonzero(green)
    # a tilted square's outline: no green row spans the whole box as a straight box's top does
    assert len(xs) and max(np.bincount(ys)) < 0.6 * (xs.max() - xs.min())
    with pytest.raises(P.ParamsError, match="roll_angles"):
        P.PredictParams(roll_angles=[0.0])


def test_predict_local_model_photo_crop_and_bad_inputs(local_model, photo, bad_files, tmp_path,
                                                       capsys):
    noface, text, missing = bad_files
    crop = FIXTURES / "happy_48.jpg"
    paths = [str(p) for p in (photo, crop, noface, text, missing)]
    code = main(["predict", "--model", str(local_model), "--annotate", str(tmp_path / "ann"), *paths])
    captured = capsys.readouterr()
    assert code == 0                      # some files worked
    assert "Traceback" not in captured.err
    report = json.loads(captured.out)
    res = {r["path"]: r for r in report["results"]}
    assert report["classes"][3] == "happy"

    ph = res[str(photo)]
    assert ph["ok"] and ph["mode"] == "detect" and len(ph["faces"]) == 1
    face = ph["faces"][0]
    assert set(face["box"]) == {"x", "y", "w", "h"} and face["roll"] == 0
    assert sum(face["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
    assert face["emotion"] in report["classes"]
    assert (tmp_path / "ann" / "photo_annotated.png").is_file()

    cr = res[str(crop)]
    assert cr["ok"] and cr["mode"] == "crop" and cr["faces"][0]["box"] == {"x": 0, "y": 0, "w": 48, "h": 48}

    assert res[str(noface)]["ok"] and res[str(noface)]["faces"] == []
    assert "no face" in res[str(noface)]["message"]
    assert not res[str(text)]["ok"] and "not an image" in res[str(text)]["error"]
    assert not res[str(missing)]["ok"] and "not found" in res[str(missing)]["error"]
    for p in (noface, text, missing):
        assert str(p) in captured.err      # one clear line per problem file


def test_predict_exit_code_when_nothing_readable(local_model, bad_files, capsys):
    _, text, missing = bad_files
    assert main(["predict", "--model", str(local_model), str(text), str(missing)]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_predict_by_registry_alias(trained_project, eval_params, run_evaluate, photo):
    """Default-style URI: the registered champion, class names from the version's tag."""
    root, _ = trained_project
    params = eval_params(root, ["small", "big"], "fer-emotion-predict")
    run_evaluate(params)
    report = _predict([photo, FIXTURES / "surprise_48.jpg"], params=P.load(params))
    assert report.model == "models:/fer-emotion-predict@champion"
    assert [len(r.faces) for r in report.results] == [1, 1]
    # Same probabilities as the local file of the champion (same weights, pyfunc vs keras),
    # scaled by the temperature evaluate fitted on val and tagged on the version.
    local = _predict([photo], model=str(root / "models" / "small" / "model.keras"))
    t = EvaluationMetrics.read(root / "reports/evaluate/metrics.json")["small"].temperature
    assert report.temperature == pytest.approx(t, rel=1e-5) and local.temperature == 1.0
    raw = list(local.results[0].faces[0].probabilities.values())
    assert list(report.results[0].faces[0].probabilities.values()) == pytest.approx(
        apply_temperature(np.array([raw]), t)[0], abs=1e-3)


def test_missing_registry_or_alias_is_a_clear_error(trained_project, eval_params, photo, capsys):
    root, _ = trained_project
    params = eval_params(root, ["small"], "fer-emotion-never-registered")
    raw = yaml.safe_load(params.read_text())
    raw["predict"] = {"release_dir": str(root / "no-release")}    # nothing to fall back to
    params.write_text(yaml.safe_dump(raw))
    with pytest.raises(FerError, match=r"fer-emotion-never-registered.*dvc repro evaluate"):
        _predict([photo], params=P.load(params))
    assert main(["--params", str(params), "predict", "--model", "models:/fer-emotion-life@nosuch",
                 str(photo)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "nosuch" in err and "dvc repro evaluate" in err


def test_cli_user_error_is_one_line_but_a_bug_shows_its_traceback(local_model, tmp_path,
                                                                  monkeypatch, capsys):
    crop = str(FIXTURES / "happy_48.jpg")
    # A user error (the model file does not exist): exit 1, one line, no traceback.
    assert main(["predict", "--model", str(tmp_path / "nope.keras"), crop]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"fer predict: error: model file not found: {tmp_path / 'nope.keras'} "
        f"(train it: `dvc repro train`)"]
    # An unexpected error on one file (a bug, an OpenCV error): that file's entry, the others
    # go on, and its traceback is shown (it is not passed off as a bad image).
    import fer_pipeline.predict as predict

    real = predict.crop_face

    def broken(gray, box):
        if gray.shape == (48, 48):
            raise RuntimeError("bug in crop_face")
        return real(gray, box)

    monkeypatch.setattr(predict, "crop_face", broken)
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), np.full((100, 120), 128, np.uint8))
    assert main(["predict", "--model", str(local_model), crop, str(photo)]) == 0
    captured = capsys.readouterr()
    res = {r["path"]: r for r in json.loads(captured.out)["results"]}
    assert res[crop]["error"] == "RuntimeError: bug in crop_face" and res[crop]["unexpected"]
    assert res[str(photo)]["ok"]
    assert "Traceback" in captured.err and "bug in crop_face" in captured.err


def test_a_model_for_other_classes_fails_at_load(local_model, photo):
    """Seven outputs but three classes: one FerError before any image, not an error per file."""
    with pytest.raises(FerError, match=r"3 classes .*data.classes"):
        predict_files([photo], str(local_model), ["a", "b", "c"], DEFAULTS.registry, DEFAULTS.mlflow)
