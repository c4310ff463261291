"""The typed artifacts: the committed files are what their models read and write, the published
JSON Schemas are the models', and the declared metric list feeds every output consistently."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from fer_pipeline.artifacts import schemas
from fer_pipeline.artifacts.answers import ImageAnswer, UploadAnswer
from fer_pipeline.artifacts.base import ArtifactError
from fer_pipeline.artifacts.evaluation import (
    METRICS,
    ChampionRecord,
    Decision,
    EvaluationMetrics,
    ModelEvaluation,
    Source,
    comparison_columns,
    mlflow_metrics,
    release_metrics,
)
from fer_pipeline.artifacts.release import ReleaseManifest
from fer_pipeline.artifacts.train import TrainMetrics
from fer_pipeline.cli import main
from sandbox import ROOT

TRAIN_FILES = sorted((ROOT / "reports" / "train").glob("*/metrics.json"))
COMMITTED = [(TrainMetrics, "train-metrics", p) for p in TRAIN_FILES] + [
    (EvaluationMetrics, "evaluate-metrics", ROOT / "reports/evaluate/metrics.json"),
    (ChampionRecord, "champion", ROOT / "reports/evaluate/champion.json"),
    (ReleaseManifest, "release-manifest", ROOT / "release/model.json"),
]


def test_the_published_schemas_are_the_models():
    assert schemas.stale(ROOT / schemas.SCHEMA_DIR) == [], "run `fer schemas`"
    assert main(["schemas", "--check", "--out", str(ROOT / schemas.SCHEMA_DIR)]) == 0


def test_schemas_check_fails_on_a_stale_file(tmp_path, capsys):
    assert main(["schemas", "--out", str(tmp_path)]) == 0
    (tmp_path / "champion.schema.json").write_text("{}\n")
    assert main(["schemas", "--check", "--out", str(tmp_path)]) == 1
    assert "champion" in capsys.readouterr().err


@pytest.mark.parametrize(("model", "schema", "path"), COMMITTED,
                         ids=[str(p.relative_to(ROOT)) for *_, p in COMMITTED])
def test_committed_files_validate_and_round_trip(model, schema, path):
    """Each committed file reads into its model, matches its published schema, and writes back
    byte for byte (so a re-run with the same values moves no DVC hash)."""
    assert len(TRAIN_FILES) >= 1
    text = path.read_text()
    artifact = model.read(path)
    jsonschema.validate(json.loads(text), schemas.schema(schema))
    if model is EvaluationMetrics:   # key order follows the declared list (see the docs)
        assert json.loads(artifact.to_json()) == json.loads(text)
    else:
        assert artifact.to_json() + "\n" == text


def test_train_metrics_as_training_writes_them(tmp_path):
    """Every key training writes, in its order; an old file's missing keys stay missing."""
    written = {"train_loss": 1.5, "train_accuracy": 0.4, "val_loss": 1.6, "val_accuracy": 0.38,
               "best_epoch": 3, "epochs_run": 4, "pretrained": True, "trainable_params": 1234,
               "train_seconds": 12.3, "train_images": 100, "seconds_per_epoch": 3.1,
               "cpu_seconds_per_epoch": None, "data_md5_train": "a" * 32, "data_md5_val": "b" * 32}
    TrainMetrics.parse(written).write(tmp_path / "m.json")
    assert (tmp_path / "m.json").read_text() == json.dumps(written, indent=2) + "\n"
    old = {k: v for k, v in written.items() if k not in ("train_images", "cpu_seconds_per_epoch")}
    assert TrainMetrics.parse(old).to_data() == old
    with pytest.raises(ArtifactError, match="val_acc"):
        TrainMetrics.parse({**written, "val_acc": 0.1})


def test_champion_decisions_are_an_enum():
    record = ChampionRecord.read(ROOT / "reports/evaluate/champion.json")
    assert isinstance(record.decision, Decision) and record.registry is not None
    data = json.loads((ROOT / "reports/evaluate/champion.json").read_text())
    with pytest.raises(ArtifactError, match="decision"):
        ChampionRecord.parse({**data, "decision": "maybe"})
    with pytest.raises(ArtifactError, match="registy"):
        ChampionRecord.parse({**data, "registy": None})
    # A candidate that did not take the alias: export releases the champion it left in place.
    kept = ChampionRecord.parse({**data, "champion": "other", "decision": "kept",
                                 "registry": {**data["registry"], "champion": "other",
                                              "decision": "kept", "version": "3"}})
    assert kept.alias_holder() == data["registry"]["champion_before"]["model"]
    assert kept.version_of("other") == "3"
    assert kept.version_of(kept.alias_holder()) == data["registry"]["champion_before"]["version"]
    assert record.alias_holder() == record.champion


