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
See fer_pipeline.release for the layout and who reads it.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from fer_pipeline import params as P
from fer_pipeline.errors import FerError, MissingInputError
from fer_pipeline.io import md5_file, staged_dir, write_json, write_text
from fer_pipeline.params import EvaluateParams, ModelParams, RegistryParams, TrainParams
from fer_pipeline.release import MANIFEST, MODEL_FILE, ONNX_FILE, onnx_session
from fer_pipeline.tracking import data_hashes, git_commit

log = logging.getLogger(__name__)
ONNX_TOLERANCE = 1e-4      # max |p_onnx - p_keras| over the test set (float32 reorderings: ~1e-6)
ONNX_OPSET = 17

METRIC_KEYS = ("val_accuracy", "test_accuracy", "test_accuracy_public", "test_accuracy_private",
               "test_accuracy_clean", "test_macro_f1", "test_weighted_f1", "test_top2_accuracy",
               "test_n", "test_n_clean", "images_per_second")


def _json(path: Path, hint: str) -> Any:
    if not path.is_file():
        raise MissingInputError(f"{path} not found: {hint}")
    return json.loads(path.read_text())


def champion_name(evaluate: EvaluateParams) -> str:
    """The model the registry's champion alias points at, as the last evaluate recorded it."""
    info = _json(Path(evaluate.reports_dir) / "champion.json", "run `dvc repro evaluate` first")
    registry = info.get("registry") or {}
    if info.get("decision") in ("kept", "not_asked"):
        before = registry.get("champion_before") or {}
        if before.get("model"):
            return str(before["model"])
    if not info.get("champion"):
        raise FerError("the last evaluate chose no champion (reports/evaluate/champion.json)")
    return str(info["champion"])


def export_release(models: dict[str, ModelParams], train: TrainParams, evaluate: EvaluateParams,
                   registry: RegistryParams, out_dir: str | Path = "release",
                   name: str | None = None, root: str | Path = ".") -> Path:
    """Write the bundle; `root` is the project (its reports/clean and reports/split describe the
    data in the model card)."""
    import keras

    name = name or champion_name(evaluate)
    if name not in models:
        raise FerError(f"no models.{name} in params (have: {', '.join(models)})")
    ev = Path(evaluate.reports_dir)
    metrics_all = _json(ev / "metrics.json", "run `dvc repro evaluate` first")
    if name not in metrics_all:
        raise FerError(f"{name} is not in {ev / 'metrics.json'}: evaluate it first "
                       f"(`fer evaluate --model {name}`)")
    m = metrics_all[name]
    if m.get("stale"):
        raise FerError(f"{name} was validated on other data than {evaluate.val_path} (stale): "
                       f"retrain it (`dvc repro train@{name}`) before releasing it")
    model_path = Path(train.models_dir) / name / "model.keras"
    if not model_path.is_file():
        raise MissingInputError(f"{model_path} not found: `dvc pull` or `dvc repro train@{name}`")
    champ = json.loads((ev / "champion.json").read_text())
    version = (champ.get("registry") or {}).get("version") if champ.get("champion") == name \
        else ((champ.get("registry") or {}).get("champion_before") or {}).get("version")
    train_metrics = _json(Path(train.reports_dir) / name / "metrics.json",
                          f"run `dvc repro train@{name}`")
    classes = _classes(ev, name, metrics_all)

    out = Path(out_dir)
    with staged_dir(out) as work:
        trained = keras.saving.load_model(model_path, compile=False)
        model = as_float32(trained)
        model.save(work / MODEL_FILE)            # no optimizer state: smaller, inference only
        onnx = export_onnx(model, work / ONNX_FILE, Path(evaluate.test_path))
        if model is not trained:
            onnx["from_mixed_precision"] = agreement(trained, model, Path(evaluate.test_path))
        cm = _confusion(ev / "confusion" / f"{name}.csv", classes)
        manifest = {
            "name": registry.model_name, "model": name, "arch": models[name].arch,
            "registered_version": version, "exported_at": dt.datetime.now(dt.UTC).isoformat(
                timespec="seconds"),
            "git_commit": git_commit(), "keras": keras.__version__,
            "classes": classes,
            "input": {"shape": [None, 48, 48, 1], "dtype": "float32",
                      "pixels": "raw grayscale 0..255 (scaling is inside the model)",
                      "faces": "OpenCV Haar frontal-face cascade; each box cropped, resized to "
                               "48x48 (INTER_AREA down, INTER_CUBIC up)"},
            "tta": evaluate.tta,
            "metrics": {k: m.get(k) for k in METRIC_KEYS if k in m},
            "per_class": m.get("per_class"),
            "training": {k: train_metrics.get(k) for k in ("epochs_run", "best_epoch",
                                                           "train_seconds", "trainable_params")},
            "data_md5": data_hashes([evaluate.val_path, evaluate.test_path]),
            "data_md5_train": train_metrics.get("data_md5_train"),
            "recipe": P.to_dict(models[name]),
            "trainable_params": int(sum(int(np.prod(w.shape)) for w in model.trainable_weights)),
            "model_md5": md5_file(work / MODEL_FILE),
            "model_bytes": (work / MODEL_FILE).stat().st_size,
            "onnx": onnx,
            "calibration": ({"temperature": m["temperature"], "fitted_on": "validation",
                             "tta": evaluate.tta, "bins": 15,
                             **{k: m.get(k) for k in ("test_ece", "test_ece_calibrated",
                                                      "test_nll", "test_nll_calibrated")}}
                            if m.get("temperature") else None),
            "robustness": ({k[len("robust_"):]: v for k, v in m.items() if k.startswith("robust_")}
                           if "robust_mean_accuracy" in m else None),
        }
        write_json(work / MANIFEST, manifest)
        for kind, dest in (("confusion_normalized", "confusion.png"),
                           ("reliability", "reliability.png")):
            png = ev / "images" / f"{name}_{kind}.png"
            if png.is_file():
                shutil.copyfile(png, work / dest)
        write_text(work / "MODEL_CARD.md", model_card(manifest, cm, _data_notes(Path(root))))
    log.info("released %s (v%s) to %s: %s, %.1f MB", name, version, out, MODEL_FILE,
             manifest["model_bytes"] / 1e6)
    return out


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


