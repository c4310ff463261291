"""clean: decide, for every raw file, kept or dropped (with the reason).

Pure logic over the manifest (no image decoding here). The training folder gets every rule;
the test folder stays whole, comparable with published results, except for files that cannot
be read at all; its own problems are flagged (not dropped) so evaluate can report accuracy
without them too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from fer_pipeline.data.manifest import read_manifest
from fer_pipeline.io import atomic_path, write_text
from fer_pipeline.params import CleanParams, DataParams

log = logging.getLogger(__name__)

# Reasons in the order they are tested: the first that applies is the one reported.
REASONS = (
    "misplaced", "unknown_class", "unreadable", "extension_not_allowed", "color_image",
    "wrong_size", "near_blank", "label_conflict", "test_leak", "duplicate",
)
FLAG_COLUMNS = ("flag_duplicate", "flag_blank", "flag_leak", "flag_label_conflict")
REPORT_COLUMNS = ["relpath", "split", "label", "origin", "decision", "reason", "detail",
                  *FLAG_COLUMNS, "pixel_hash"]


def decide(manifest: pd.DataFrame, data: DataParams, params: CleanParams) -> pd.DataFrame:
    """One row per manifest row: decision kept|dropped, reason, detail, test-set flags."""
    m = manifest.reset_index(drop=True)
    is_train = m["split"] == "train"
    is_test = m["split"] == "test"
    reason = pd.Series("", index=m.index, dtype=object)
    detail = pd.Series("", index=m.index, dtype=object)

    def mark(mask: pd.Series, why: str, text: pd.Series | str) -> None:
        new = mask & (reason == "")
        reason[new] = why
        detail[new] = text[new] if isinstance(text, pd.Series) else text

    mark(~m["split"].isin(data.splits) | (m["label"] == ""), "misplaced",
         "not in <split>/<class>/<file> layout under " + data.raw_dir)
    mark(~m["label"].isin(data.classes), "unknown_class",
         "class folder '" + m["label"].astype(str) + "' is not one of data.classes")
    mark(~m["readable"].astype(bool), "unreadable", m["error"].astype(str))
    ext_ok = m["ext"].isin(params.keep_extensions)
    mark(is_train & ~ext_ok, "extension_not_allowed",
         "extension '." + m["ext"].astype(str) + "' (keep: " + ", ".join(params.keep_extensions) + ")")

    color = (m["channels"].fillna(1) > 1) & ~m["gray_equal"].astype(bool)
    mark(is_train & color & (params.color_policy == "drop"), "color_image",
         "colour image (clean.color_policy: drop)")
    size = data.image_size
    wrong = (m["width"] != size) | (m["height"] != size)
    # The test folder is never reduced for size: it is resized so it stays whole.
    mark(is_train & wrong & (params.size_policy == "drop"), "wrong_size",
         "size " + m["width"].fillna(0).astype(int).astype(str) + "x"
         + m["height"].fillna(0).astype(int).astype(str) + f", expected {size}x{size}")

    blank = m["pixel_std"] < params.blank_std_threshold
    mark(is_train & blank, "near_blank",
         "pixel std " + m["pixel_std"].round(2).astype(str)
         + f" < {params.blank_std_threshold}")

    usable = reason == ""
    h = m["pixel_hash"]
    # Label conflicts: identical pictures with different labels anywhere in the usable data.
    labels_per_hash = m[usable].groupby("pixel_hash")["label"].nunique()
    conflict = h.map(labels_per_hash).fillna(0) > 1
    if params.drop_label_conflicts:
        mark(is_train & conflict, "label_conflict",
             "pixel-identical copies carry different labels")
    test_hashes = set(h[usable & is_test])
    train_hashes = set(h[is_train & (m["readable"].astype(bool))])
    leak = h.isin(test_hashes)
    if params.drop_test_leak:
        mark(is_train & leak, "test_leak", "pixel-identical to an image in the test folder")
    if params.drop_duplicates:
        still = (reason == "") & is_train
        first = m[still].sort_values("relpath").drop_duplicates("pixel_hash").index
        dup = still & ~m.index.isin(first)
        keeper = m.loc[first].set_index("pixel_hash")["relpath"]
        mark(dup, "duplicate", "copy of " + h.map(keeper).fillna("").astype(str))

    out = pd.DataFrame({
        "relpath": m["relpath"], "split": m["split"], "label": m["label"],
        "origin": m["origin"], "decision": (reason == "").map({True: "kept", False: "dropped"}),
        "reason": reason, "detail": detail,
    })
    test_usable = usable & is_test
    dup_in_test = h[test_usable].value_counts()
    out["flag_duplicate"] = is_test & (h.map(dup_in_test).fillna(0) > 1)
    out["flag_blank"] = is_test & blank
    out["flag_leak"] = is_test & h.isin(train_hashes)
    out["flag_label_conflict"] = is_test & conflict
    out["pixel_hash"] = h
    return out[REPORT_COLUMNS]


def summarize(report: pd.DataFrame) -> dict:
    """Totals per split and reason: the stage's DVC metrics."""
    summary: dict = {}
    for split, part in report.groupby("split", dropna=False):
        key = split or "misplaced"
        dropped = part[part["decision"] == "dropped"]["reason"].value_counts()
        summary[key] = {
            "input": int(len(part)),
            "kept": int((part["decision"] == "kept").sum()),
            "dropped": int(len(part) - (part["decision"] == "kept").sum()),
            "dropped_by_reason": {r: int(dropped.get(r, 0)) for r in REASONS},
        }
        if key == "test":
            kept = part[part["decision"] == "kept"]
            summary[key]["flagged"] = {f: int(kept[f].sum()) for f in FLAG_COLUMNS}
    summary["total_input"] = int(len(report))
    summary["total_kept"] = int((report["decision"] == "kept").sum())
    return summary


def run_clean(manifest_path: Path, report_path: Path, summary_path: Path,
              data: DataParams, params: CleanParams) -> dict:
    manifest = read_manifest(manifest_path)
    report = decide(manifest, data, params)
    if len(report) != len(manifest):  # every input file is accounted for
        raise AssertionError("clean report lost rows")
    with atomic_path(report_path) as tmp:
        report.to_csv(tmp, index=False)
    summary = summarize(report)
    write_text(summary_path, json.dumps(summary, indent=2) + "\n")
    for split in ("train", "test"):
        s = summary.get(split)
        if s:
            reasons = ", ".join(f"{r} {n}" for r, n in s["dropped_by_reason"].items() if n)
            log.info("clean %s: %d in, %d kept, %d dropped (%s)", split, s["input"], s["kept"],
                     s["dropped"], reasons or "none")
    if "test" in summary:
        log.info("clean test flags (kept, reported): %s", summary["test"]["flagged"])
    return summary

