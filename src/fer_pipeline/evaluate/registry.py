"""MLflow side of evaluation: per-run evaluation logging and the model registry.

Scheme: registered model `registry.model_name` (default fer-emotion); its versions are the
Keras-flavor models that training logged (so the registry points at the trained artifact and
its run, no copy). Alias `champion` = the version `fer predict` and serving use; when it moves,
the version it left gets alias `previous` (rollback: point `champion` back at it) and the
registered model's tag `champion_history` records every move (`v3:custom_cnn:2026-11-27T22:00Z`).
A champion whose model is already registered reuses that version: re-running evaluate with
nothing changed registers nothing and moves no alias.

Promotion policy: the candidate (best comparable model of an evaluation, by validation
accuracy) becomes @champion only when it beats the current champion's validation accuracy by
more than `registry.min_improvement`, on the same validation data (the champion's version
records `val_data_md5`; on other data it is re-scored on the current split first). Runs that
were not asked to promote (`registry.promote: false`, as profiles set it; `--model` subsets)
register and record, but never move the alias. `fer promote` moves it by hand with a reason.
Every decision is tagged on the version (`promotion_decision`, `promotion_reason`) and written
to reports/evaluate/champion.json. All of it runs under an inter-process lock per store.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fer_pipeline.artifacts.evaluation import ChampionBefore, Decision, RegistryOutcome
from fer_pipeline.errors import FerError
from fer_pipeline.params import RegistryParams

log = logging.getLogger(__name__)

HISTORY_TAG = "champion_history"
HISTORY_MAX_CHARS = 4000


def log_evaluation(run_id: str | None, name: str, metrics: dict[str, float], figures: dict[str, Any],
                   per_class: list[dict[str, Any]], tags: dict[str, str]) -> str:
    """Log the evaluation into the model's training run (resumed); a new run if it is gone."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            mlflow.get_run(run_id)
        except MlflowException:  # another tracking store, or the run was deleted
            log.warning("%s: training run %s not found in this tracking store; logging the "
                        "evaluation to a new run", name, run_id)
            run_id = None
    kwargs = {"run_id": run_id} if run_id else {"run_name": f"{name}-evaluation"}
    with mlflow.start_run(**kwargs) as run:
        mlflow.log_metrics(metrics)
        for artifact, fig in figures.items():
            if fig is not None:
                mlflow.log_figure(fig, artifact)
        mlflow.log_table(pd.DataFrame(per_class), "evaluation/per_class.json")
        mlflow.set_tags({"model_name": name, "evaluated": "true", **tags})
        return run.info.run_id


IMPORTED_MD5_TAG = "imported_model_md5"


def import_local_model(name: str, model: Any, model_path: Path, x_example: Any,
                       origin: dict[str, Any]) -> tuple[str, str]:
    """(run id, model URI) of `model_path` logged into the current store: for a model whose
    training run lives in another store (a fresh clone, another machine). One run per model
    file: a second evaluate reuses it (found by the file's md5), so nothing is registered twice."""
    import mlflow

    from fer_pipeline.io import md5_file
    from fer_pipeline.keras_mlflow import log_model, model_in_store

    md5 = md5_file(model_path)
    for run in mlflow.search_runs(filter_string=f"tags.{IMPORTED_MD5_TAG} = '{md5}'",
                                  output_format="list", max_results=5):
        uri = run.data.tags.get("imported_model_uri")
        if model_in_store(uri):
            log.info("%s: %s is already in this store (run %s)", name, model_path, run.info.run_id)
            return run.info.run_id, str(uri)
    log.warning("%s: its training run's model (%s in %s) is not in this tracking store: logging "
                "%s as run %s-imported", name, origin.get("model_uri"),
                origin.get("tracking_uri", "another store"), model_path, name)
    with mlflow.start_run(run_name=f"{name}-imported") as run:
        uri = log_model(model, x_example)
        mlflow.set_tags({"model_name": name, IMPORTED_MD5_TAG: md5, "imported_model_uri": uri,
                         "imported_from_run": str(origin.get("run_id", "")),
                         "imported_from_store": str(origin.get("tracking_uri", "")),
                         **{k: str(v) for k, v in origin.items()
                            if k in ("arch", "pipeline_run_id", "precision", "backend")}})
        return run.info.run_id, uri


