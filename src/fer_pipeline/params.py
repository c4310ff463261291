"""Typed view of params.yaml.

params.yaml is loaded once per process into frozen dataclasses, so a typo in a key fails at
start-up with the key's name instead of silently using a default deep inside a stage.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """params.yaml has a missing, unknown or mistyped key."""


@dataclass(frozen=True)
class DataParams:
    raw_dir: str = "data/raw/fer2013"
    classes: list[str] = field(
        default_factory=lambda: ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
    )
    splits: list[str] = field(default_factory=lambda: ["train", "test"])
    image_size: int = 48
    max_per_class: int | None = None


@dataclass(frozen=True)
class ValidateParams:
    allowed_extensions: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png"])
    class_count_min: dict[str, int] = field(default_factory=lambda: {"train": 300, "test": 80})
    class_count_max: dict[str, int] = field(
        default_factory=lambda: {"train": 10000, "test": 2500}
    )
    max_bad_file_fraction: float = 0.01
    blank_std_threshold: float = 2.0
    max_duplicate_fraction: float = 0.1


@dataclass(frozen=True)
class CleanParams:
    keep_extensions: list[str] = field(default_factory=lambda: ["jpeg", "jpg", "png"])
    color_policy: str = "convert"
    size_policy: str = "drop"
    blank_std_threshold: float = 2.0
    drop_duplicates: bool = True
    drop_label_conflicts: bool = True
    drop_test_leak: bool = True

    def __post_init__(self) -> None:
        _choice("clean.color_policy", self.color_policy, {"convert", "drop"})
        _choice("clean.size_policy", self.size_policy, {"drop", "resize"})


@dataclass(frozen=True)
class SplitParams:
    val_fraction: float = 0.2
    seed: int = 42

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ParamsError(f"split.val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    clean: CleanParams = field(default_factory=CleanParams)
    split: SplitParams = field(default_factory=SplitParams)
    # Sections owned by later stages are kept as raw dicts here and typed by their own
    # modules (train/evaluate), so the data stages do not import TensorFlow-side code.
    extra: dict[str, Any] = field(default_factory=dict)


def _choice(name: str, value: str, allowed: set[str]) -> None:
    if value not in allowed:
        raise ParamsError(f"{name} must be one of {sorted(allowed)}, got {value!r}")


def build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ParamsError(f"unknown key(s) in {where}: {', '.join(unknown)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # missing required field
        raise ParamsError(f"{where}: {exc}") from exc


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ParamsError as exc:
                errors.append(str(exc))
        raise ParamsError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{where} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where} must be a mapping, got {value!r}")
        return {k: _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()} if args else value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ParamsError(f"{where} must be {tp.__name__}, got {value!r}")
        return value
    return value


def load_raw(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path} (run from the project root)")
    with path.open() as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping at the top level")
    return raw


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    raw = load_raw(path)
    own = {"data": DataParams, "validate": ValidateParams, "clean": CleanParams,
           "split": SplitParams}
    typed = {k: build(cls, raw.get(k), k) for k, cls in own.items()}
    extra = {k: v for k, v in raw.items() if k not in own}
    return Params(**typed, extra=extra)


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply one `a.b.c=value` override, as `dvc exp run -S` does."""
    keys = dotted.split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ParamsError(f"cannot set {dotted}: {key} is not a mapping")
    node[keys[-1]] = value
