"""What every artifact model shares: strict fields, reading with a message that names the file
and the stage that makes it, and writing that keeps the file's bytes as they were.

Writing dumps what was set (`exclude_unset`): a key a writer gave is written even when null, a
key an older file lacked stays absent when it is read and written back, so re-writing a
committed file changes no byte and no DVC hash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from fer_pipeline.errors import FerError, MissingInputError
from fer_pipeline.io import write_json


class ArtifactError(FerError):
    """A file or an answer that does not match its model (a hand edit, another version)."""


def _explain(exc: ValidationError, where: str) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {loc}: {first['msg']}{more}"


class JsonFile:
    """read/parse/write, mixed into a BaseModel or a RootModel."""

    @classmethod
    def parse(cls, data: Any, where: str = "data") -> Self:
        """From already-decoded JSON; an ArtifactError names the first wrong key."""
        try:
            return cls.model_validate(data)  # type: ignore[attr-defined]
        except ValidationError as exc:
            raise ArtifactError(_explain(exc, where)) from None

    @classmethod
    def from_json(cls, text: str, where: str = "data") -> Self:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{where} is not valid JSON ({exc})") from exc
        return cls.parse(data, where)

    @classmethod
    def read(cls, path: str | Path, hint: str = "") -> Self:
        """The file at `path`; a missing file says `hint` (which stage makes it)."""
        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"{path} not found" + (f": {hint}" if hint else ""))
        try:
            return cls.from_json(path.read_text(), str(path))
        except ArtifactError as exc:
            raise ArtifactError(f"{exc}" + (f"; {hint}" if hint else "")) from None

    def to_data(self) -> Any:
        """Plain JSON data, keys in the model's order (as the file is written)."""
        return self.model_dump(mode="python", exclude_unset=True, by_alias=True)  # type: ignore[attr-defined]

    def to_json(self) -> str:
        return json.dumps(self.to_data(), indent=2, default=str)

    def write(self, path: str | Path) -> None:
        """Atomically, as `fer_pipeline.io.write_json` writes every JSON file."""
        write_json(path, self.to_data())


class Artifact(JsonFile, BaseModel):
    """A JSON object we write: an unknown key is refused, never dropped."""

    model_config = ConfigDict(extra="forbid")