@dataclass
class Candidate:
    """What the policy compares: the model put forward and the data it was validated on."""

    name: str
    model_uri: str
    val_accuracy: float
    val_data_md5: str
    tags: dict[str, str]


def _same_model(mv: Any, model_uri: str) -> bool:
    model_id = getattr(mv, "model_id", None)
    return mv.source == model_uri or bool(model_id and model_uri == f"models:/{model_id}")


@contextlib.contextmanager
def registry_lock(tracking_uri: str) -> Iterator[None]:
    """One registry update at a time per tracking store on this host (several `fer evaluate`
    or `fer promote` processes): read-modify-write of aliases and tags is not atomic in MLflow."""
    import fcntl

    key = hashlib.sha1(tracking_uri.encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"fer-registry-{key}.lock"
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name, description="FER-2013 emotion classifier. Input: float32 (N, 48, 48, 1) "
                                  "raw grayscale pixels 0..255; output: (N, 7) class probabilities.")
        except MlflowException as exc:   # another process created it first
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _move_champion(client: Any, rp: RegistryParams, version: str, label: str,
                   current: Any | None) -> str | None:
    """champion -> `version`, previous -> the version it left; verified; history tagged."""
    name = rp.model_name
    previous = None
    if current is not None and str(current.version) != str(version):
        client.set_registered_model_alias(name, rp.previous_alias, current.version)
        previous = str(current.version)
    client.set_registered_model_alias(name, rp.champion_alias, version)
    now = _alias_version(client, name, rp.champion_alias)
    if now is None or str(now.version) != str(version):
        raise FerError(f"{name}@{rp.champion_alias} should be v{version} but the registry says "
                       f"{'nothing' if now is None else 'v' + str(now.version)}: another process "
                       f"changed it; rerun `fer evaluate`")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%MZ")
    history = client.get_registered_model(name).tags.get(HISTORY_TAG, "")
    history = ",".join(filter(None, [history, f"v{version}:{label}:{stamp}"]))
    while len(history) > HISTORY_MAX_CHARS:
        history = history.split(",", 1)[1]
    client.set_registered_model_tag(name, HISTORY_TAG, history)
    return previous


