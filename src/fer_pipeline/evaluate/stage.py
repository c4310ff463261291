"""Evaluate stage: `fer evaluate` scores every trained model on the test split, compares them,
logs the evaluation to each model's MLflow run and registers the champion.

One implementation, `evaluate_models`, used by the CLI, DVC (`evaluate` stage), flows and tests.
The test split is read here and nowhere else; the champion is chosen by validation accuracy
from training (reports/train/<name>/metrics.json), never by a test number. What training
leaves is read from files (model, reports), so this stage imports nothing from `train`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fer_pipeline.errors import FerError, MissingInputError, ParamsError
from fer_pipeline.io import md5_file, staged_dir, write_json
from fer_pipeline.params import EvaluateParams, MlflowParams, ModelParams, RegistryParams, TrainParams
from fer_pipeline.tracking import data_hashes, setup_tracking

log = logging.getLogger(__name__)

TRAIN_KEYS = ("arch", "pretrained", "trainable_params", "epochs_run", "best_epoch",
              "train_images", "train_seconds", "val_accuracy")


@dataclass
class EvaluationResult:
    models: dict[str, dict[str, Any]]       # per model: comparison row + all test metrics
    champion: str | None
    registry: dict[str, Any] | None
    reports_dir: Path
    skipped: list[str] = field(default_factory=list)


def _read_json(path: Path, what: str, stage: str) -> dict[str, Any]:
    if not path.is_file():
        raise MissingInputError(f"{what} not found: {path}. Run `dvc repro {stage}` first.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FerError(f"{what} {path} is not valid JSON ({exc}); rerun `dvc repro {stage}`") from exc


def select_models(models: dict[str, ModelParams], models_dir: Path,
                  names: list[str] | None) -> tuple[list[str], list[str]]:
    """(models to evaluate, models skipped because they are not trained)."""
    wanted = list(names or models)
    unknown = [n for n in wanted if n not in models]
    if unknown:
        raise FerError(f"no models.{unknown[0]} in params (have: {', '.join(models)})")
    found = [n for n in wanted if (models_dir / n / "model.keras").is_file()]
    missing = [n for n in wanted if n not in found]
    hint = ", ".join(f"`dvc repro train@{n}`" for n in missing)
    if names and missing:
        raise MissingInputError(f"model(s) not trained: {', '.join(missing)} (no {models_dir}/<name>/"
                                f"model.keras). Run {hint} (or `fer train --model NAME`).")
    if not found:
        raise MissingInputError(f"no trained model in {models_dir}/ for {', '.join(wanted)}. "
                                f"Run `dvc repro train` first.")
    for n in missing:
        log.warning("%s is not trained (no %s): skipped. Run `dvc repro train@%s`.", n,
                    models_dir / n / "model.keras", n)
    return found, missing


def evaluate_models(models: dict[str, ModelParams], train: TrainParams, mlflow: MlflowParams,
                    evaluate: EvaluateParams, registry: RegistryParams,
                    names: list[str] | None = None, register: bool | None = None,
                    log_mlflow: bool = True, promote: bool | None = None) -> EvaluationResult:
    """Evaluate trained models on the test split, write reports, log to MLflow, register.

    `models` are the recipes of params.yaml (which names exist, each one's arch); `train` says
    where training left models and reports. register=None follows `registry.enabled`.
    log_mlflow=False (and no register) runs without any tracking store: only the report files.
    promote=None follows `registry.promote`, except that a `names` subset never promotes;
    True/False decide (the policy still has to agree for True: see registry.py).
    """
    from fer_pipeline.arrays import load_split
    from fer_pipeline.champion import choose_champion
    from fer_pipeline.corruptions import CORRUPTIONS
    from fer_pipeline.evaluate import metrics as M
    from fer_pipeline.evaluate import report as R
    from fer_pipeline.evaluate.registry import (
        Candidate,
        import_local_model,
        log_evaluation,
        register_and_decide,
    )
    from fer_pipeline.keras_mlflow import model_in_store

    unknown = [c for c in evaluate.robustness.corruptions if c not in CORRUPTIONS]
    if evaluate.robustness.enabled and unknown:
        raise ParamsError(f"evaluate.robustness.corruptions: unknown {', '.join(unknown)} "
                          f"(known: {', '.join(CORRUPTIONS)})")
    register = registry.enabled if register is None else register
    train_reports = Path(train.reports_dir)
    models_dir = Path(train.models_dir)
    found, skipped = select_models(models, models_dir, names)
    out = Path(evaluate.reports_dir)

    # Cheap checks first: training reports of every model, tracking store reachable.
    train_metrics = {n: _read_json(train_reports / n / "metrics.json", f"training metrics of {n}",
                                   f"train@{n}") for n in found}
    if not Path(evaluate.val_path).is_file():
        raise MissingInputError(f"validation split {evaluate.val_path} not found (which models are "
                                f"comparable is decided on it). Run `dvc repro split` first.")
    val_md5 = md5_file(evaluate.val_path)
    stale = [n for n in found if _trained_on(n, train_metrics[n], evaluate.val_path) != val_md5]
    for n in stale:
        log.warning("%s was validated on other data than %s: reported as stale, not ranked. "
                    "Run `dvc repro train@%s`.", n, evaluate.val_path, n)
    mlflow_info = {n: (json.loads(p.read_text()) if (p := train_reports / n / "mlflow.json").is_file()
                       else {}) for n in found}
    to_import: set[str] = set()
    if log_mlflow or register:
        uri = setup_tracking(mlflow.tracking_uri, mlflow.experiment, mlflow.probe_timeout_s)
        log.info("MLflow tracking: %s", uri)
        # A model logged into another store (pulled with DVC into a fresh clone): its local
        # file is logged here instead, so it can be evaluated, registered and served.
        to_import = {n for n in found if mlflow_info[n].get("model_uri")
                     and not model_in_store(mlflow_info[n]["model_uri"])}

    test = load_split(evaluate.test_path)
    classes = test.classes
    val = load_split(evaluate.val_path) if evaluate.calibrate else None
    import keras

    log.info("Keras backend: %s", keras.backend.backend())
    # Every file goes to a staging folder that replaces reports/evaluate only when all is
    # written: a failure (a model that does not load, a registry error) leaves the old reports.
    with staged_dir(out) as work:
        results: dict[str, dict[str, Any]] = {}
        metrics_out: dict[str, dict[str, Any]] = {}
        rp = evaluate.robustness
        for i, name in enumerate(found, 1):
            # Scoring one model takes minutes on a CPU: say what is running before it runs.
            log.info("scoring %s (%d/%d): %d test images (tta %s)%s%s", name, i, len(found),
                     len(test.y), evaluate.tta,
                     f", {len(val.y)} val images (calibration)" if val is not None else "",
                     f", corruption suite ({len(rp.corruptions)} x {len(rp.severities)} passes)"
                     if rp.enabled else "")
            model = keras.saving.load_model(models_dir / name / "model.keras", compile=False)
            n_out = int(model.output_shape[-1])
            if n_out != len(classes):
                raise FerError(f"{name} predicts {n_out} classes but the test split has "
                               f"{len(classes)} ({', '.join(classes)}); retrain it: "
                               f"`dvc repro train@{name}`")
            if name in to_import:
                run_id, model_uri = import_local_model(name, model, models_dir / name / "model.keras",
                                                       test.x[:4], mlflow_info[name])
                mlflow_info[name] = {**mlflow_info[name], "run_id": run_id, "model_uri": model_uri,
                                     "imported": True}
            pred = M.predict_proba(model, test.x, evaluate.batch_size, evaluate.tta)
            val_probs = (M.predict_proba(model, val.x, evaluate.batch_size, evaluate.tta).probs
                         if val is not None else None)
            rob = M.robustness_suite(
                lambda xb, model=model: model.predict(xb, batch_size=evaluate.batch_size, verbose=0),
                test.x, test.y, rp.corruptions, rp.severities, rp.max_images, rp.seed) \
                if rp.enabled else None
            del model
            keras.backend.clear_session()
            m = M.compute_metrics(test.y, pred.probs, classes, test.origin, test.flags)
            cal = M.calibration_metrics(test.y, pred.probs, val.y, val_probs) \
                if val is not None else None
            if cal is not None:
                m.update(cal.metrics)
            if rob is not None:
                m.update(rob.metrics)
            y_pred = pred.probs.argmax(axis=1)
            cm = M.confusion(test.y, y_pred, len(classes))
            tm = train_metrics[name]
            row: dict[str, Any] = {"model": name, "arch": mlflow_info[name].get("arch", models[name].arch)}
            row.update({k: tm.get(k) for k in TRAIN_KEYS if k != "arch"})
            row["recipe"] = models[name].summary()   # the comparison's words, not a metric
            row.update({k: v for k, v in m.items() if k != "per_class"})
            row["images_per_second"] = round(pred.images_per_second, 1)
            results[name] = row
            metrics_out[name] = {k: v for k, v in row.items() if k not in ("model", "arch", "recipe")}
            metrics_out[name]["per_class"] = m["per_class"]
            log.info("%s: test acc %.4f (public %s, private %s, clean %s), macro F1 %.4f, top-2 %.4f, "
                     "%.0f img/s", name, m["test_accuracy"], _f(m["test_accuracy_public"]),
                     _f(m["test_accuracy_private"]), _f(m["test_accuracy_clean"]), m["test_macro_f1"],
                     m["test_top2_accuracy"], pred.images_per_second)
            if rob is not None and "robust_mean_accuracy" in m:
                log.info("%s: corruption suite (%d images): clean %.4f, mean %.4f, worst drop "
                         "%.4f (%s)", name, m["robust_n"], m["robust_clean_accuracy"],
                         m["robust_mean_accuracy"], m["robust_worst_drop"],
                         m["robust_worst_corruption"])
            if cal is not None:
                log.info("%s: calibration on test: ECE %.4f -> %.4f, NLL %.4f -> %.4f with T=%.3f "
                         "(fitted on val)", name, m["test_ece"], m["test_ece_calibrated"],
                         m["test_nll"], m["test_nll_calibrated"], cal.temperature)

            # Files.
            figs = {
                "confusion": R.confusion_figure(cm, classes, f"{name}: confusion (counts)", False),
                "confusion_normalized": R.confusion_figure(cm, classes,
                                                           f"{name}: confusion (row-normalised)", True),
                "curves": R.curves_figure(train_reports / name / "history.csv",
                                          f"{name}: training curves"),
            }
            if cal is not None:
                figs["reliability"] = R.reliability_figure(
                    cal.before, cal.after, f"{name}: reliability on test (T={cal.temperature:.2f} "
                    "fitted on val)", m["test_ece"], m["test_ece_calibrated"])
                R.write_csv(work / "coverage" / f"{name}.csv", cal.coverage,
                            ["threshold", "coverage", "accuracy"])
            if rob is not None:
                figs["robustness"] = R.robustness_figure(
                    rob.rows, m["robust_clean_accuracy"],
                    f"{name}: accuracy under corruptions ({m['robust_n']} test images, no TTA)")
                R.write_csv(work / "robustness" / f"{name}.csv", rob.rows,
                            ["corruption", "severity", "accuracy"])
            for kind, fig in figs.items():
                if fig is not None:
                    R.save_figure(fig, work / "images" / f"{name}_{kind}.png")
            for kind in ("confusion", "confusion_normalized"):  # same rows, two DVC templates
                R.write_confusion_csv(work / kind / f"{name}.csv", test.y, y_pred, classes)
            pc_rows = R.per_class_rows(m)
            R.write_csv(work / "per_class" / f"{name}.csv", pc_rows,
                        ["class", "precision", "recall", "f1", "support"])
            if log_mlflow:
                flat = M.flat_mlflow_metrics(m)
                flat["test_images_per_second"] = float(pred.images_per_second)
                run_id = log_evaluation(
                    mlflow_info[name].get("run_id"), name, flat,
                    {f"evaluation/{k}.png": f for k, f in figs.items()}, pc_rows,
                    {"eval_tta": evaluate.tta, "test_data_md5": _md5(evaluate.test_path)})
                results[name]["_run_id"] = run_id
            _close(figs.values())

        for n in found:
            results[n]["stale"] = metrics_out[n]["stale"] = n in stale
        champion = choose_champion({n: results[n] for n in found if n not in stale})
        for n in found:
            results[n]["champion"] = n == champion
            metrics_out[n]["champion"] = n == champion
        outcome = None
        if register and champion:
            uri = mlflow_info[champion].get("model_uri")
            if not uri:
                log.warning("champion %s has no logged MLflow model (mlflow.log_model was false): "
                            "not registered", champion)
            else:
                cinfo = mlflow_info[champion]
                asked = promote if promote is not None else registry.promote and not names
                not_asked = ("a --model subset was evaluated (pass --promote to allow it)" if names
                             else "registry.promote is false (pass --promote to allow it)")
                outcome = register_and_decide(registry, Candidate(
                    champion, uri, float(results[champion]["val_accuracy"]), val_md5, {
                        "arch": str(cinfo.get("arch", "")), "classes": ",".join(classes),
                        "test_accuracy": f"{results[champion]['test_accuracy']:.4f}",
                        "temperature": f"{results[champion].get('temperature') or 1.0:.6g}",
                        "temperature_tta": evaluate.tta,
                        "pretrained": str(results[champion].get("pretrained")).lower(),
                        "input": "float32 (N,48,48,1) raw grayscale 0..255"}),
                    bool(asked), not_asked,
                    lambda model_uri: _val_accuracy(model_uri, evaluate.val_path,
                                                    evaluate.batch_size)).as_dict()

        R.write_metrics(work / "metrics.json", metrics_out)
        first = results[found[0]]
        note = {k: first[k] for k in ("test_n", "test_n_public", "test_n_private", "test_n_clean")}
        note.update(tta=evaluate.tta, batch_size=evaluate.batch_size,
                    registry=outcome["message"] if outcome else None)
        rows = R.comparison_rows({n: results[n] for n in found})
        R.write_comparison(work, rows, champion, note)
        write_json(work / "champion.json", {
            "champion": champion, "val_accuracy": results[champion]["val_accuracy"] if champion else None,
            "val_data_md5": val_md5, "stale": stale, "min_improvement": registry.min_improvement,
            "decision": outcome["decision"] if outcome else None,
            "reason": outcome["reason"] if outcome else None, "registry": outcome})
    log.info("champion: %s; comparison in %s", champion, out / "comparison.md")
    return EvaluationResult(results, champion, outcome, out, skipped)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _md5(path: str | Path) -> str:
    return next(iter(data_hashes([path]).values()))


def _trained_on(name: str, metrics: dict[str, Any], val_path: str) -> str | None:
    """md5 of the validation split a model was validated on: what training recorded, else what
    dvc.lock recorded as train@<name>'s dependency (models trained before training recorded it)."""
    if metrics.get("data_md5_val"):
        return str(metrics["data_md5_val"])
    lock = Path("dvc.lock")
    if not lock.is_file():
        return None
    stage = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(f"train@{name}") or {}
    return next((d.get("md5") for d in stage.get("deps") or []
                 if os.path.normpath(d.get("path", "")) == os.path.normpath(val_path)), None)


def _val_accuracy(model_uri: str, val_path: str, batch_size: int) -> float:
    """Single-view accuracy of a registered model on the validation split (as training scores
    val_accuracy): how a champion validated on other data is compared."""
    import mlflow.keras
    from mlflow.exceptions import MlflowException

    from fer_pipeline.arrays import load_split
    from fer_pipeline.evaluate.metrics import predict_proba

    val = load_split(val_path)
    try:
        model = mlflow.keras.load_model(model_uri)
    except (MlflowException, OSError) as exc:
        raise FerError(f"cannot load the current champion {model_uri} to re-score it on "
                       f"{val_path}: {exc}. Roll back or re-point it with `fer promote`.") from exc
    probs = predict_proba(model, val.x, batch_size, "none").probs
    return float((probs.argmax(axis=1) == val.y).mean())


def _close(figs) -> None:
    import matplotlib.pyplot as plt

    for fig in figs:
        if fig is not None:
            plt.close(fig)
