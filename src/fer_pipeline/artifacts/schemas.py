"""The published JSON Schemas (docs/schemas/<name>.schema.json), generated from the artifact
models and params.yaml's schema: `fer schemas` writes them, a test checks that the committed
ones are current."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fer_pipeline.artifacts import answers, evaluation, release, train
from fer_pipeline.io import write_text

SCHEMA_DIR = Path("docs/schemas")

# schema name -> (model, what it describes)
SCHEMAS: dict[str, tuple[Any, str]] = {
    "train-metrics": (train.TrainMetrics, "reports/train/<name>/metrics.json"),
    "evaluate-metrics": (evaluation.EvaluationMetrics, "reports/evaluate/metrics.json"),
    "champion": (evaluation.ChampionRecord, "reports/evaluate/champion.json"),
    "release-manifest": (release.ReleaseManifest, "release/model.json"),
    "predict-report": (answers.PredictReport, "fer predict --format json"),
    "predict-result": (answers.ImageAnswer, "fer predict --format jsonl: one line"),
    "serve-answer": (answers.ServeAnswer, "fer serve: POST /predict"),
    "serve-model": (answers.ModelDescription, "fer serve: GET /model"),
}


def schema(name: str) -> dict[str, Any]:
    model, what = SCHEMAS[name]
    out = {"$schema": "https://json-schema.org/draft/2020-12/schema",
           "$id": f"{name}.schema.json", "title": what}
    body = model.model_json_schema()
    body.pop("title", None)
    return {**out, **body}


def render(name: str) -> str:
    return json.dumps(schema(name), indent=2) + "\n"


def _all() -> dict[str, str]:
    """Every published schema's text by file name: the artifacts' and params.yaml's."""
    from fer_pipeline import params

    out = {f"{n}.schema.json": render(n) for n in SCHEMAS}
    out[params.SCHEMA_PATH.name] = params.schema_text()
    return out


def write_all(folder: str | Path = SCHEMA_DIR) -> list[Path]:
    """Write every schema into `folder`; the paths written."""
    paths = []
    for fname, text in _all().items():
        path = Path(folder) / fname
        write_text(path, text)
        paths.append(path)
    return paths


def stale(folder: str | Path = SCHEMA_DIR) -> list[str]:
    """Schemas whose file in `folder` is missing or differs from the models (or is extra)."""
    folder = Path(folder)
    texts = _all()
    out = [f for f, text in texts.items() if not (folder / f).is_file()
           or (folder / f).read_text() != text]
    out += [p.name for p in sorted(folder.glob("*.schema.json")) if p.name not in texts]
    return out
