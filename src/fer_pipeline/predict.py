"""`fer predict PATH...`: classify the emotion of every face in real photos.

Faces are found with OpenCV's bundled Haar cascade (no download), cropped, converted to 48x48
grayscale (the FER-2013 format) and classified. An image that already is 48x48 is taken as a
face crop and classified directly. Output: one JSON document on stdout (per file: face boxes and
class probabilities, or an error); `--annotate OUT` also writes the photo with boxes and labels.

Default model: `models:/fer-emotion@champion` (the registry alias the evaluate stage sets);
`--model` takes a local `.keras` file, an MLflow model folder or any MLflow model URI.
Per-file problems (missing, not an image, no face) are reported per file and the others still
run; the exit code is 1 only when no file could be read at all or the model cannot be loaded.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fer_pipeline.errors import FerError
from fer_pipeline.io import atomic_path
from fer_pipeline.params import MlflowParams, RegistryParams
from fer_pipeline.tracking import check_reachable, resolve_tracking_uri

FACE_SIZE = 48
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
# What Keras raises for a file it cannot read as a model (not a zip, foreign content).
KERAS_LOAD_ERRORS = (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile)


class ImageError(FerError):
    """One input file cannot be used (missing, not an image, annotation not writable): it is
    reported in that file's result and the other files still run."""


@dataclass
class Classifier:
    """Anything that maps float32 (N, 48, 48, 1) pixels 0..255 to (N, C) probabilities."""

    model: Any
    classes: list[str]
    source: str
    kind: str   # keras | pyfunc

    def predict(self, faces: np.ndarray) -> np.ndarray:
        x = np.asarray(faces, dtype=np.float32)
        if self.kind == "keras":
            out = self.model.predict(x, verbose=0)
        else:
            out = self.model.predict(x)
        return np.asarray(getattr(out, "values", out), dtype=np.float32)


def default_model_uri(registry: RegistryParams) -> str:
    return f"models:/{registry.model_name}@{registry.champion_alias}"


def load_classifier(ref: str, classes: list[str], mlflow: MlflowParams) -> Classifier:
    """Load a local .keras file, a local MLflow model folder, or an MLflow model URI.

    Every problem with `ref` (missing, unreadable, unknown to the registry, not a 48x48 face
    classifier for `classes`) is a FerError: one line, before any image is read.
    """
    path = Path(ref)
    if path.suffix in (".keras", ".h5") or path.is_file():
        if not path.is_file():
            raise FerError(f"model file not found: {path} (train it: `dvc repro train`)")
        import keras

        try:
            model = keras.saving.load_model(path, compile=False)
        except KERAS_LOAD_ERRORS as exc:
            raise FerError(f"cannot load Keras model {path}: {exc}") from exc
        return _checked(Classifier(model, list(classes), str(path), "keras"), (ValueError,))

    if not path.is_dir() and "://" not in ref and ":/" not in ref:
        raise FerError(f"--model {ref!r}: no such file or folder, and not an MLflow URI "
                       f"(models:/NAME@ALIAS, models:/NAME/VERSION, models:/<model_id>)")
    import mlflow as mlflow_lib
    from mlflow.exceptions import MlflowException

    if path.is_dir():
        if not (path / "MLmodel").is_file():
            raise FerError(f"{path} is a folder but not an MLflow model (no MLmodel file)")
        try:
            model = mlflow_lib.pyfunc.load_model(str(path))
        except MlflowException as exc:
            raise FerError(f"cannot load MLflow model {path}: {exc.message}") from exc
        return _checked(Classifier(model, list(classes), str(path), "pyfunc"),
                        (ValueError, MlflowException))

    uri = resolve_tracking_uri(mlflow.tracking_uri)
    check_reachable(uri, mlflow.probe_timeout_s)
    mlflow_lib.set_tracking_uri(uri)
    classes = _registry_classes(ref) or list(classes)
    try:
        model = mlflow_lib.pyfunc.load_model(ref)
    except MlflowException as exc:
        raise FerError(_explain_mlflow_error(ref, uri, exc.message)) from exc
    except OSError as exc:
        raise FerError(f"cannot load {ref} from {uri}: {exc}") from exc
    return _checked(Classifier(model, classes, ref, "pyfunc"), (ValueError, MlflowException))


