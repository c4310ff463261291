"""A stage job: one stage of one pipeline run, described by data, never by a path.

The parent run sends it to a worker as the `fer-train` flow run's parameters; everything in it
is checked on arrival (a flow parameter comes from whoever reaches the Prefect API):
- repository: a git URL the worker is allowed to clone (FER_GIT_REPOSITORY on the worker, or
  one of FER_ALLOWED_REPOSITORIES), never a folder of the parent's machine;
- commit: the exact commit the parent runs (a branch moved since does not matter);
- stage: an item of a gpu stage (`train@<model>`: dvc.yaml `meta: {gpu: true}`, checked by
  the worker in the commit's dvc.yaml); overrides: dotted params, under the flow-input policy;
- run_id: the pipeline run id (MLflow tag, the exchange folder on the remote);
- locks: the dvc.lock entries of the stages whose outputs this stage reads, so the worker
  pulls exactly those files by hash;
- attempt: 1, then 2... when a worker died and the job went to another one.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlparse

from fer_pipeline.errors import FerError

REPOSITORY_ENV = "FER_GIT_REPOSITORY"
ALLOWED_REPOSITORIES_ENV = "FER_ALLOWED_REPOSITORIES"   # whitespace-separated extra URLs
_COMMIT = re.compile(r"[0-9a-f]{40}")
_STAGE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*@[A-Za-z0-9_][A-Za-z0-9_.-]*")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,80}")
_LOCK_STAGE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]*")


@dataclass(frozen=True)
class StageJob:
    repository: str
    commit: str
    stage: str
    run_id: str
    overrides: dict[str, Any] = field(default_factory=dict)
    locks: dict[str, dict[str, Any]] = field(default_factory=dict)
    attempt: int = 1

    def to_params(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_params(cls, raw: Any) -> StageJob:
        """The job a flow parameter describes, every field checked (FerError naming it)."""
        if not isinstance(raw, dict):
            raise FerError(f"a stage job is a mapping, not {type(raw).__name__}")
        known = set(cls.__dataclass_fields__)
        extra = sorted(set(raw) - known)
        if extra:
            raise FerError(f"stage job: unknown field(s) {extra}; known: {sorted(known)}")
        try:
            job = cls(**raw)
        except TypeError as exc:
            raise FerError(f"stage job: {exc}") from None
        job.check()
        return job

    def check(self) -> None:
        from fer_pipeline.runner.policy import check_flow_inputs

        if not isinstance(self.commit, str) or not _COMMIT.fullmatch(self.commit):
            raise FerError(f"stage job: commit {self.commit!r} is not a full 40-hex commit id")
        if not isinstance(self.stage, str) or not _STAGE.fullmatch(self.stage):
            raise FerError(f"stage job: stage {self.stage!r} refused: only items of a gpu stage "
                           f"(<stage>@<item>) run on workers")
        if not isinstance(self.run_id, str) or not _RUN_ID.fullmatch(self.run_id):
            raise FerError(f"stage job: run_id {self.run_id!r} is not a run id")
        if not isinstance(self.attempt, int) or not 1 <= self.attempt <= 100:
            raise FerError(f"stage job: attempt {self.attempt!r} is not 1..100")
        if not isinstance(self.locks, dict) or not all(
                isinstance(k, str) and _LOCK_STAGE.fullmatch(k) and isinstance(v, dict)
                for k, v in self.locks.items()):
            raise FerError("stage job: locks must map stage names to dvc.lock entries")
        for entry in self.locks.values():
            for item in [*entry.get("deps", []), *entry.get("outs", [])]:
                path = str(item.get("path", "")) if isinstance(item, dict) else ""
                if not path or path.startswith(("/", "~")) or ".." in path.split("/"):
                    raise FerError(f"stage job: lock entry path {path!r} is not a project path")
        check_flow_inputs(self.overrides, None, ".")
        check_repository(self.repository)


def allowed_repositories() -> list[str]:
    urls = [os.environ.get(REPOSITORY_ENV, "")]
    urls += os.environ.get(ALLOWED_REPOSITORIES_ENV, "").split()
    return [u.strip() for u in urls if u.strip()]


def check_repository(url: Any) -> str:
    """`url` when it is a git URL this worker may clone; else a FerError saying what to set."""
    if not isinstance(url, str) or not url:
        raise FerError("stage job: no repository URL")
    parsed = urlparse(url)
    is_url = parsed.scheme in ("https", "http", "ssh", "git") or re.fullmatch(
        r"[\w.-]+@[\w.-]+:[\w./~-]+", url) is not None
    if not is_url:
        raise FerError(f"stage job: repository {url!r} is a path, not a URL: workers share the "
                       f"git remote, not a filesystem (set the project's `origin` to the team's "
                       f"git URL)")
    if parsed.username or parsed.password:
        raise FerError("stage job: the repository URL holds credentials; give them to the "
                       "worker (a credential helper or SSH key), not to a flow parameter")
    allowed = allowed_repositories()
    if url not in allowed:
        raise FerError(f"stage job: repository {url} is not one this worker clones "
                       f"({REPOSITORY_ENV}={os.environ.get(REPOSITORY_ENV) or '<unset>'}, "
                       f"{ALLOWED_REPOSITORIES_ENV}); set it in the worker's environment")
    return url
