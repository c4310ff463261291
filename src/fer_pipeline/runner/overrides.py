"""Parameter overrides of one run, like `dvc exp run -S`: built from a profile, shortcuts and
dotted keys, and written into the run's own params.yaml (comments kept), never the checkout's."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fer_pipeline import params as P
from fer_pipeline.profiles import load_profile


def build_overrides(overrides: dict[str, Any] | None = None, *, models: Iterable[str] | None = None,
                    epochs: int | None = None, max_per_class: int | None = None,
                    profile: str | None = None, root: str | Path = ".") -> dict[str, Any]:
    """Flat {dotted.key: value}: profile first, then the named shortcuts, then `overrides`."""
    out: dict[str, Any] = {}
    if profile:
        out.update(load_profile(profile, Path(root) / "profiles"))
    if max_per_class is not None:
        out["data.max_per_class"] = max_per_class
    if epochs is not None:
        names = list(models) if models else list(model_names(root))
        for name in names:
            out[f"models.{name}.epochs"] = epochs
    out.update(overrides or {})
    return out


def model_names(root: str | Path) -> list[str]:
    return list(P.load(Path(root) / "params.yaml").models)


def write_overrides(root: str | Path, overrides: dict[str, Any],
                    validate: bool = True) -> dict[str, list[Any]]:
    """Write overrides into the workspace's params.yaml (comments kept). Returns changed keys
    as {key: [old, new]}; the file is left untouched when nothing changes. Every key and value
    is checked by the params loader first: a typo fails naming the key, and nothing is written.
    validate=False: a worker writing another commit's params.yaml, whose own loader (run by
    the stage) checks it; this installation's loader may not know that commit's keys."""
    if not overrides:
        return {}
    from ruamel.yaml import YAML  # a DVC dependency; round-trips comments

    path = Path(root) / "params.yaml"
    if validate:
        P.load(path, overrides)
    ryaml = YAML()
    ryaml.preserve_quotes = True
    data = ryaml.load(path.read_text())
    effective = _effective(path) if validate else {}
    changed: dict[str, list[Any]] = {}
    for key, value in overrides.items():
        old = _get_dotted(data, key)
        if old is None:            # a key params.yaml leaves out: its default is the old value
            old = _get_dotted(effective, key)
        if old != value:
            P.set_dotted(data, key, value)
            changed[key] = [_plain(old), value]
    if changed:
        with path.open("w") as fh:
            ryaml.dump(data, fh)
    return changed


def changes(root: str | Path, overrides: dict[str, Any]) -> dict[str, list[Any]]:
    """{key: [old, new]} for the overrides that differ from `root`'s params.yaml (read only:
    a resumed run copy already holds them, the checkout says what the run changed)."""
    data = _effective(Path(root) / "params.yaml")
    return {key: [_plain(old), value] for key, value in (overrides or {}).items()
            if (old := _get_dotted(data, key)) != value}


def _effective(path: Path) -> dict[str, Any]:
    """params.yaml with every default filled in (what a run reads), as plain data."""
    return P.to_dict(P.load(path))


def _get_dotted(data: Any, key: str) -> Any:
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
