"""`fer export`: the evaluated champion as a release bundle committed in git (release/).

Its own job (like registry promotion in peers), not part of the evaluate stage: editing it
never reruns `dvc repro evaluate`.

Reads only what the pipeline left (reports/evaluate, reports/train, models/, reports/clean,
reports/split) and params; writes `release/` whole or not at all (staged folder). The model is
re-saved without optimizer state, and exported to ONNX (`keras.Model.export(format="onnx")`)
for inference without TensorFlow; the ONNX file is checked against the Keras model on every
test image (top-1 must agree, probabilities within ONNX_TOLERANCE) or the export fails. A
model trained under a mixed policy (bf16 CPUs, GPUs) is released as a float32 copy of its
weights; how closely it agrees with the model as trained is recorded in the manifest.
The manifest (fer_pipeline.artifacts.release.ReleaseManifest) holds every fact the model card
states; the card is rendered from it alone (templates/model_card.md.j2), and `fer export
--card-only` re-renders it for a committed release without re-exporting the model.
See fer_pipeline.release for the layout and who reads it.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from fer_pipeline import params as P
from fer_pipeline.artifacts.evaluation import (
    ChampionRecord,
    EvaluationMetrics,
    Unit,
    card_columns,
    release_metrics,
)
from fer_pipeline.artifacts.release import (
    ROBUSTNESS_PREFIX,
    CleanFacts,
    DataFacts,
    Detection,
    InputSpec,
    Preprocessing,
    ReleaseCalibration,
    ReleaseManifest,
    ReleaseRobustness,
    TrainingFacts,
)
from fer_pipeline.artifacts.train import TrainMetrics
from fer_pipeline.errors import FerError, MissingInputError
from fer_pipeline.io import md5_file, staged_dir, write_text
from fer_pipeline.params import EvaluateParams, ModelParams, PredictParams, RegistryParams, TrainParams
from fer_pipeline.release import MANIFEST, MODEL_FILE, ONNX_FILE, onnx_session, read_release
from fer_pipeline.tracking import data_hashes, git_commit

log = logging.getLogger(__name__)
ONNX_TOLERANCE = 1e-4      # max |p_onnx - p_keras| over the test set (float32 reorderings: ~1e-6)
ONNX_OPSET = 17
CARD = "MODEL_CARD.md"
INPUT = InputSpec(shape=[None, 48, 48, 1], dtype="float32",
                  pixels="raw grayscale 0..255 (scaling is inside the model)",
                  faces="OpenCV Haar frontal-face cascade; each box cropped, resized to 48x48 "
                        "(INTER_AREA down, INTER_CUBIC up)")


def champion_name(evaluate: EvaluateParams) -> str:
    """The model the registry's champion alias points at, as the last evaluate recorded it."""
    record = ChampionRecord.read(Path(evaluate.reports_dir) / "champion.json",
                                 "run `dvc repro evaluate` first")
    name = record.alias_holder()
    if not name:
        raise FerError("the last evaluate chose no champion (reports/evaluate/champion.json)")
    return name


