"""The training-curves figure, drawn from per-epoch history rows (history.csv).

One function for both places that show it: the MLflow run (training) and the evaluate
report, so the two pictures are the same.
"""

from __future__ import annotations

from typing import Any


def history_figure(rows: list[dict[str, Any]], title: str):
    """Loss and accuracy per epoch, train and validation (columns that exist)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        for prefix in ("", "val_"):
            col = prefix + key
            if col in rows[0]:
                ax.plot(ep, [float(r[col]) for r in rows], marker=".",
                        label=("val " if prefix else "train ") + key)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig
