"""`fer predict PATH...`: classify the emotion of every face in real photos.

Faces are found with OpenCV's bundled Haar cascade (no download), cropped, converted to 48x48
grayscale (the FER-2013 format) and classified. The cascade finds upright faces only (a head
rolled by 20 degrees is found about half as often, by 30 degrees one time in seven): when the
upright pass finds none, the image is searched again turned by `predict.roll_angles`, and a
face found that way is cropped from the turned image, so the classifier sees it upright. An
image that already is 48x48 is taken as a face crop and classified directly. Paths may be
folders (searched recursively for images). Images are read with Pillow: EXIF orientation
applied (a phone's portrait photo is upright), files over `predict.max_file_mb`, images over
`predict.max_pixels` (decompression bombs) and anything that is not a regular file are
reported, not read. The faces of `predict.batch_files` files go to the model in one call.

Default model: `models:/fer-emotion@champion` (the registry alias the evaluate stage sets);
`--model` takes a local `.keras` file, an MLflow model folder or any MLflow model URI.
Every per-file problem (missing, not an image, too large, no face, or any error while reading
it) is an entry for that file and the others still run; the exit code is 1 only when no file
could be read at all, or the model cannot be loaded.
"""

from __future__ import annotations

import logging
import stat
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fer_pipeline.artifacts.answers import (
    Box,
    FaceAnswer,
    ImageAnswer,
    ImageSize,
    Mode,
    PredictReport,
)
from fer_pipeline.artifacts.release import CASCADE_FILE, MIN_FACE_FRACTION, MIN_FACE_PX
from fer_pipeline.errors import FerError
from fer_pipeline.io import atomic_path
from fer_pipeline.params import MlflowParams, PredictParams, RegistryParams
from fer_pipeline.tracking import check_reachable, resolve_tracking_uri

FACE_SIZE = 48
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
# What Keras raises for a file it cannot read as a model (not a zip, foreign content).
KERAS_LOAD_ERRORS = (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile)

log = logging.getLogger(__name__)


class ImageError(FerError):
    """One input file cannot be used (missing, not an image, annotation not writable): it is
    reported in that file's result and the other files still run."""


@dataclass
class Classifier:
    """Anything that maps float32 (N, 48, 48, 1) pixels 0..255 to (N, C) probabilities."""

    model: Any
    classes: list[str]
    source: str
    kind: str   # keras | onnx (ONNX Runtime session) | pyfunc
    version: str | None = None   # the registered version, when loaded from the registry
    tta: str = "none"            # test-time augmentation (the release's: as it was measured)
    exported_at: str | None = None
    commit: str | None = None
    release_dir: str | None = None   # set when loaded from a release bundle
    temperature: float = 1.0         # fitted on val by evaluate (release, registry tag)
    min_confidence: float = 0.0      # faces below it (after scaling) are flagged uncertain

    def predict(self, faces: np.ndarray) -> np.ndarray:
        from fer_pipeline.tta import mean_probs

        def run(view: np.ndarray) -> np.ndarray:
            if self.kind == "onnx":
                out = self.model.run(None, {self.model.get_inputs()[0].name: view})[0]
            elif self.kind == "keras":
                out = self.model.predict(view, verbose=0)
            else:
                out = self.model.predict(view)
            return getattr(out, "values", out)

        mean = mean_probs(run, faces, self.tta)
        if self.temperature != 1.0:
            from fer_pipeline.calibration import apply_temperature

            mean = apply_temperature(mean, self.temperature)
        return mean


def default_model_uri(registry: RegistryParams) -> str:
    return f"models:/{registry.model_name}@{registry.champion_alias}"


def resolve_classifier(model: str | None, classes: list[str], registry: RegistryParams,
                       mlflow: MlflowParams, limits: PredictParams | None = None,
                       tta: str | None = None) -> Classifier:
    """The model `fer predict`/`fer serve` use: `model` when given; else the registry's champion
    when a tracking store has one; else the bundled release (fer export). Says which on stderr."""
    import sys

    limits = limits or PredictParams()
    if model:
        clf = load_classifier(model, classes, mlflow)
    else:
        missing = champion_missing(registry, mlflow)
        if missing is None:
            clf = load_classifier(default_model_uri(registry), classes, mlflow)
        else:
            from fer_pipeline.release import find_release

            folder = find_release(limits.release_dir)
            if folder is None:
                raise FerError(f"no model to use: {missing}, and no bundled release "
                               f"({limits.release_dir}/model.json). Train and evaluate "
                               f"(`dvc repro evaluate`), or pass --model "
                               f"models/<name>/model.keras.")
            clf = load_release(folder, limits.runtime)
            print(f"fer: {missing}: using the bundled release {clf.source} in {folder} (exported "
                  f"{clf.exported_at}, commit {clf.commit})", file=sys.stderr)
    if tta:
        clf.tta = tta
    clf.min_confidence = limits.min_confidence
    return clf


