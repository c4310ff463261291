"""Evaluate stage: `fer evaluate` scores every trained model on the test split, compares them,
logs the evaluation to each model's MLflow run and registers the champion.

One implementation, `evaluate_models`, used by the CLI, DVC (`evaluate` stage), flows and tests.
The test split is read here and nowhere else; the champion is chosen by validation accuracy
from training (reports/train/<name>/metrics.json), never by a test number. What training
leaves is read from files (model, reports), so this stage imports nothing from `train`.

What is measured is the scorers' (scorers.py); what each output carries is the declared metric
list (fer_pipeline.artifacts.evaluation.METRICS). This module runs the scorers per model, writes
their files, logs them to MLflow, applies the champion rule and the registry's policy, and
writes metrics.json, the comparison and champion.json.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fer_pipeline.artifacts.evaluation import (
    ChampionRecord,
    EvaluationMetrics,
    ModelEvaluation,
    RegistryOutcome,
    comparison_columns,
    mlflow_metrics,
)
from fer_pipeline.artifacts.train import TrainMetrics
from fer_pipeline.errors import FerError, MissingInputError, ParamsError
from fer_pipeline.io import md5_file, staged_dir
from fer_pipeline.params import EvaluateParams, MlflowParams, ModelParams, RegistryParams, TrainParams
from fer_pipeline.tracking import data_hashes, setup_tracking

if TYPE_CHECKING:
    from fer_pipeline.evaluate.scorers import Score

log = logging.getLogger(__name__)


@dataclass
class ModelReport:
    """One evaluated model: who it is, what it scored (its metrics.json entry) and the MLflow
    run the evaluation was logged to."""

    name: str
    arch: str
    recipe: str                       # the recipe in words (comparison table, not a metric)
    metrics: ModelEvaluation          # type: ignore[valid-type]
    run_id: str | None = None         # None: not logged (log_mlflow=False)

    def value(self, key: str) -> Any:
        """A comparison column's value: the model's identity, else its metric."""
        identity = {"model": self.name, "arch": self.arch, "recipe": self.recipe}
        return identity[key] if key in identity else self.metrics.value(key)


@dataclass
class EvaluationResult:
    models: dict[str, ModelReport]
    champion: str | None
    registry: RegistryOutcome | None
    reports_dir: Path
    skipped: list[str] = field(default_factory=list)


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
    from fer_pipeline.evaluate.scorers import score_model

    register = registry.enabled if register is None else register
    train_reports, models_dir = Path(train.reports_dir), Path(train.models_dir)
    found, skipped = select_models(models, models_dir, names)
    trained, stale, val_md5 = _check_inputs(found, train_reports, evaluate)
    mlflow_info, to_import = _tracking(found, train_reports, mlflow, log_mlflow or register)
    test = load_split(evaluate.test_path)
    val = load_split(evaluate.val_path) if evaluate.calibrate else None
    import keras

    log.info("Keras backend: %s", keras.backend.backend())
    out = Path(evaluate.reports_dir)
    # Every file goes to a staging folder that replaces reports/evaluate only when all is
    # written: a failure (a model that does not load, a registry error) leaves the old reports.
    with staged_dir(out) as work:
        scored: dict[str, dict[str, Any]] = {}      # name -> metrics.json values, by the scorers
        run_ids: dict[str, str | None] = {}
        for i, name in enumerate(found, 1):
            model = _load(name, models_dir, test.classes, i, len(found), test, val, evaluate)
            if name in to_import:
                mlflow_info[name] = _imported(name, model, models_dir, test, mlflow_info[name])
            scores = score_model(name, model, test, val, evaluate, trained[name],
                                 train_reports / name / "history.csv")
            del model
            keras.backend.clear_session()
            scored[name], run_ids[name] = _keep(name, scores, work, evaluate, log_mlflow,
                                                mlflow_info[name].get("run_id"))

        champion = choose_champion({n: scored[n] for n in found if n not in stale})
        reports = {n: ModelReport(n, mlflow_info[n].get("arch", models[n].arch),
                                  models[n].summary(), ModelEvaluation.parse(
                                      {**scored[n], "stale": n in stale, "champion": n == champion},
                                      f"metrics of {n}"), run_ids[n])
                   for n in found}
        outcome = _register(registry, register, champion, mlflow_info, reports, test.classes,
                            val_md5, evaluate, names, promote)
        _write_reports(work, reports, champion, outcome, val_md5, stale, evaluate, registry)
    log.info("champion: %s; comparison in %s", champion, out / "comparison.md")
    return EvaluationResult(reports, champion, outcome, out, skipped)


def _check_inputs(found: list[str], train_reports: Path, evaluate: EvaluateParams
                  ) -> tuple[dict[str, TrainMetrics], list[str], str]:
    """Cheap checks before any model loads: the params' corruptions, every model's training
    metrics, the val split. (training metrics, stale models, the val split's md5)."""
    from fer_pipeline.corruptions import CORRUPTIONS

    unknown = [c for c in evaluate.robustness.corruptions if c not in CORRUPTIONS]
    if evaluate.robustness.enabled and unknown:
        raise ParamsError(f"evaluate.robustness.corruptions: unknown {', '.join(unknown)} "
                          f"(known: {', '.join(CORRUPTIONS)})")
    trained = {n: TrainMetrics.read(train_reports / n / "metrics.json",
                                    f"training metrics of {n}: run `dvc repro train@{n}` first")
               for n in found}
    if not Path(evaluate.val_path).is_file():
        raise MissingInputError(f"validation split {evaluate.val_path} not found (which models are "
                                f"comparable is decided on it). Run `dvc repro split` first.")
    val_md5 = md5_file(evaluate.val_path)
    stale = [n for n in found if _trained_on(n, trained[n], evaluate.val_path) != val_md5]
    for n in stale:
        log.warning("%s was validated on other data than %s: reported as stale, not ranked. "
                    "Run `dvc repro train@%s`.", n, evaluate.val_path, n)
    return trained, stale, val_md5


def _tracking(found: list[str], train_reports: Path, mlflow: MlflowParams, needed: bool
              ) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """Each model's MLflow facts from training (reports/train/<name>/mlflow.json) and, with a
    tracking store needed, the store checked and the models whose logged model is not in it."""
    from fer_pipeline.keras_mlflow import model_in_store

    info = {n: (json.loads(p.read_text()) if (p := train_reports / n / "mlflow.json").is_file()
                else {}) for n in found}
    if not needed:
        return info, set()
    uri = setup_tracking(mlflow.tracking_uri, mlflow.experiment, mlflow.probe_timeout_s)
    log.info("MLflow tracking: %s", uri)
    # A model logged into another store (pulled with DVC into a fresh clone): its local file is
    # logged here instead, so it can be evaluated, registered and served.
    return info, {n for n in found if info[n].get("model_uri")
                  and not model_in_store(info[n]["model_uri"])}


def _imported(name: str, model: Any, models_dir: Path, test: Any,
              info: dict[str, Any]) -> dict[str, Any]:
    """`info` once the model's local file is logged into the current store."""
    from fer_pipeline.evaluate.registry import import_local_model

    run_id, model_uri = import_local_model(name, model, models_dir / name / "model.keras",
                                           test.x[:4], info)
    return {**info, "run_id": run_id, "model_uri": model_uri, "imported": True}


def _load(name: str, models_dir: Path, classes: list[str], i: int, n: int, test: Any,
          val: Any, evaluate: EvaluateParams) -> Any:
    """The trained model, checked to predict the test split's classes."""
    import keras

    rp = evaluate.robustness
    # Scoring one model takes minutes on a CPU: say what is running before it runs.
    log.info("scoring %s (%d/%d): %d test images (tta %s)%s%s", name, i, n, len(test.y),
             evaluate.tta, f", {len(val.y)} val images (calibration)" if val is not None else "",
             f", corruption suite ({len(rp.corruptions)} x {len(rp.severities)} passes)"
             if rp.enabled else "")
    model = keras.saving.load_model(models_dir / name / "model.keras", compile=False)
    n_out = int(model.output_shape[-1])
    if n_out != len(classes):
        raise FerError(f"{name} predicts {n_out} classes but the test split has "
                       f"{len(classes)} ({', '.join(classes)}); retrain it: "
                       f"`dvc repro train@{name}`")
    return model


def _keep(name: str, scores: list[Score], work: Path, evaluate: EvaluateParams,
          log_mlflow: bool, run_id: str | None) -> tuple[dict[str, Any], str | None]:
    """The scorers' files and figures written, the evaluation logged into the model's MLflow
    run: (metrics.json values, the run it was logged to)."""
    from fer_pipeline.evaluate import report as R
    from fer_pipeline.evaluate.registry import log_evaluation
    from fer_pipeline.evaluate.scorers import AccuracyScore

    values = {k: v for s in scores for k, v in s.metrics.items()}
    # A scorer's key that METRICS does not declare fails now, not after every model is scored.
    ModelEvaluation.parse({**values, "stale": False, "champion": False}, f"metrics of {name}")
    figures = {kind: fig for s in scores for kind, fig in s.figures.items()}
    for s in scores:
        for folder, write in s.files.items():
            write(work / folder / f"{name}.csv")
    for kind, fig in figures.items():
        R.save_figure(fig, work / "images" / f"{name}_{kind}.png")
    logged = None
    if log_mlflow:
        per_class = next(s.per_class_rows for s in scores if isinstance(s, AccuracyScore))
        logged = log_evaluation(run_id, name, mlflow_metrics(values),
                                {f"evaluation/{k}.png": f for k, f in figures.items()}, per_class,
                                {"eval_tta": evaluate.tta, "test_data_md5": _md5(evaluate.test_path)})
    _close(figures.values())
    return values, logged


def _register(registry: RegistryParams, register: bool, champion: str | None,
              mlflow_info: dict[str, dict[str, Any]], reports: dict[str, ModelReport],
              classes: list[str], val_md5: str, evaluate: EvaluateParams,
              names: list[str] | None, promote: bool | None) -> RegistryOutcome | None:
    """Register the champion and let the promotion policy decide; None when not asked to or
    when it has no logged model."""
    from fer_pipeline.evaluate.registry import Candidate, register_and_decide

    if not (register and champion):
        return None
    uri = mlflow_info[champion].get("model_uri")
    if not uri:
        log.warning("champion %s has no logged MLflow model (mlflow.log_model was false): "
                    "not registered", champion)
        return None
    ev = reports[champion].metrics
    asked = promote if promote is not None else registry.promote and not names
    not_asked = ("a --model subset was evaluated (pass --promote to allow it)" if names
                 else "registry.promote is false (pass --promote to allow it)")
    return register_and_decide(registry, Candidate(
        champion, uri, float(ev.val_accuracy), val_md5, {
            "arch": str(mlflow_info[champion].get("arch", "")), "classes": ",".join(classes),
            "test_accuracy": f"{ev.test_accuracy:.4f}",
            "temperature": f"{ev.temperature or 1.0:.6g}",
            "temperature_tta": evaluate.tta,
            "pretrained": str(ev.pretrained).lower(),
            "input": "float32 (N,48,48,1) raw grayscale 0..255"}),
        bool(asked), not_asked,
        lambda model_uri: _val_accuracy(model_uri, evaluate.val_path, evaluate.batch_size))


def _write_reports(work: Path, reports: dict[str, ModelReport], champion: str | None,
                   outcome: RegistryOutcome | None, val_md5: str, stale: list[str],
                   evaluate: EvaluateParams, registry: RegistryParams) -> None:
    """metrics.json, comparison.{md,csv} and champion.json."""
    from fer_pipeline.evaluate import report as R

    EvaluationMetrics({n: r.metrics for n, r in reports.items()}).write(work / "metrics.json")
    first = next(iter(reports.values()))
    note = {k: first.value(k) for k in ("test_n", "test_n_public", "test_n_private", "test_n_clean")}
    note.update(tta=evaluate.tta, batch_size=evaluate.batch_size,
                registry=outcome.message if outcome else None)
    rows = [{m.key: r.value(m.key) for m in comparison_columns()} for r in reports.values()]
    R.write_comparison(work, rows, champion, note)
    ChampionRecord(
        champion=champion,
        val_accuracy=reports[champion].metrics.val_accuracy if champion else None,
        val_data_md5=val_md5, stale=stale, min_improvement=registry.min_improvement,
        decision=outcome.decision if outcome else None,
        reason=outcome.reason if outcome else None, registry=outcome,
    ).write(work / "champion.json")


def _md5(path: str | Path) -> str:
    return next(iter(data_hashes([path]).values()))


def _trained_on(name: str, metrics: TrainMetrics, val_path: str) -> str | None:
    """md5 of the validation split a model was validated on: what training recorded, else what
    dvc.lock recorded as train@<name>'s dependency (models trained before training recorded it)."""
    if metrics.data_md5_val:
        return metrics.data_md5_val
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
