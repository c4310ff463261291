"""Files the evaluate stage writes: images, DVC plots data, per-class and comparison tables.

Layout (one folder per kind, one file per model, so dvc.yaml can declare each folder once
whatever the models are):
  metrics.json, champion.json       typed (fer_pipeline.artifacts.evaluation), written by the stage
  comparison.md / comparison.csv    one row per model, the columns METRICS declares
  confusion/<name>.csv              one row per test image (actual, predicted): DVC `confusion` plot
  confusion_normalized/<name>.csv   the same rows for DVC's `confusion_normalized` template
  per_class/<name>.csv              precision/recall/F1/support per class
  images/<name>_confusion.png, <name>_confusion_normalized.png, <name>_curves.png
Every file is written atomically (`fer_pipeline.io`): a crash never leaves half a report.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from fer_pipeline.artifacts.evaluation import comparison_columns
from fer_pipeline.evaluate.metrics import row_normalize
from fer_pipeline.io import atomic_path, write_text
from fer_pipeline.plots import history_figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_figure(cm: np.ndarray, classes: list[str], title: str, normalized: bool):
    plt = _pyplot()
    data = row_normalize(cm) if normalized else cm
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(data, cmap="Blues", vmin=0, vmax=1 if normalized else None)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    hi = data.max() / 2 if data.size else 0
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            v = data[i, j]
            ax.text(j, i, f"{v:.2f}" if normalized else str(int(v)), ha="center", va="center",
                    fontsize=8, color="white" if v > hi else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def reliability_figure(before: list[dict[str, Any]], after: list[dict[str, Any]] | None,
                       title: str, ece_before: float, ece_after: float | None):
    """Reliability diagram: accuracy against confidence per bin (the diagonal is perfect
    calibration), before and after temperature scaling, with the share of images per bin."""
    plt = _pyplot()
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(6, 7), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfect")
    for rows, label, style in ((before, f"softmax (ECE {100 * ece_before:.1f}%)", "o-"),
                               (after, None if ece_after is None else
                                f"temperature-scaled (ECE {100 * ece_after:.1f}%)", "s-")):
        if rows is None or label is None:
            continue
        pts = [(r["confidence"], r["accuracy"]) for r in rows if r["count"]]
        ax.plot([c for c, _ in pts], [a for _, a in pts], style, label=label, markersize=4)
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    n = max(sum(r["count"] for r in before), 1)
    hx.bar([(r["lo"] + r["hi"]) / 2 for r in before], [r["count"] / n for r in before],
           width=before[0]["hi"] - before[0]["lo"], color="tab:blue", alpha=0.6)
    hx.set_xlabel("confidence (top probability, before scaling)")
    hx.set_ylabel("share")
    fig.tight_layout()
    return fig


def robustness_figure(rows: list[dict[str, Any]], clean: float, title: str):
    """Accuracy per corruption (bars per severity) against clean accuracy (dashed line)."""
    plt = _pyplot()
    names = list(dict.fromkeys(r["corruption"] for r in rows))
    sevs = sorted({r["severity"] for r in rows})
    acc = {(r["corruption"], r["severity"]): r["accuracy"] for r in rows}
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4))
    w = 0.8 / max(len(sevs), 1)
    for k, sev in enumerate(sevs):
        ax.bar([i + (k - (len(sevs) - 1) / 2) * w for i in range(len(names))],
               [acc.get((n, sev), 0.0) for n in names], w, label=f"severity {sev}")
    ax.axhline(clean, color="black", linestyle="--", linewidth=1, label=f"clean {clean:.3f}")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=len(sevs) + 1, loc="upper right")
    fig.tight_layout()
    return fig


def curves_figure(history_csv: Path, title: str):
    """Training curves from reports/train/<name>/history.csv; None when there is none."""
    if not history_csv.is_file():
        return None
    with history_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    return history_figure(rows, title) if rows else None


def save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:   # the temp name keeps `.png`: matplotlib's format
        fig.savefig(tmp, dpi=100)


def write_confusion_csv(path: Path, y: np.ndarray, pred: np.ndarray, classes: list[str]) -> None:
    """Per-image rows for DVC's `confusion` / `confusion_normalized` templates."""
    lines = ["actual,predicted"] + [f"{classes[a]},{classes[p]}" for a, p in zip(y, pred, strict=True)]
    write_text(path, "\n".join(lines) + "\n")


def per_class_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"class": c, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}}
            for c, row in metrics["per_class"].items()]


def write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


LEFT_ALIGNED = ("model", "arch")   # the names; every other column is right-aligned


def write_comparison(out_dir: Path, rows: list[dict[str, Any]], champion: str | None,
                     note: dict[str, Any]) -> None:
    """comparison.csv (raw values) and comparison.md (formatted by each metric's unit): one
    row per model, the columns METRICS declares."""
    columns = comparison_columns()
    keys = [m.key for m in columns]
    write_csv(out_dir / "comparison.csv", rows, keys)
    head = "| " + " | ".join(m.column or m.key for m in columns) + " |"
    sep = "|" + "|".join("---" if k in LEFT_ALIGNED else "---:" for k in keys) + "|"
    body = ["| " + " | ".join(("**" + m.unit.cell(r[m.key]) + "**")
                              if m.key == "model" and r[m.key] == champion
                              else m.unit.cell(r[m.key]) for m in columns) + " |" for r in rows]
    champ_line = (f"**Champion: `{champion}`** (highest validation accuracy; ties: fewer "
                  f"parameters; the test set never chooses)." if champion else
                  "No champion: no model could be ranked.")
    lines = [
        "# Model comparison", "", champ_line, "",
        f"Test set: {note['test_n']} images ({note['test_n_public']} PublicTest, "
        f"{note['test_n_private']} PrivateTest; {note['test_n_clean']} without clean's flags). "
        f"Test-time augmentation: `{note['tta']}`. Speed: images/s of one plain pass over the "
        f"test set at batch {note['batch_size']} on this machine.", "",
        head, sep, *body, "",
    ]
    if note.get("registry"):
        lines += [f"Registry: {note['registry']}", ""]
    write_text(out_dir / "comparison.md", "\n".join(lines))