def _evaluation(**changes) -> dict:
    data = json.loads((ROOT / "reports/evaluate/metrics.json").read_text())
    return {**next(iter(data.values())), **changes}


def test_model_evaluation_keys_come_from_the_metric_list():
    ev = ModelEvaluation.parse(_evaluation())
    assert ev.family("robust_{}")["blur"] == ev.robust_blur
    with pytest.raises(ArtifactError, match="test_balanced_accuracy"):
        ModelEvaluation.parse(_evaluation(test_balanced_accuracy=0.5))   # not declared
    with pytest.raises(ArtifactError, match="must be a number"):
        ModelEvaluation.parse(_evaluation(robust_fog="heavy"))
    ModelEvaluation.parse(_evaluation(robust_fog=0.5))                   # a new corruption: fine
    # Keys are written in the list's order, a family where it stands in it.
    listed = [m.key for m in METRICS if m.in_metrics_json]
    written = list(ev.to_data())
    family = [k for k in written if k not in listed]
    assert family and all(k.startswith("robust_") for k in family)
    assert [k for k in written if k in listed] == [k for k in listed if k in written]
    assert written.index(family[0]) == written.index("robust_n") + 1


def test_the_metric_list_is_consistent():
    keys = [m.key for m in METRICS]
    assert len(keys) == len(set(keys))
    names = [m.mlflow for m in METRICS if m.mlflow]
    assert len(names) == len(set(names))
    for m in METRICS:
        assert not m.card or m.release, f"{m.key}: the card reads the release manifest"
        assert not (m.mlflow and m.source in (Source.TRAINING, Source.MODEL)), \
            f"{m.key}: training logs its own metrics"
    assert [m.key for m in comparison_columns()][:2] == ["model", "arch"]
    # The family's pattern (also in the published schema) does not swallow declared keys.
    pattern = next(iter(schemas.schema("evaluate-metrics")["$defs"]["ModelEvaluation"]
                        ["patternProperties"]))
    assert not any(re.match(pattern, k) for k in keys) and re.match(pattern, "robust_blur")


def test_every_sink_follows_the_list():
    ev = ModelEvaluation.parse(_evaluation())
    flat = mlflow_metrics(ev.to_data())
    assert flat["test_images_per_second"] == ev.images_per_second
    assert flat["robust_blur"] == ev.robust_blur and flat["test_f1_happy"] == ev.per_class["happy"].f1
    assert "val_accuracy" not in flat and "robust_worst_corruption" not in flat
    release = release_metrics(ev)
    assert list(release) == [m.key for m in METRICS if m.release]
    # The committed release carries exactly the list's release metrics, in its order.
    man = json.loads((ROOT / "release/model.json").read_text())
    assert list(man["metrics"]) == list(release)


def test_answers_keep_absent_keys_absent():
    failed = ImageAnswer(path="a.jpg", ok=False, error="not an image")
    assert failed.to_data() == {"path": "a.jpg", "ok": False, "error": "not an image"}
    upload = UploadAnswer.of(failed)
    assert upload.to_data() == {"name": "a.jpg", "ok": False, "error": "not an image"}
    with pytest.raises(ArtifactError, match="ok"):
        ImageAnswer.parse({"path": "a.jpg"})


def test_a_missing_or_broken_artifact_names_the_file_and_the_fix(tmp_path):
    from fer_pipeline.errors import MissingInputError

    with pytest.raises(MissingInputError, match=r"nothing\.json.*dvc repro evaluate"):
        ChampionRecord.read(tmp_path / "nothing.json", "run `dvc repro evaluate` first")
    bad = tmp_path / "champion.json"
    bad.write_text("{not json")
    with pytest.raises(ArtifactError, match=str(Path(bad).name)):
        ChampionRecord.read(bad)