def _checked(clf: Classifier, errors: tuple[type[Exception], ...]) -> Classifier:
    """The model maps one 48x48 face to one probability per class, or a FerError now (not a
    wrong answer, or the same error per file, later)."""
    try:
        out = clf.predict(np.zeros((1, FACE_SIZE, FACE_SIZE, 1), np.float32))
    except errors as exc:
        first = (str(exc).strip().splitlines() or ["unknown error"])[0]
        raise FerError(f"model {clf.source} does not take (N, {FACE_SIZE}, {FACE_SIZE}, 1) "
                       f"grayscale faces: {first}") from exc
    if out.shape != (1, len(clf.classes)):
        raise FerError(f"model {clf.source} outputs shape {out.shape[1:]} per face, but there are "
                       f"{len(clf.classes)} classes ({', '.join(clf.classes)}): set data.classes "
                       f"to the classes it was trained on")
    return clf


def _explain_mlflow_error(ref: str, uri: str, message: str) -> str:
    hint = ("The evaluate stage registers the champion: run `dvc repro evaluate` (or "
            "`fer evaluate`), or pass --model models/<name>/model.keras.")
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return f"cannot load {ref} from tracking store {uri}: {first}. {hint}"


def _registry_classes(ref: str) -> list[str] | None:
    """Class order recorded on a registered version (tag `classes`), if `ref` names one."""
    if not ref.startswith("models:/"):
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    body = ref[len("models:/"):]
    client = MlflowClient()
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        elif "/" in body:
            name, version = body.split("/", 1)
            mv = client.get_model_version(name, version)
        else:
            return None
    except MlflowException as exc:
        raise FerError(_explain_mlflow_error(ref, client.tracking_uri, exc.message)) from exc
    tag = (mv.tags or {}).get("classes")
    return tag.split(",") if tag else None


# ---- images and faces -------------------------------------------------------------------------

def read_image(path: Path) -> np.ndarray:
    """BGR (or gray) uint8 image; raises ImageError with a per-file message."""
    import cv2

    if not path.exists():
        raise ImageError("file not found")
    if path.is_dir():
        raise ImageError("is a folder, not an image")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from exc
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise ImageError("not an image (or an unsupported/corrupt image format)")
    if img.dtype != np.uint8:
        img = cv2.convertScaleAbs(img, alpha=255.0 / max(float(img.max()), 1.0))
    return img


def to_gray(img: np.ndarray) -> np.ndarray:
    import cv2

    if img.ndim == 2:
        return img
    if img.shape[2] == 1:
        return img[:, :, 0]
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY)
    return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)


_CASCADE = None


