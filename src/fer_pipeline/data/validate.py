"""validate: measure every raw file (the manifest) and check it with a Great Expectations suite.

Expectations with severity `critical` are hard checks: one failing stops the pipeline with a
short summary naming the offending files. Severity `warning` ones are soft: reported (JSON,
Data Docs, log) and handled by clean. Soft checks that clean repairs (a few unreadable or
misplaced files) have a hard twin with a tolerance (validate.max_bad_file_fraction), so a
handful of bad files is cleaned while a broken dataset stops the run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fer_pipeline.data.manifest import build_manifest, list_dirs
from fer_pipeline.errors import FerError
from fer_pipeline.io import atomic_path, staged_dir, write_text
from fer_pipeline.params import DataParams, ValidateParams

log = logging.getLogger(__name__)

SUITE_NAME = "fer2013_raw"
MAX_NAMED = 10  # offending files named in the summary per failed check


class DataChecksFailed(FerError):
    """A hard data check failed: the pipeline stops before anything trains."""


@dataclass
class ValidationOutcome:
    success: bool  # no hard failure
    hard_failures: list[str]
    soft_failures: list[str]
    summary: dict
    manifest: pd.DataFrame


def class_counts(manifest: pd.DataFrame, data: DataParams, params: ValidateParams) -> pd.DataFrame:
    """Files per (split, class) for every expected pair, zero included, with the allowed range."""
    placed = manifest[manifest["split"].isin(data.splits) & (manifest["label"] != "")]
    counts = placed.groupby(["split", "label"]).size()
    rows = []
    keys = {(s, c) for s in data.splits for c in data.classes} | set(counts.index)
    for split, label in sorted(keys):
        rows.append({
            "split": split, "label": label, "count": int(counts.get((split, label), 0)),
            "min_allowed": int(params.class_count_min.get(split, 0)),
            "max_allowed": int(params.class_count_max.get(split, 10**9)),
        })
    return pd.DataFrame(rows)


def _expectations(data: DataParams, params: ValidateParams) -> dict[str, list]:
    import great_expectations as gx
    from great_expectations.expectations.metadata_types import FailureSeverity as Sev

    E = gx.expectations
    hard, soft = Sev.CRITICAL, Sev.WARNING
    tolerance = 1.0 - params.max_bad_file_fraction
    size = data.image_size
    files = [
        E.ExpectTableRowCountToBeBetween(min_value=1, severity=hard,
                                         description="the dataset holds files"),
        E.ExpectColumnValuesToBeUnique(column="relpath", severity=hard),
        E.ExpectColumnValuesToBeInSet(column="split", value_set=[*data.splits, ""], severity=hard,
                                      description="only known split folders"),
        E.ExpectColumnValuesToBeInSet(column="label", value_set=[*data.classes, ""], severity=hard,
                                      description="only known class folders"),
        E.ExpectColumnValuesToNotBeInSet(column="label", value_set=[""], severity=soft,
                                         description="every file sits in <split>/<class>/"),
        E.ExpectColumnValuesToBeInSet(column="readable", value_set=[True], severity=soft,
                                      description="every file decodes as an image"),
        E.ExpectColumnValuesToBeInSet(column="readable", value_set=[True], mostly=tolerance,
                                      severity=hard, description="few unreadable files"),
        E.ExpectColumnValuesToBeInSet(column="ext", value_set=params.allowed_extensions,
                                      severity=soft, description="allowed extensions"),
        E.ExpectColumnValuesToBeInSet(column="ext", value_set=params.allowed_extensions,
                                      mostly=tolerance, severity=hard,
                                      description="few files with other extensions"),
        E.ExpectColumnValuesToBeBetween(column="width", min_value=size, max_value=size,
                                        severity=soft, description=f"{size} px wide"),
        E.ExpectColumnValuesToBeBetween(column="height", min_value=size, max_value=size,
                                        severity=soft, description=f"{size} px high"),
        E.ExpectColumnValuesToBeInSet(column="channels", value_set=[1], severity=soft,
                                      description="one channel (grayscale)"),
        E.ExpectColumnValuesToBeBetween(column="pixel_std", min_value=params.blank_std_threshold,
                                        severity=soft, description="no near-blank images"),
        E.ExpectColumnValuesToMatchRegex(column="filename",
                                         regex=r"^(?:Training|PublicTest|PrivateTest)_\d+\.",
                                         severity=soft,
                                         description="FER-2013 file names keep their origin"),
        E.ExpectColumnValuesToBeBetween(column="size_bytes", min_value=1, severity=soft,
                                        description="no empty files"),
        E.ExpectColumnProportionOfUniqueValuesToBeBetween(
            column="pixel_hash", min_value=1.0 - params.max_duplicate_fraction, severity=soft,
            description="few pixel-identical copies"),
    ]
    counts = [
        E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="count", column_B="min_allowed",
                                                  or_equal=True, severity=hard,
                                                  description="no class folder (nearly) empty"),
        E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="max_allowed", column_B="count",
                                                  or_equal=True, severity=hard,
                                                  description="no class folder far too big"),
    ]
    return {"files": files, "class_counts": counts}


def run_suite(frames: dict[str, pd.DataFrame], data: DataParams, params: ValidateParams,
              docs_dir: Path | None) -> dict[str, dict]:
    """Run the suites with a real GX checkpoint; returns {asset: validation result dict}."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        ctx.add_data_docs_site(
            site_name="fer_pipeline",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                                  "base_directory": str(docs_dir.resolve())},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    source = ctx.data_sources.add_pandas("fer2013")
    definitions = []
    for asset_name, expectations in _expectations(data, params).items():
        batch = source.add_dataframe_asset(asset_name).add_batch_definition_whole_dataframe(
            asset_name)
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"{SUITE_NAME}_{asset_name}"))
        for exp in expectations:
            suite.add_expectation(exp)
        definitions.append(ctx.validation_definitions.add(
            gx.ValidationDefinition(name=asset_name, data=batch, suite=suite)))
    actions = []
    if docs_dir is not None:
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["fer_pipeline"]))
    results = {}
    # One checkpoint per asset: each takes its own DataFrame as batch parameter.
    for definition in definitions:
        checkpoint = ctx.checkpoints.add(gx.Checkpoint(
            name=f"cp_{definition.name}", validation_definitions=[definition], actions=actions,
            result_format={"result_format": "COMPLETE",
                           "unexpected_index_column_names": _id_columns(definition.name)},
        ))
        res = checkpoint.run(batch_parameters={"dataframe": frames[definition.name]})
        (vres,) = res.run_results.values()
        results[definition.name] = vres.to_json_dict()
    return results