def champion_missing(registry: RegistryParams, mlflow: MlflowParams) -> str | None:
    """Why the registry's champion cannot be used (no store, unreachable, no alias), or None.
    A local store that does not exist is not created by asking."""
    from fer_pipeline.errors import TransientError

    uri = resolve_tracking_uri(mlflow.tracking_uri)
    local = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else (
        uri if "://" not in uri else uri[len("file://"):] if uri.startswith("file://") else None)
    if local is not None and not Path(local).exists():
        return f"no MLflow store at {local}"
    try:
        check_reachable(uri, mlflow.probe_timeout_s)
    except (TransientError, FerError) as exc:
        return f"tracking store {uri} unreachable ({exc})"
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).get_model_version_by_alias(registry.model_name, registry.champion_alias)
    except MlflowException:
        return f"no {registry.model_name}@{registry.champion_alias} in {uri}"
    return None


def load_release(folder: str | Path, runtime: str = "auto") -> Classifier:
    """The bundle `fer export` wrote: its classes and test-time augmentation, checked.
    runtime "auto" takes model.onnx with ONNX Runtime when both are there (no TensorFlow
    import: 0.6 s cold start instead of 10 s, docs/results.md), else model.keras."""
    from fer_pipeline.release import MODEL_FILE, ONNX_FILE, onnxruntime_available, read_release

    folder = Path(folder)
    man = read_release(folder)
    use_onnx = runtime == "onnx" or (runtime == "auto" and (folder / ONNX_FILE).is_file()
                                     and onnxruntime_available())
    if use_onnx and not (folder / ONNX_FILE).is_file():
        raise FerError(f"release {folder} has no {ONNX_FILE} (predict.runtime: onnx); re-run "
                       f"`fer export`, or set predict.runtime to auto or keras")
    model_file = folder / (ONNX_FILE if use_onnx else MODEL_FILE)
    clf = load_classifier(str(model_file), list(man.classes), None)
    # No local path in what answers show (JSON, the web page): name, model and runtime file.
    clf.source = f"release:{man.name}/{man.model} ({model_file.name})"
    clf.version = man.registered_version or None
    clf.tta = man.tta or "none"
    clf.temperature = float(man.calibration.temperature if man.calibration else 1.0)
    clf.exported_at, clf.commit = man.exported_at, man.git_commit
    clf.release_dir = str(folder)
    return clf


def load_classifier(ref: str, classes: list[str], mlflow: MlflowParams | None) -> Classifier:
    """Load a local .keras file, a local MLflow model folder, or an MLflow model URI.

    Every problem with `ref` (missing, unreadable, unknown to the registry, not a 48x48 face
    classifier for `classes`) is a FerError: one line, before any image is read.
    """
    path = Path(ref)
    if path.suffix == ".onnx":
        from fer_pipeline.release import onnx_errors, onnx_session

        return _checked(Classifier(onnx_session(path), list(classes), str(path), "onnx"),
                        onnx_errors())
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
    registered = _registry_version(ref)
    classes = ((registered.tags or {}).get("classes", "").split(",") if registered else []) \
        or list(classes)
    try:
        model = mlflow_lib.pyfunc.load_model(ref)
    except MlflowException as exc:
        raise FerError(_explain_mlflow_error(ref, uri, exc.message)) from exc
    except OSError as exc:
        raise FerError(f"cannot load {ref} from {uri}: {exc}") from exc
    clf = Classifier(model, classes, ref, "pyfunc", str(registered.version) if registered else None)
    clf.temperature = float((registered.tags or {}).get("temperature") or 1.0) if registered else 1.0
    return _checked(clf, (ValueError, MlflowException))


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