def detect_faces(gray: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) boxes, largest first, from OpenCV's bundled frontal-face Haar cascade."""
    import cv2

    global _CASCADE
    if _CASCADE is None:
        path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        _CASCADE = cv2.CascadeClassifier(str(path))
        if _CASCADE.empty():
            raise FerError(f"cannot load OpenCV's Haar cascade {path}")
    side = min(gray.shape[:2])
    min_size = max(24, side // 12)
    boxes = _CASCADE.detectMultiScale(cv2.equalizeHist(gray), scaleFactor=1.1, minNeighbors=5,
                                      minSize=(min_size, min_size))
    boxes = [tuple(int(v) for v in b) for b in (boxes if len(boxes) else [])]
    return sorted(boxes, key=lambda b: -b[2] * b[3])


def crop_face(gray: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    import cv2

    x, y, w, h = box
    face = gray[y:y + h, x:x + w]
    interp = cv2.INTER_AREA if min(face.shape) > FACE_SIZE else cv2.INTER_CUBIC
    return cv2.resize(face, (FACE_SIZE, FACE_SIZE), interpolation=interp)


def annotate(img: np.ndarray, faces: list[dict[str, Any]], out: Path) -> None:
    import cv2

    canvas = img.copy()
    if canvas.ndim == 2 or canvas.shape[2] == 1:
        canvas = cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR)
    elif canvas.shape[2] == 4:
        canvas = cv2.cvtColor(canvas, cv2.COLOR_BGRA2BGR)
    if max(canvas.shape[:2]) < 200:  # tiny crops: enlarge so the label is readable
        scale = 200 / max(canvas.shape[:2])
        canvas = cv2.resize(canvas, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    else:
        scale = 1.0
    thick = max(1, round(max(canvas.shape[:2]) / 400))
    for f in faces:
        b = f["box"]
        x, y = int(b["x"] * scale), int(b["y"] * scale)
        w, h = int(b["w"] * scale), int(b["h"] * scale)
        cv2.rectangle(canvas, (x, y), (x + w - 1, y + h - 1), (0, 200, 0), thick + 1)
        label = f"{f['emotion']} {f['confidence']:.2f}"
        ty = y - 6 if y > 20 else y + h + 16
        cv2.putText(canvas, label, (x, ty), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * thick, (0, 200, 0),
                    thick, cv2.LINE_AA)
    try:
        with atomic_path(out) as tmp:   # the temp name keeps the suffix: OpenCV's format
            if not cv2.imwrite(str(tmp), canvas):
                raise ImageError(f"cannot write annotated image {out}")
    except OSError as exc:              # e.g. --annotate names a folder under a file
        raise ImageError(f"cannot write annotated image {out}: {exc}") from exc


def _annotate_path(out: Path, src: Path, n_inputs: int) -> Path:
    if n_inputs == 1 and out.suffix.lower() in IMAGE_SUFFIXES:
        return out
    return out / f"{src.stem}_annotated.png"


def classify_file(clf: Classifier, path: Path, detect: bool = True,
                  annotate_to: Path | None = None) -> dict[str, Any]:
    """Result dict for one file; its problems (ImageError) become {"ok": false, "error": ...}."""
    result: dict[str, Any] = {"path": str(path)}
    try:
        img = read_image(path)
        gray = to_gray(img)
        h, w = gray.shape[:2]
        result["image_size"] = {"width": int(w), "height": int(h)}
        if (h, w) == (FACE_SIZE, FACE_SIZE) or not detect:
            mode, boxes = ("crop" if (h, w) == (FACE_SIZE, FACE_SIZE) else "whole"), [(0, 0, w, h)]
        else:
            mode, boxes = "detect", detect_faces(gray)
        result["mode"] = mode
        faces = []
        if boxes:
            batch = np.stack([crop_face(gray, b) for b in boxes])[..., None]
            probs = clf.predict(batch)
            for b, p in zip(boxes, probs, strict=True):
                k = int(np.argmax(p))
                faces.append({
                    "box": {"x": b[0], "y": b[1], "w": b[2], "h": b[3]},
                    "emotion": clf.classes[k], "confidence": round(float(p[k]), 4),
                    "probabilities": {c: round(float(v), 4) for c, v in zip(clf.classes, p,
                                                                              strict=True)},
                })
        result["ok"] = True
        result["faces"] = faces
        if not faces:
            result["message"] = "no face found"
        if annotate_to is not None:
            annotate(img, faces, annotate_to)
            result["annotated"] = str(annotate_to)
    except ImageError as exc:
        result.update(ok=False, error=str(exc))
    return result


def predict_files(paths: list[str | Path], model: str | None, classes: list[str],
                  registry: RegistryParams, mlflow: MlflowParams, detect: bool = True,
                  annotate_out: str | Path | None = None) -> dict[str, Any]:
    """Classify faces in every file: {"model", "classes", "results": [one per file]}.

    model=None loads the registry's champion. Raises FerError only when the model cannot be
    loaded; a file's own problem is in its result.
    """
    clf = load_classifier(model or default_model_uri(registry), classes, mlflow)
    results = []
    for p in map(Path, paths):
        target = _annotate_path(Path(annotate_out), p, len(paths)) if annotate_out else None
        results.append(classify_file(clf, p, detect, target))
    return {"model": clf.source, "classes": clf.classes, "results": results}