def _decide(rp: RegistryParams, cand: Candidate, current: Any | None, promote: bool,
            not_asked: str, rescore: Callable[[str], float]
            ) -> tuple[Decision, str, ChampionBefore | None]:
    """(decision, reason, what the champion was) by the written policy (docs: the registry)."""
    if current is None:
        return (Decision.PROMOTED, "no champion yet", None) if promote else \
            (Decision.NOT_ASKED, not_asked, None)
    tags = current.tags or {}
    before = ChampionBefore(version=str(current.version), model=tags.get("model_name"),
                            val_accuracy=_float(tags.get("val_accuracy")),
                            val_data_md5=tags.get("val_data_md5"))
    if _same_model(current, cand.model_uri):
        return Decision.ALREADY_CHAMPION, f"{cand.name} is already @{rp.champion_alias}", before
    if not promote:
        return Decision.NOT_ASKED, not_asked, before
    champ = before.val_accuracy
    if before.val_data_md5 != cand.val_data_md5 or champ is None:
        # Validated on other data (or unknown): score the champion on this validation split.
        champ = before.rescored_val_accuracy = round(
            rescore(f"models:/{rp.model_name}/{current.version}"), 4)
    margin = rp.min_improvement
    if cand.val_accuracy > champ + margin:
        return (Decision.PROMOTED, f"val accuracy {cand.val_accuracy:.4f} > champion "
                                   f"v{current.version}'s {champ:.4f} + min_improvement {margin}",
                before)
    return (Decision.KEPT, f"val accuracy {cand.val_accuracy:.4f} does not beat champion "
                           f"v{current.version}'s {champ:.4f} by more than min_improvement "
                           f"{margin}", before)


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def register_and_decide(rp: RegistryParams, cand: Candidate, promote: bool, not_asked: str,
                        rescore: Callable[[str], float]) -> RegistryOutcome:
    """Register the candidate (or reuse its version), decide by the policy, move the alias only
    when it is promoted; the decision is tagged on the version. Under the registry lock."""
    import mlflow

    client = _client()
    name = rp.model_name
    with registry_lock(client.tracking_uri):
        _ensure_registered_model(client, name)
        current = _alias_version(client, name, rp.champion_alias)
        existing = [mv for mv in client.search_model_versions(f"name='{name}'")
                    if _same_model(mv, cand.model_uri)]
        tags = {**cand.tags, "model_name": cand.name, "val_accuracy": str(cand.val_accuracy),
                "val_data_md5": cand.val_data_md5}
        if existing:
            mv, new = max(existing, key=lambda v: int(v.version)), False
        else:
            mv, new = mlflow.register_model(cand.model_uri, name, tags=tags), True
        decision, reason, before = _decide(rp, cand, current, promote, not_asked, rescore)
        previous = None
        if decision is Decision.PROMOTED:
            previous = _move_champion(client, rp, str(mv.version), cand.name, current)
        if decision is not Decision.ALREADY_CHAMPION:   # keep how it became champion
            stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            for key, value in {**tags, "promotion_decision": decision.value,
                               "promotion_reason": reason, "decided_at": stamp}.items():
                client.set_model_version_tag(name, mv.version, key, value)
    what = "new version" if new else "existing version"
    msg = (f"{name} v{mv.version} (`{cand.name}`, {what}): {decision} ({reason})"
           + (f"; v{previous} is @{rp.previous_alias}" if previous else ""))
    log.info(msg)
    return RegistryOutcome(model_name=name, champion=cand.name, version=str(mv.version),
                           new_version=new, alias_moved=decision is Decision.PROMOTED,
                           previous_version=previous, message=msg, decision=decision,
                           reason=reason, champion_before=before)


def promote(rp: RegistryParams, reason: str, version: str | None = None,
            to_previous: bool = False) -> RegistryOutcome:
    """`fer promote`: point the champion alias at `version`, or back at @previous (rollback,
    the two swap), with a reason recorded on the version and in the history tag."""
    import getpass

    client = _client()
    name = rp.model_name
    with registry_lock(client.tracking_uri):
        current = _alias_version(client, name, rp.champion_alias)
        if to_previous:
            target = _alias_version(client, name, rp.previous_alias)
            if target is None:
                raise FerError(f"{name} has no @{rp.previous_alias} version to roll back to")
        else:
            from mlflow.exceptions import MlflowException

            try:
                target = client.get_model_version(name, str(version))
            except MlflowException as exc:
                raise FerError(f"{name} has no version {version}: {exc.message}") from None
        if current is not None and str(current.version) == str(target.version):
            raise FerError(f"{name} v{target.version} is already @{rp.champion_alias}")
        label = (target.tags or {}).get("model_name", f"v{target.version}")
        previous = _move_champion(client, rp, str(target.version), f"{label}(manual)", current)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for key, value in {"promotion_decision": Decision.MANUAL.value, "promotion_reason": reason,
                           "decided_by": getpass.getuser(), "decided_at": stamp}.items():
            client.set_model_version_tag(name, target.version, key, value)
    msg = (f"{name} v{target.version} is now @{rp.champion_alias} ({reason})"
           + (f"; v{previous} is @{rp.previous_alias}" if previous else ""))
    log.info(msg)
    return RegistryOutcome(model_name=name, champion=label, version=str(target.version),
                           new_version=False, alias_moved=True, previous_version=previous,
                           message=msg, decision=Decision.MANUAL, reason=reason)