def _registry_version(ref: str) -> Any | None:
    """The registered version `ref` names (models:/NAME@ALIAS, models:/NAME/VERSION), if any:
    its tag `classes` gives the output order."""
    if not ref.startswith("models:/"):
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    body = ref[len("models:/"):]
    client = MlflowClient()
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        if "/" in body:
            name, version = body.split("/", 1)
            return client.get_model_version(name, version)
        return None
    except MlflowException as exc:
        raise FerError(_explain_mlflow_error(ref, client.tracking_uri, exc.message)) from exc


# ---- images and faces -------------------------------------------------------------------------

def read_image(path: Path, limits: PredictParams | None = None) -> np.ndarray:
    """BGR (or gray) uint8 image, EXIF orientation applied; ImageError with a per-file reason."""
    limits = limits or PredictParams()
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(st.st_mode):
        raise ImageError("is a folder, not an image")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("not a regular file (a pipe, device or socket): not read")
    if st.st_size == 0:
        raise ImageError("empty file")
    if st.st_size > limits.max_file_mb * 1e6:
        raise ImageError(f"file too large: {st.st_size / 1e6:.1f} MB > predict.max_file_mb "
                         f"{limits.max_file_mb:g}")
    return decode_image(path, limits)


def decode_bytes(data: bytes, limits: PredictParams | None = None) -> np.ndarray:
    """As read_image, for bytes received (an upload): the same limits, the same errors."""
    limits = limits or PredictParams()
    if not data:
        raise ImageError("empty body: no image")
    if len(data) > limits.max_file_mb * 1e6:
        raise ImageError(f"file too large: {len(data) / 1e6:.1f} MB > predict.max_file_mb "
                         f"{limits.max_file_mb:g}")
    import io

    return decode_image(io.BytesIO(data), limits)


def decode_image(source: Any, limits: PredictParams) -> np.ndarray:
    """Decode with Pillow: pixel limit from the header before decoding, EXIF orientation."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None      # our own limit below, checked before any decoding
    try:
        with Image.open(source) as im:
            w, h = im.size
            if w * h > limits.max_pixels:
                raise ImageError(f"image too large: {w}x{h} = {w * h:,} pixels > "
                                 f"predict.max_pixels {limits.max_pixels:,}")
            im = ImageOps.exif_transpose(im)
            return _to_array(im)
    except UnidentifiedImageError:
        raise ImageError("not an image (or an unsupported/corrupt image format)") from None
    except (OSError, SyntaxError, ValueError) as exc:   # truncated/corrupt data, bad headers
        raise ImageError(f"corrupt or truncated image: {exc}") from exc


def _to_array(im) -> np.ndarray:
    """Pillow image -> uint8 gray (H, W) or BGR (H, W, 3)."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):   # 16-bit / float: scale to 0..255
        a = np.asarray(im, dtype=np.float64)
        top = max(float(a.max()), 1.0)
        return np.clip(a * (255.0 / top), 0, 255).astype(np.uint8)
    if im.mode in ("L", "1", "P") and (im.mode != "P" or _palette_is_gray(im)):
        return np.asarray(im.convert("L"))
    if im.mode == "LA":
        return np.asarray(im.convert("L"))
    rgb = np.asarray(im.convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1])