def _id_columns(asset: str) -> list[str]:
    return ["relpath"] if asset == "files" else ["split", "label"]


def _offenders(result: dict, asset: str) -> list[str]:
    r = result.get("result") or {}
    items = r.get("unexpected_index_list") or []
    names = []
    for item in items:
        if isinstance(item, dict):
            if asset == "files":
                names.append(str(item.get("relpath")))
            else:
                names.append(f"{item.get('split')}/{item.get('label')}")
        else:
            names.append(str(item))
    return names


def _describe(cfg: dict) -> str:
    kwargs = cfg.get("kwargs", {})
    col = kwargs.get("column") or kwargs.get("column_A") or ""
    desc = cfg.get("description") or cfg.get("type")
    return f"{desc} [{cfg.get('type')}{' on ' + col if col else ''}]"


def validate_dataset(raw_dir: Path, data: DataParams, params: ValidateParams,
                     manifest_path: Path, reports_dir: Path, *, check: bool = True
                     ) -> ValidationOutcome:
    """Measure every raw file (the manifest), run the suite, write the reports, log a summary.

    With `check`, a hard failure raises DataChecksFailed (after the reports are written) naming
    the offending files; without it the outcome says so (tests inspect it).
    """
    t0 = time.perf_counter()
    manifest = build_manifest(raw_dir)
    with atomic_path(manifest_path) as tmp:
        manifest.to_csv(tmp, index=False)
    counts = class_counts(manifest, data, params)
    # GX writes the Data Docs into a fresh folder beside the old one, swapped in when complete:
    # a crash mid-suite leaves the previous docs, never half of new ones.
    with staged_dir(reports_dir / "data_docs") as staging:
        results = run_suite({"files": manifest, "class_counts": counts}, data, params, staging)

    hard, soft, checks = [], [], []
    for asset, res in results.items():
        for r in res["results"]:
            cfg = r["expectation_config"]
            severity = cfg.get("severity", "critical")
            ok = bool(r["success"])
            offenders = [] if ok else _offenders(r, asset)
            unexpected = (r.get("result") or {}).get("unexpected_count", len(offenders))
            checks.append({"asset": asset, "check": _describe(cfg), "severity": severity,
                           "success": ok, "unexpected_count": unexpected,
                           "examples": offenders[:MAX_NAMED]})
            if ok:
                continue
            named = ", ".join(offenders[:MAX_NAMED])
            more = f" (+{len(offenders) - MAX_NAMED} more)" if len(offenders) > MAX_NAMED else ""
            observed = (r.get("result") or {}).get("observed_value")
            extra = f" (observed {observed})" if observed is not None and not named else ""
            line = f"{_describe(cfg)}: {unexpected} offending{extra}" + (
                f": {named}{more}" if named else "")
            (hard if severity == "critical" else soft).append(line)

    known = {f"{s}/{c}" for s in data.splits for c in data.classes}
    folders = list_dirs(raw_dir)
    files_in = {str(Path(p).parent.as_posix()) for p in manifest["relpath"]}
    empty_unknown = [f for f in folders if f.count("/") == 1 and f not in known
                     and f not in files_in]
    if empty_unknown:
        soft.append(f"empty unknown folders (ignored): {', '.join(empty_unknown)}")

    summary = {
        "files": int(len(manifest)),
        "readable": int(manifest["readable"].sum()),
        "hard_failures": len(hard),
        "soft_failures": len(soft),
        "success": not hard,
        "seconds": round(time.perf_counter() - t0, 1),
        "class_counts": {f"{r.split}/{r.label}": int(r.count) for r in counts.itertuples()},
    }
    write_text(reports_dir / "result.json", json.dumps(
        {"summary": summary, "hard_failures": hard, "soft_failures": soft, "checks": checks,
         "gx_results": results}, indent=1, default=str) + "\n")
    write_text(reports_dir / "summary.json", json.dumps(
        {k: v for k, v in summary.items() if k != "class_counts"}, indent=2) + "\n")
    outcome = ValidationOutcome(not hard, hard, soft, summary, manifest)
    _log_summary(outcome, reports_dir)
    if check and not outcome.success:
        raise DataChecksFailed(
            "data checks failed (pipeline stopped):\n  - " + "\n  - ".join(hard)
            + f"\nFix the raw data under {raw_dir} (or the bounds in params.yaml "
            "`validate`), then rerun. Full report: " + str(reports_dir / "result.json"))
    return outcome


def _log_summary(outcome: ValidationOutcome, reports_dir: Path) -> None:
    s = outcome.summary
    log.info("validate: %d files, %d readable, %d hard and %d soft failures (%.1f s)",
             s["files"], s["readable"], s["hard_failures"], s["soft_failures"], s["seconds"])
    for line in outcome.soft_failures:
        log.warning("soft: %s", line)
    log.info("report: %s, data docs: %s", reports_dir / "result.json",
             reports_dir / "data_docs" / "index.html")