def export_release(models: dict[str, ModelParams], train: TrainParams, evaluate: EvaluateParams,
                   registry: RegistryParams, out_dir: str | Path = "release",
                   name: str | None = None, root: str | Path = ".",
                   predict: PredictParams | None = None) -> Path:
    """Write the bundle; `root` is the project (its reports/clean and reports/split describe the
    data in the model card); `predict` says what face detection does (the card states it)."""
    import keras

    name = name or champion_name(evaluate)
    if name not in models:
        raise FerError(f"no models.{name} in params (have: {', '.join(models)})")
    ev = Path(evaluate.reports_dir)
    evaluations = EvaluationMetrics.read(ev / "metrics.json", "run `dvc repro evaluate` first")
    if name not in evaluations:
        raise FerError(f"{name} is not in {ev / 'metrics.json'}: evaluate it first "
                       f"(`fer evaluate --model {name}`)")
    m = evaluations[name]
    if m.stale:
        raise FerError(f"{name} was validated on other data than {evaluate.val_path} (stale): "
                       f"retrain it (`dvc repro train@{name}`) before releasing it")
    model_path = Path(train.models_dir) / name / "model.keras"
    if not model_path.is_file():
        raise MissingInputError(f"{model_path} not found: `dvc pull` or `dvc repro train@{name}`")
    version = ChampionRecord.read(ev / "champion.json").version_of(name)
    trained = TrainMetrics.read(Path(train.reports_dir) / name / "metrics.json",
                                f"run `dvc repro train@{name}`")
    if not m.per_class:
        raise FerError(f"{ev / 'metrics.json'} has no per-class metrics for {name}")
    classes = list(m.per_class)
    mp = models[name]

    out = Path(out_dir)
    with staged_dir(out) as work:
        trained_model = keras.saving.load_model(model_path, compile=False)
        model = as_float32(trained_model)
        model.save(work / MODEL_FILE)            # no optimizer state: smaller, inference only
        onnx = export_onnx(model, work / ONNX_FILE, Path(evaluate.test_path))
        if model is not trained_model:
            onnx["from_mixed_precision"] = agreement(trained_model, model, Path(evaluate.test_path))
        cm = _confusion(ev / "confusion" / f"{name}.csv", classes)
        man = ReleaseManifest(
            name=registry.model_name, model=name, arch=mp.arch, registered_version=version,
            exported_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            git_commit=git_commit(), keras=keras.__version__, classes=classes, input=INPUT,
            tta=evaluate.tta, metrics=release_metrics(m), per_class=m.per_class,
            training=TrainingFacts(epochs_run=trained.epochs_run, best_epoch=trained.best_epoch,
                                   train_seconds=trained.train_seconds,
                                   trainable_params=trained.trainable_params),
            data_md5=data_hashes([evaluate.val_path, evaluate.test_path]),
            data_md5_train=trained.data_md5_train, recipe=P.to_dict(mp),
            trainable_params=int(sum(int(np.prod(w.shape)) for w in model.trainable_weights)),
            model_md5=md5_file(work / MODEL_FILE), model_bytes=(work / MODEL_FILE).stat().st_size,
            onnx=onnx, calibration=_calibration(m, evaluate.tta), robustness=_robustness(m),
            **_card_facts(trained, mp.preprocessing, mp.weights if mp.is_transfer else None,
                          predict or PredictParams(), cm, Path(root)))
        man.write(work / MANIFEST)
        for kind, dest in (("confusion_normalized", "confusion.png"),
                           ("reliability", "reliability.png")):
            png = ev / "images" / f"{name}_{kind}.png"
            if png.is_file():
                shutil.copyfile(png, work / dest)
        write_text(work / CARD, model_card(man))
    log.info("released %s (v%s) to %s: %s, %.1f MB", name, version, out, MODEL_FILE,
             man.model_bytes / 1e6)
    return out


def _calibration(m: Any, tta: str) -> ReleaseCalibration | None:
    if not m.temperature:
        return None
    return ReleaseCalibration(temperature=m.temperature, fitted_on="validation", tta=tta, bins=15,
                              **{k: m.value(k) for k in ("test_ece", "test_ece_calibrated",
                                                         "test_nll", "test_nll_calibrated")})


def _robustness(m: Any) -> Any:
    """The suite's metrics without their prefix (corruptions in the order they were run)."""
    if m.robust_mean_accuracy is None:
        return None
    values = {k[len(ROBUSTNESS_PREFIX):]: v for k, v in m.to_data().items()
              if k.startswith(ROBUSTNESS_PREFIX)}
    return ReleaseRobustness.parse(values, "robustness")


def _card_facts(trained: TrainMetrics | None, preprocessing: str | None, weights: str | None,
                predict: PredictParams, cm: np.ndarray | None, root: Path) -> dict[str, Any]:
    """The manifest's facts that only the model card uses: how the model was made (pretrained
    or not, preprocessing), what face detection handles, the confusion counts, the data notes."""
    pretrained = trained.pretrained if trained is not None else None
    return {"pretrained": pretrained, "pretrained_weights": weights if pretrained else None,
            "preprocessing": Preprocessing(preprocessing) if preprocessing else None,
            "detection": Detection.haar(predict.roll_angles),
            "confusion": cm.tolist() if cm is not None else None, "data": _data_facts(root)}


def refresh_card(folder: str | Path, models: dict[str, ModelParams], train: TrainParams,
                 evaluate: EvaluateParams, predict: PredictParams, root: str | Path = ".") -> Path:
    """`fer export --card-only`: the facts the card states added to a release's manifest
    (from its recipe, its model's training metrics, params predict.* and the data reports),
    then model.json and MODEL_CARD.md rewritten. The model files are not touched; inputs from
    another training or evaluation than the released one are refused."""
    folder = Path(folder)
    man = read_release(folder)
    name = man.model
    trained = None
    path = Path(train.reports_dir) / name / "metrics.json"
    if path.is_file():
        trained = TrainMetrics.read(path)
        if (trained.epochs_run, trained.train_seconds, trained.data_md5_train) != (
                man.training.epochs_run, man.training.train_seconds, man.data_md5_train):
            raise FerError(f"{path} is another training of {name} than the released one "
                           f"(epochs, seconds or data differ from {folder / MANIFEST}): "
                           f"re-export instead (`fer export --model {name}`)")
    preprocessing = man.recipe.get("preprocessing") or (
        models[name].preprocessing if name in models else None)
    cm = man.confusion
    if cm is None:
        counts = _confusion(Path(evaluate.reports_dir) / "confusion" / f"{name}.csv", man.classes)
        if counts is not None and abs(_accuracy(counts) - man.metrics.test_accuracy) > 1e-9:
            raise FerError(f"{evaluate.reports_dir}/confusion/{name}.csv is not the evaluation "
                           f"the release was measured on (its accuracy differs): re-export")
        cm = counts.tolist() if counts is not None else None
    facts = _card_facts(trained, preprocessing, man.recipe.get("weights"), predict,
                        np.asarray(cm) if cm is not None else None, Path(root))
    facts["pretrained"] = man.pretrained if trained is None else facts["pretrained"]
    man = ReleaseManifest.parse({**man.to_data(), **facts}, str(folder / MANIFEST))
    man.write(folder / MANIFEST)
    write_text(folder / CARD, model_card(man))
    log.info("re-rendered %s and %s from the manifest", folder / CARD, folder / MANIFEST)
    return folder