def _palette_is_gray(im) -> bool:
    pal = im.getpalette() or []
    return all(pal[k] == pal[k + 1] == pal[k + 2] for k in range(0, len(pal) - 2, 3))


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
        path = Path(cv2.data.haarcascades) / CASCADE_FILE
        _CASCADE = cv2.CascadeClassifier(str(path))
        if _CASCADE.empty():
            raise FerError(f"cannot load OpenCV's Haar cascade {path}")
    side = min(gray.shape[:2])
    min_size = max(MIN_FACE_PX, side // MIN_FACE_FRACTION)
    boxes = _CASCADE.detectMultiScale(cv2.equalizeHist(gray), scaleFactor=1.1, minNeighbors=5,
                                      minSize=(min_size, min_size))
    boxes = [tuple(int(v) for v in b) for b in (boxes if len(boxes) else [])]
    return drop_nested(sorted(boxes, key=lambda b: -b[2] * b[3]))


def drop_nested(boxes: list[tuple[int, int, int, int]], inside: float = 0.6
                ) -> list[tuple[int, int, int, int]]:
    """Boxes (largest first) without those lying mostly (`inside` of their area) within a kept
    larger box: the cascade's false positives on a nose or mouth inside a face it found."""
    kept: list[tuple[int, int, int, int]] = []
    for b in boxes:
        if not any(_overlap(b, k) >= inside * b[2] * b[3] for k in kept):
            kept.append(b)
    return kept


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


@dataclass
class Face:
    """A face found in an image: its axis-aligned box in the image, its 48x48 crop (upright:
    taken from the turned image when it was found by the roll search), its roll in degrees
    (counter-clockwise, 0 for the upright pass) and, when rolled, the corners of its tilted box."""

    box: tuple[int, int, int, int]
    crop: np.ndarray
    roll: float = 0.0
    corners: np.ndarray | None = None


ROLL_MAX_SIDE = 1280   # the roll search runs on the image scaled to this longer side at most


class _Hit(NamedTuple):
    """One detection of the roll search, in the coordinates of the image searched."""

    angle: float          # the image was turned by this (degrees, counter-clockwise)
    corners: np.ndarray   # the tilted box's corners (4, 2)
    side: float           # its side
    crop: np.ndarray      # 48x48, from the turned image: upright


def find_faces(gray: np.ndarray, roll_angles: list[float] | tuple[float, ...] = ()) -> list[Face]:
    """Faces of a grayscale image, largest first: the upright pass of the cascade, then, only
    when it finds none, one pass per angle of `roll_angles` on the image turned by it."""
    boxes = detect_faces(gray)
    if boxes or not roll_angles:
        return [Face(b, crop_face(gray, b)) for b in boxes]
    return _rolled_faces(gray, roll_angles)


def _turned(gray: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """`gray` turned by `angle` degrees (counter-clockwise) on a canvas that holds all of it,
    and the affine map from the turned image back to `gray`."""
    import cv2

    h, w = gray.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    c, s = abs(m[0, 0]), abs(m[0, 1])
    nw, nh = int(np.ceil(h * s + w * c)), int(np.ceil(h * c + w * s))
    m[0, 2] += nw / 2 - w / 2
    m[1, 2] += nh / 2 - h / 2
    turned = cv2.warpAffine(gray, m, (nw, nh), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REPLICATE)
    return turned, cv2.invertAffineTransform(m)


def _rolled_faces(gray: np.ndarray, angles: list[float] | tuple[float, ...]) -> list[Face]:
    """The roll search: detections of every turned copy, grouped per face (centres within half
    a box side); each face keeps the detection at the median angle of its group, since the
    cascade fires within about +-15 degrees of upright, around the angle that uprights it."""
    import cv2

    h, w = gray.shape[:2]
    scale = min(1.0, ROLL_MAX_SIDE / max(h, w))
    small = cv2.resize(gray, (round(w * scale), round(h * scale)),
                       interpolation=cv2.INTER_AREA) if scale < 1.0 else gray
    hits: list[_Hit] = []
    for angle in angles:
        turned, back = _turned(small, float(angle))
        for x, y, bw, bh in detect_faces(turned):
            pts = np.array([[x, y], [x + bw, y], [x + bw, y + bh], [x, y + bh]], np.float64)
            corners = (pts @ back[:, :2].T + back[:, 2]) / scale
            hits.append(_Hit(float(angle), corners, bw / scale, crop_face(turned, (x, y, bw, bh))))
    groups: list[list[_Hit]] = []
    for hit in sorted(hits, key=lambda t: -t.side):
        centre = hit.corners.mean(axis=0)
        for g in groups:
            if np.linalg.norm(g[0].corners.mean(axis=0) - centre) < 0.5 * g[0].side:
                g.append(hit)
                break
        else:
            groups.append([hit])
    faces = []
    for g in groups:
        angle, corners, _, crop = sorted(g, key=lambda t: t.angle)[len(g) // 2]
        x0, y0 = np.clip(corners.min(axis=0), 0, None)
        x1, y1 = np.minimum(corners.max(axis=0), [w, h])
        box = (int(x0), int(y0), int(round(x1 - x0)), int(round(y1 - y0)))
        faces.append(Face(box, crop, roll=-angle, corners=corners))
    return sorted(faces, key=lambda f: -f.box[2] * f.box[3])


def crop_face(gray: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    import cv2

    x, y, w, h = box
    face = gray[y:y + h, x:x + w]
    interp = cv2.INTER_AREA if min(face.shape) > FACE_SIZE else cv2.INTER_CUBIC
    return cv2.resize(face, (FACE_SIZE, FACE_SIZE), interpolation=interp)


def annotate(img: np.ndarray, faces: list[FaceAnswer], out: Path,
             corners: list[np.ndarray | None] | None = None) -> None:
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
    for k, f in enumerate(faces):
        b = f.box
        x, y = int(b.x * scale), int(b.y * scale)
        w, h = int(b.w * scale), int(b.h * scale)
        tilted = corners[k] if corners else None
        if tilted is not None:   # a face found by the roll search: its tilted box
            cv2.polylines(canvas, [np.round(tilted * scale).astype(np.int32)], True,
                          (0, 200, 0), thick + 1)
        else:
            cv2.rectangle(canvas, (x, y), (x + w - 1, y + h - 1), (0, 200, 0), thick + 1)
        label = f"{f.emotion} {f.confidence:.2f}"
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


def expand_paths(paths: list[str | Path]) -> tuple[list[Path], list[ImageAnswer]]:
    """Files to classify (folders searched recursively for image suffixes, sorted) and entries
    for folders without any image, so every argument is accounted for."""
    files: list[Path] = []
    notes: list[ImageAnswer] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.suffix.lower() in IMAGE_SUFFIXES and not f.is_dir())
            if not found:
                notes.append(ImageAnswer(path=str(p), ok=False, error=f"folder has no image "
                                         f"files ({', '.join(sorted(IMAGE_SUFFIXES))})"))
            files += found
        else:
            files.append(p)
    return files, notes


@dataclass
class _Prepared:
    """One image read and its faces cropped, or why not (`error`)."""

    path: str
    image_size: ImageSize | None = None
    mode: Mode | None = None
    error: str | None = None
    unexpected: bool = False
    img: np.ndarray | None = None
    faces: list[Face] | None = None
    crops: np.ndarray | None = None


def _prepare(path: Path, detect: bool, limits: PredictParams) -> _Prepared:
    """Read one file and crop its faces; any failure becomes that file's entry."""
    return prepare(str(path), lambda: read_image(path, limits), detect, limits.roll_angles)


def prepare(name: str, load: Callable[[], np.ndarray], detect: bool,
            roll_angles: list[float] | tuple[float, ...] = ()) -> _Prepared:
    """Load one image (`load`) and crop its faces; any failure becomes its entry."""
    prep = _Prepared(name)
    try:
        img = load()
        gray = to_gray(img)
        h, w = gray.shape[:2]
        prep.image_size = ImageSize(width=int(w), height=int(h))
        if (h, w) == (FACE_SIZE, FACE_SIZE) or not detect:
            prep.mode = Mode.CROP if (h, w) == (FACE_SIZE, FACE_SIZE) else Mode.WHOLE
            faces = [Face((0, 0, w, h), crop_face(gray, (0, 0, w, h)))]
        else:
            prep.mode, faces = Mode.DETECT, find_faces(gray, roll_angles)
        prep.img, prep.faces = img, faces
        prep.crops = np.stack([f.crop for f in faces])[..., None] if faces else None
    except ImageError as exc:
        prep.error = str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad file (OpenCV, Pillow, OS) never stops a batch
        # Not a known file problem: maybe a bug. The file gets its entry and the rest goes on,
        # but the traceback is shown (stderr), so it is not mistaken for a bad image.
        import sys
        import traceback

        print(f"fer predict: {name}: unexpected {type(exc).__name__} (traceback below); the "
              f"other files go on", file=sys.stderr)
        traceback.print_exception(exc, file=sys.stderr)
        prep.error, prep.unexpected = f"{type(exc).__name__}: {exc}", True
    return prep


def classify_prepared(clf: Classifier, chunk: list[_Prepared],
                      annotate_to: list[Path | None] | None = None) -> list[ImageAnswer]:
    """Results for prepared images: all their faces in one model call."""
    crops = [c.crops for c in chunk if c.crops is not None]
    probs = clf.predict(np.concatenate(crops)) if crops else None
    out, offset = [], 0
    for k, prep in enumerate(chunk):
        mine = None
        if prep.crops is not None:
            mine = probs[offset:offset + len(prep.crops)]
            offset += len(prep.crops)
        out.append(_finish(prep, mine, clf.classes, annotate_to[k] if annotate_to else None,
                           clf.min_confidence))
    return out


def _finish(prep: _Prepared, probs: np.ndarray | None, classes: list[str],
            annotate_to: Path | None, min_confidence: float = 0.0) -> ImageAnswer:
    # Only what is known goes in: a key an image does not have is absent from its answer.
    known = {"path": prep.path, "image_size": prep.image_size, "mode": prep.mode}
    if prep.error is not None:
        return ImageAnswer(**{k: v for k, v in known.items() if v is not None}, ok=False,
                           error=prep.error, **({"unexpected": True} if prep.unexpected else {}))
    faces = []
    for f, p in zip(prep.faces or [], probs if probs is not None else [], strict=True):
        k = int(np.argmax(p))
        b = f.box
        faces.append(FaceAnswer(
            box=Box(x=b[0], y=b[1], w=b[2], h=b[3]), roll=round(f.roll, 1),
            emotion=classes[k], confidence=round(float(p[k]), 4),
            uncertain=bool(p[k] < min_confidence),
            probabilities={c: round(float(v), 4) for c, v in zip(classes, p, strict=True)}))
    answer = ImageAnswer(**known, ok=True, faces=faces,
                         **({} if faces else {"message": "no face found"}))
    if annotate_to is not None:
        try:
            annotate(prep.img, faces, annotate_to, [f.corners for f in prep.faces or []])
            answer.annotated = str(annotate_to)
        except ImageError as exc:
            answer.annotate_error = str(exc)
    return answer


def iter_predictions(clf: Classifier, files: list[Path], detect: bool = True,
                     annotate_out: str | Path | None = None,
                     limits: PredictParams | None = None) -> Iterator[ImageAnswer]:
    """One result per file, in order; the faces of `limits.batch_files` files go to the model
    in one call (a model call costs far more than its size)."""
    limits = limits or PredictParams()
    step = max(1, limits.batch_files)
    for start in range(0, len(files), step):
        paths = files[start:start + step]
        chunk = [_prepare(p, detect, limits) for p in paths]
        targets = [_annotate_path(Path(annotate_out), p, len(files)) if annotate_out else None
                   for p in paths]
        yield from classify_prepared(clf, chunk, targets)


def predict_files(paths: list[str | Path], model: str | None, classes: list[str],
                  registry: RegistryParams, mlflow: MlflowParams, detect: bool = True,
                  annotate_out: str | Path | None = None, limits: PredictParams | None = None,
                  on_result: Callable[[ImageAnswer, int, int], None] | None = None,
                  tta: str | None = None) -> PredictReport:
    """Classify faces in every file (folders: recursively): the model used and one answer per
    file.

    model=None loads the registry's champion. Raises FerError only when the model cannot be
    loaded; a file's own problem is in its result. `on_result(result, done, total)` sees each
    result as it is made (streamed output, progress).
    """
    clf = resolve_classifier(model, classes, registry, mlflow, limits, tta)
    files, notes = expand_paths(paths)
    total = len(files) + len(notes)
    results = []
    for r in [*notes, *iter_predictions(clf, files, detect, annotate_out, limits)]:
        results.append(r)
        if on_result:
            on_result(r, len(results), total)
    return PredictReport(model=clf.source, version=clf.version, tta=clf.tta,
                         temperature=clf.temperature, min_confidence=clf.min_confidence,
                         classes=clf.classes, results=results)


class Progress:
    """`files done/total, faces, files/s, ETA` on stderr: each second at most, and at the end."""

    def __init__(self, stream: Any, every_s: float = 1.0) -> None:
        self.stream, self.every_s = stream, every_s
        self.t0 = self.last = time.monotonic()
        self.faces = self.failed = 0

    def __call__(self, result: ImageAnswer, done: int, total: int) -> None:
        self.faces += len(result.faces or [])
        self.failed += not result.ok
        now = time.monotonic()
        if total > 1 and (now - self.last >= self.every_s or done == total):
            self.last = now
            rate = done / max(now - self.t0, 1e-9)
            eta = (total - done) / rate if rate else 0.0
            self.stream.write(f"predict: {done}/{total} files, {self.faces} faces, "
                              f"{self.failed} failed, {rate:.1f} files/s, ETA {eta:.0f} s\n")
            self.stream.flush()