def _classes(ev: Path, name: str, metrics_all: dict[str, Any]) -> list[str]:
    per_class = metrics_all[name].get("per_class") or {}
    if not per_class:
        raise FerError(f"{ev / 'metrics.json'} has no per-class metrics for {name}")
    return list(per_class)


def _confusion(path: Path, classes: list[str]) -> np.ndarray | None:
    if not path.is_file():
        return None
    idx = {c: k for k, c in enumerate(classes)}
    cm = np.zeros((len(classes), len(classes)), int)
    with path.open() as fh:
        for row in csv.DictReader(fh):
            cm[idx[row["actual"]], idx[row["predicted"]]] += 1
    return cm


def _data_notes(root: Path) -> dict[str, Any]:
    notes: dict[str, Any] = {}
    for key, path in (("clean", "reports/clean/summary.json"), ("split", "reports/split/counts.json")):
        if (root / path).is_file():
            notes[key] = json.loads((root / path).read_text())
    return notes


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.1f}%"


def model_card(man: dict[str, Any], cm: np.ndarray | None, data: dict[str, Any]) -> str:
    m, classes = man["metrics"], man["classes"]
    lines = [
        f"# Model card: {man['name']} ({man['model']}"
        + (f", {man['arch']})" if man['arch'] != man['model'] else ")"), "",
        f"Exported {man['exported_at']} from commit `{man['git_commit']}`"
        + (f", registered version {man['registered_version']}" if man.get("registered_version")
           else "") + f"; Keras {man['keras']}; {man['trainable_params']:,} parameters; "
        f"test-time augmentation `{man['tta']}`.", "",
        "## Intended use",
        "Research, teaching and prototyping of facial-expression recognition: which of seven "
        "basic expressions (" + ", ".join(classes) + ") a frontal face shows in a photo. "
        "Outputs are probabilities over posed-looking expressions, not a reading of anyone's "
        "feelings.", "",
        "**Not for**: decisions about people (hiring, policing, insurance, education, health), "
        "surveillance, or inferring emotions, intent or truthfulness. Expressions differ across "
        "cultures and individuals; the labels are what annotators saw in a web image.", "",
        "## Data and its known problems",
        "FER-2013 (Goodfellow et al., 2013): 35,887 48x48 grayscale faces found by web image "
        "search, labelled once. Known problems: label noise (human accuracy is about 65%), heavy "
        "class imbalance (disgust is about 1.5% of the images), non-faces and near-blank images, "
        "duplicates and pictures shared between train and test, and a web-image population "
        "skewed in age, ethnicity and photographic style (no demographic labels exist to measure "
        "it).",
    ]
    clean = (data.get("clean") or {}).get("train") or {}
    if clean:
        by = clean.get("dropped_by_reason", {})
        lines.append(f"This pipeline's clean stage dropped {clean.get('dropped', 0):,} of "
                     f"{clean.get('input', 0):,} training images (test leak "
                     f"{by.get('test_leak', 0)}, duplicate {by.get('duplicate', 0)}, label "
                     f"conflict {by.get('label_conflict', 0)}, near-blank {by.get('near_blank', 0)})"
                     "; the test set stays whole and its flagged images are reported separately.")
    split = data.get("split") or {}
    if split.get("train"):
        lines.append("Training images per class: " + ", ".join(
            f"{c} {split['train'].get(c, 0):,}" for c in classes) + ".")
    lines += ["", "## Metrics",
              "Selected on validation; test read once by evaluate (the 7,178 FER-2013 test "
              "images, PublicTest + PrivateTest).", "",
              "| validation | test | PublicTest | PrivateTest | test without flagged images | "
              "macro F1 | top-2 |", "|---|---|---|---|---|---|---|",
              "| " + " | ".join(_pct(m.get(k)) for k in (
                  "val_accuracy", "test_accuracy", "test_accuracy_public", "test_accuracy_private",
                  "test_accuracy_clean")) + f" | {float(m.get('test_macro_f1', 0)):.3f} | "
              + _pct(m.get("test_top2_accuracy")) + " |", ""]
    mixed = (man.get("onnx") or {}).get("from_mixed_precision")
    if mixed:
        lines += [f"Trained and evaluated in {mixed['trained_policy']}; released as a float32 "
                  "copy of the same weights (runs on every CPU and in ONNX Runtime). On the "
                  f"{mixed['images']:,} test images, one view: top-1 agreement "
                  f"{_pct(mixed['top1_agreement'])}, accuracy {_pct(mixed['accuracy_float32'])} "
                  f"(as trained: {_pct(mixed['accuracy_as_trained'])}).", ""]
    per_class = man.get("per_class") or {}
    if per_class:
        lines += ["| class | precision | recall | F1 | test images |", "|---|---|---|---|---|"]
        lines += [f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | "
                  f"{v['support']} |" for c, v in per_class.items()]
        lines.append("")
    if cm is not None:
        rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        lines += ["## Confusion matrix (test, row-normalised: actual -> predicted)", "",
                  "| actual \\ predicted | " + " | ".join(classes) + " |",
                  "|---|" + "---|" * len(classes)]
        lines += [f"| {c} | " + " | ".join(f"{v:.2f}" for v in rows[k]) + " |"
                  for k, c in enumerate(classes)]
        lines += ["", "![confusion](confusion.png)", ""]
    rec, tr = man.get("recipe") or {}, man.get("training") or {}
    if rec:
        aug = {k: v for k, v in (rec.get("augmentation") or {}).items()
               if v and k != "fill_mode"}
        keys = ("epochs", "batch_size", "optimizer", "learning_rate", "weight_decay",
                "lr_schedule", "label_smoothing", "width", "conv_filters", "blocks_per_stage",
                "dropout")
        lines += ["## Training",
                  f"Recipe (`models.{man['model']}` in params.yaml at export): "
                  + ", ".join(f"{k} {rec[k]}" for k in keys if rec.get(k) not in (None, ""))
                  + "; augmentation " + (", ".join(f"{k} {v}" for k, v in aug.items()) or "none")
                  + f". Trained {tr.get('epochs_run')} epochs in {tr.get('train_seconds') or 0:,.0f} s "
                  f"(best epoch {tr.get('best_epoch')}), from scratch (no pretrained weights); "
                  f"training data md5 `{man.get('data_md5_train')}`.", ""]
    rob = man.get("robustness")
    if rob:
        names = [k for k in rob if k not in ("clean_accuracy", "n", "mean_accuracy", "worst_drop",
                                             "worst_corruption")]
        lines += ["## Robustness",
                  f"Accuracy on {rob['n']:,} test images without test-time augmentation, clean "
                  f"and under each corruption of the suite (mean over three severities; "
                  f"definitions in src/fer_pipeline/corruptions.py):", "",
                  "| clean | " + " | ".join(names) + " | mean | worst drop |",
                  "|---|" + "---|" * (len(names) + 2),
                  f"| {_pct(rob['clean_accuracy'])} | " + " | ".join(_pct(rob[n]) for n in names)
                  + f" | {_pct(rob['mean_accuracy'])} | {100 * rob['worst_drop']:.1f} pt "
                  f"({rob['worst_corruption']}) |", ""]
    cal = man.get("calibration")
    if cal:
        lines += ["## Calibration",
                  f"Probabilities shown by `fer predict` and `fer serve` are temperature-scaled: "
                  f"T = {cal['temperature']:.3f}, fitted on the validation split (NLL, "
                  f"test-time augmentation `{cal['tta']}`). On the test set, expected calibration "
                  f"error (15 bins) {_pct(cal['test_ece'])} before, "
                  f"{_pct(cal['test_ece_calibrated'])} after; negative log-likelihood "
                  f"{cal['test_nll']:.3f} before, {cal['test_nll_calibrated']:.3f} after. Faces "
                  "whose top probability is below `predict.min_confidence` are flagged uncertain.",
                  "", "![reliability](reliability.png)", ""]
    lines += ["## Limits",
              "- Frontal faces only: the Haar cascade misses profiles, tilted or partly hidden "
              "faces, and very small faces (under about 1/12 of the image side).",
              "- 48x48 grayscale input: fine detail and colour are lost; low light, heavy "
              "shadows, glasses and masks lower accuracy.",
              "- Weak classes: see the per-class table (disgust and fear are the hardest).",
              "- Calibration was measured on FER-2013's test images; on other photos "
              "(lighting, pose, camera) probabilities can again be over-confident." if cal else
              "- Probabilities are not calibrated; do not read them as certainty.",
              ""]
    return "\n".join(lines)