def _accuracy(cm: np.ndarray) -> float:
    return float(np.trace(cm) / max(cm.sum(), 1))


def _float32_policies(obj: Any) -> Any:
    if isinstance(obj, dict):
        if obj.get("class_name") == "DTypePolicy" and isinstance(obj.get("config"), dict):
            return {**obj, "config": {**obj["config"], "name": "float32"}}
        return {k: _float32_policies(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_float32_policies(v) for v in obj]
    return obj


def as_float32(model: Any) -> Any:
    """`model` itself when it computes in float32, else a float32 copy with the same weights.

    A model trained under a mixed policy (bf16 on AMX/AVX512-BF16 CPUs, fp16 on GPUs) keeps
    its weights in float32 but computes in 16 bits; its ONNX graph mixes float16 and bfloat16
    and ONNX Runtime refuses to load it. The float32 copy loses nothing and runs on every CPU."""
    import keras

    cfg = keras.saving.serialize_keras_object(model)
    fixed = _float32_policies(cfg)
    if fixed == cfg:
        return model
    copy = keras.saving.deserialize_keras_object(fixed)
    copy.set_weights(model.get_weights())
    return copy


def agreement(a: Any, b: Any, check_data: Path, batch: int = 512) -> dict[str, Any]:
    """How far the model as trained (`a`) and its float32 copy (`b`) differ on a split (single
    view): top-1 agreement, largest probability difference, and each one's accuracy."""
    from fer_pipeline.arrays import load_split

    split = load_split(check_data)
    x, y = split.x.astype(np.float32), np.asarray(split.y)
    pa, pb = (np.asarray(m.predict(x, batch_size=batch, verbose=0), np.float32) for m in (a, b))
    policy = next((la.dtype_policy.name for la in a.layers
                   if la.dtype_policy.name != "float32"), "float32")
    out = {"trained_policy": policy, "images": int(len(x)),
           "top1_agreement": float((pa.argmax(1) == pb.argmax(1)).mean()),
           "max_abs_diff": float(np.abs(pa - pb).max()),
           "accuracy_as_trained": float((pa.argmax(1) == y).mean()),
           "accuracy_float32": float((pb.argmax(1) == y).mean())}
    log.info("float32 copy vs the model as trained (%s), %d images, one view: top-1 agreement "
             "%.4f, accuracy %.4f vs %.4f", policy, len(x), out["top1_agreement"],
             out["accuracy_float32"], out["accuracy_as_trained"])
    return out


def export_onnx(model: Any, path: Path, check_data: Path, batch: int = 512) -> dict[str, Any]:
    """`model` as ONNX at `path`, checked on every image of `check_data` (a split's .npz):
    the same top-1 class and probabilities within ONNX_TOLERANCE, else a FerError."""
    import contextlib
    import io

    import onnxruntime as ort

    from fer_pipeline.arrays import load_split

    model(np.zeros((1, *model.input_shape[1:]), np.float32))  # a loaded model must be called once
    with contextlib.redirect_stdout(io.StringIO()):      # tf2onnx/Keras print while exporting
        model.export(str(path), format="onnx", verbose=False, opset_version=ONNX_OPSET)
    sess = onnx_session(path)
    name = sess.get_inputs()[0].name
    x = load_split(check_data).x
    agree, worst = 0, 0.0
    for i in range(0, len(x), batch):
        xb = x[i:i + batch].astype(np.float32)
        want = np.asarray(model.predict(xb, verbose=0), np.float32)
        got = sess.run(None, {name: xb})[0]
        agree += int((want.argmax(1) == got.argmax(1)).sum())
        worst = max(worst, float(np.abs(want - got).max()))
    check = {"data": str(check_data), "images": int(len(x)), "top1_agreement": agree / max(len(x), 1),
             "max_abs_diff": worst, "tolerance": ONNX_TOLERANCE}
    if agree != len(x) or worst > ONNX_TOLERANCE:
        raise FerError(f"ONNX export of the model disagrees with Keras on {check_data}: "
                       f"{len(x) - agree} of {len(x)} top-1 differ, max |diff| {worst:.2e} "
                       f"(tolerance {ONNX_TOLERANCE}); release not written")
    log.info("ONNX export checked on %d test images: top-1 identical, max |diff| %.1e",
             len(x), worst)
    return {"file": ONNX_FILE, "opset": ONNX_OPSET, "md5": md5_file(path),
            "bytes": path.stat().st_size, "runtime": f"onnxruntime {ort.__version__}",
            "check": check}


def _confusion(path: Path, classes: list[str]) -> np.ndarray | None:
    if not path.is_file():
        return None
    idx = {c: k for k, c in enumerate(classes)}
    cm = np.zeros((len(classes), len(classes)), int)
    with path.open() as fh:
        for row in csv.DictReader(fh):
            cm[idx[row["actual"]], idx[row["predicted"]]] += 1
    return cm


def _data_facts(root: Path) -> DataFacts | None:
    """What clean dropped from the training images and the training images per class, from the
    data stages' reports (reports/clean/summary.json, reports/split/counts.json)."""
    import json

    clean_path, split_path = root / "reports/clean/summary.json", root / "reports/split/counts.json"
    clean = json.loads(clean_path.read_text()).get("train") if clean_path.is_file() else None
    split = json.loads(split_path.read_text()).get("train") if split_path.is_file() else None
    if not clean and not split:
        return None
    return DataFacts(
        clean_train=CleanFacts(input=clean.get("input", 0), dropped=clean.get("dropped", 0),
                               dropped_by_reason=clean.get("dropped_by_reason", {}))
        if clean else None,
        train_per_class={k: int(v) for k, v in split.items() if k != "total"} if split else None)


def _pct(v: Any) -> str:
    return Unit.FRACTION.card(v)


def _angles(angles: list[float]) -> str:
    words = [f"{a:g}" for a in angles]
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else "".join(words)


def _origin(man: ReleaseManifest) -> str:
    """How training started, as the training metrics recorded it."""
    if man.pretrained is None:
        return "its starting weights (pretrained or not) were not recorded"
    if not man.pretrained:
        return "from scratch (no pretrained weights)"
    weights = man.pretrained_weights or "unnamed"
    return f"starting from pretrained weights ({'ImageNet' if weights == 'imagenet' else weights})"


RECIPE_KEYS = ("epochs", "batch_size", "optimizer", "learning_rate", "weight_decay", "lr_schedule",
               "label_smoothing", "width", "conv_filters", "blocks_per_stage", "dropout")


def _card_view(man: ReleaseManifest) -> dict[str, Any]:
    """Values the template shows that take more than a lookup in the manifest."""
    rec = man.recipe or {}
    aug = {k: v for k, v in (rec.get("augmentation") or {}).items() if v and k != "fill_mode"}
    data = man.data or DataFacts()
    per_class = data.train_per_class or {}
    columns = card_columns()
    view: dict[str, Any] = {
        "metric_heads": [m.card for m in columns],
        "metric_cells": [m.unit.card(man.metrics.value(m.key)) for m in columns],
        "clean": data.clean_train,
        "train_per_class": ", ".join(f"{c} {per_class.get(c, 0):,}" for c in man.classes)
        if per_class else "",
        "recipe": ", ".join(f"{k} {rec[k]}" for k in RECIPE_KEYS if rec.get(k) not in (None, "")),
        "augmentation": ", ".join(f"{k} {v}" for k, v in aug.items()) or "none",
        "origin": _origin(man),
        "detection": man.detection,
        "roll_angles": _angles(man.detection.roll_angles) if man.detection else "",
        "confusion": None, "corruptions": [], "corrupted": {},
    }
    if man.confusion:
        cm = np.asarray(man.confusion, dtype=float)
        rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        view["confusion"] = [(c, [f"{v:.2f}" for v in rows[k]]) for k, c in enumerate(man.classes)]
    if man.robustness is not None:
        view["corrupted"] = man.robustness.family("{}")
        view["corruptions"] = list(view["corrupted"])
    return view


def model_card(man: ReleaseManifest) -> str:
    """MODEL_CARD.md, rendered from the manifest alone (templates/model_card.md.j2)."""
    from importlib import resources

    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters["pct"] = _pct
    text = resources.files("fer_pipeline.templates").joinpath("model_card.md.j2").read_text()
    return env.from_string(text).render(man=man, v=_card_view(man))
