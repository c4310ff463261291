"""The champion rule, in one place: evaluate registers by it, the runner's report shows it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def choose_champion(candidates: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Highest validation accuracy (from training); ties: fewer trainable params, then name.

    The test set never takes part. Models without a validation accuracy cannot be chosen.
    """
    ranked = [(n, c) for n, c in candidates.items() if c.get("val_accuracy") is not None]
    if not ranked:
        return None
    return min(ranked, key=lambda nc: (-float(nc[1]["val_accuracy"]),
                                       int(nc[1].get("trainable_params") or 0), nc[0]))[0]
