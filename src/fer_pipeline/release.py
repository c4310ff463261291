"""The released model: a self-describing bundle committed in git (`release/`).

`fer export` writes it from the evaluated champion; `fer predict` and `fer serve` fall back to
it when no `--model` is given and no tracking store has a champion, so a fresh clone classifies
photos right after setup. Layout: `model.keras` (weights, preprocessing inside), `model.onnx`
(the same network for ONNX Runtime: inference without importing TensorFlow, checked against the
Keras model on the test set at export), `model.json` (fer_pipeline.artifacts.release: classes
in output order, input spec, test-time augmentation, metrics, data hashes, git commit, recipe,
date, md5 of each model file, and every fact the card states), `MODEL_CARD.md` (rendered from
model.json), `confusion.png`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fer_pipeline.artifacts.answers import ReleaseCard
from fer_pipeline.artifacts.release import ReleaseManifest
from fer_pipeline.errors import FerError
from fer_pipeline.io import md5_file

RELEASE_DIR = Path("release")
MANIFEST = "model.json"
MODEL_FILE = "model.keras"
ONNX_FILE = "model.onnx"


def find_release(release_dir: str | Path = RELEASE_DIR, start: str | Path = ".") -> Path | None:
    """The bundle folder: `release_dir` itself when absolute; else `<dir>/release_dir` for the
    working directory and each folder above it, then beside this package's source (an editable
    install run from elsewhere). None when none holds a manifest."""
    release_dir = Path(release_dir)
    if release_dir.is_absolute():
        candidates = [release_dir]
    else:
        here = Path(start).resolve()
        candidates = [d / release_dir for d in (here, *here.parents)]
        candidates.append(Path(__file__).resolve().parents[2] / release_dir)
    return next((c for c in candidates if (c / MANIFEST).is_file()), None)


def read_release(folder: str | Path) -> ReleaseManifest:
    """The manifest, checked: the model file is there and is the one exported."""
    folder = Path(folder)
    try:
        manifest = ReleaseManifest.read(folder / MANIFEST, "re-run `fer export`")
    except FerError as exc:
        raise FerError(f"release {folder}: cannot read {MANIFEST}: {exc}") from exc
    model = folder / MODEL_FILE
    if not model.is_file():
        raise FerError(f"release {folder}: {MODEL_FILE} is missing (re-run `fer export`)")
    if manifest.model_md5 and md5_file(model) != manifest.model_md5:
        raise FerError(f"release {folder}: {MODEL_FILE} is not the exported file (md5 differs "
                       f"from {MANIFEST}); re-run `fer export` or restore it with git")
    onnx = manifest.onnx
    if onnx and (folder / ONNX_FILE).is_file() and md5_file(folder / ONNX_FILE) != onnx.md5:
        raise FerError(f"release {folder}: {ONNX_FILE} is not the exported file (md5 differs "
                       f"from {MANIFEST}); re-run `fer export` or restore it with git")
    return manifest


def release_card(folder: str | Path) -> ReleaseCard:
    """What `fer serve` answers on GET /model for a release: the manifest and the model card."""
    folder = Path(folder)
    card = folder / "MODEL_CARD.md"
    return ReleaseCard(manifest=read_release(folder),
                       model_card_markdown=card.read_text() if card.is_file() else None)


def onnx_session(path: str | Path) -> Any:
    """An ONNX Runtime CPU session for `path` (errors-only logging), or a FerError that says why
    (no ONNX Runtime installed, a file it cannot read). Shared by predict and export."""
    path = Path(path)
    if not path.is_file():
        raise FerError(f"model file not found: {path} (write it with `fer export`)")
    if not onnxruntime_available():
        raise FerError(f"{path} needs ONNX Runtime: `pip install onnxruntime`, or use the "
                       f"model.keras beside it (predict.runtime: keras)")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3          # errors only: no graph-optimizer chatter on stderr
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except onnx_errors() as exc:
        first = (str(exc).strip().splitlines() or ["unknown error"])[0]
        raise FerError(f"cannot load ONNX model {path}: {first}") from exc


def onnxruntime_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def onnx_errors() -> tuple[type[Exception], ...]:
    """What ONNX Runtime raises for a file or an input it cannot use."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return (state.Fail, state.InvalidArgument, state.InvalidGraph, state.InvalidProtobuf,
            state.NoSuchFile, state.NotImplemented, state.RuntimeException, ValueError)
