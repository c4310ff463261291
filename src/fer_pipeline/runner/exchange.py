"""What a stage job moves through the team's DVC remote besides DVC's own objects.

The machines of a pool share a git remote, an object store, a database and the Prefect
server, nothing else. DVC's default remote already holds the data and the models (by hash);
beside them, under `runs/<pipeline run id>/<stage>/`, this module keeps
- `state/`: a training's resume state (Keras backup, history, best model, MLflow run id), so a
  retry on another machine continues where a dead one stopped;
- `result.json`: the finished job's dvc.lock entry and its small uncached outputs, which the
  parent run reads back.
`dvc gc --cloud` only looks at `files/`, so these prefixes are left alone; a finished run
removes its own `state/`.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


class RunStore:
    """`runs/<run_id>/<stage>/` on the default DVC remote of the project at `root`."""

    def __init__(self, root: str | Path, run_id: str, stage: str) -> None:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            remote = repo.cloud.get_remote()
        self.fs = remote.fs
        self.base = self.fs.join(remote.path, "runs", run_id, stage.replace("@", "-"))
        self.url = self.fs.unstrip_protocol(self.base)

    def _path(self, *parts: str) -> str:
        return self.fs.join(self.base, *parts)

    # ---- small JSON documents ----
    def put_json(self, name: str, obj: Any) -> None:
        self.fs.pipe_file(self._path(name), json.dumps(obj, indent=1, default=str).encode())

    def get_json(self, name: str) -> Any | None:
        path = self._path(name)
        if not self.fs.exists(path):
            return None
        return json.loads(self.fs.cat_file(path))

    # ---- a folder (the resume state) ----
    def push_dir(self, local: Path, name: str = "state",
                 uploaded: dict[str, tuple[int, int]] | None = None) -> int:
        """Upload the files of `local` that changed since `uploaded` (rel -> (size, mtime_ns)),
        each from a copy taken first (training goes on writing), then the manifest, last: a
        reader that finds a manifest finds every file it names. Unchanged files (a transfer
        model's feature cache) are neither copied nor sent again. Returns the files sent."""
        uploaded = {} if uploaded is None else uploaded
        if not local.is_dir():
            return 0
        files = {str(p.relative_to(local)): p for p in sorted(local.rglob("*")) if p.is_file()}
        changed = {}
        for rel, p in files.items():
            st = p.stat()
            if uploaded.get(rel) != (st.st_size, st.st_mtime_ns):
                changed[rel] = (p, (st.st_size, st.st_mtime_ns))
        if not changed:
            return 0
        with tempfile.TemporaryDirectory(prefix="fer-state-") as tmp:
            for i, (rel, (p, key)) in enumerate(changed.items()):
                snap = Path(tmp) / str(i)
                shutil.copy2(p, snap)
                self.fs.put_file(str(snap), self._path(name, rel))
                uploaded[rel] = key
        self.put_json(f"{name}/{MANIFEST}", sorted(files))
        return len(changed)

    def pull_dir(self, local: Path, name: str = "state") -> int:
        """Download the files the manifest names into `local` (replacing it). 0: none stored."""
        files = self.get_json(f"{name}/{MANIFEST}")
        if not files:
            return 0
        shutil.rmtree(local, ignore_errors=True)
        for rel in files:
            dst = local / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._path(name, rel), str(dst))
        return len(files)

    def remove(self, name: str) -> None:
        path = self._path(name)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)


class StateSync:
    """Uploads a folder to a RunStore every `every_s` seconds while it changes (a thread),
    and once more at stop. A dead machine loses at most the last `every_s` seconds."""

    def __init__(self, store: RunStore, local: Path, every_s: float = 5.0,
                 log_fn: Callable[[str], None] = log.info) -> None:
        self.store, self.local, self.every_s, self.log = store, local, every_s, log_fn
        self._uploaded: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fer-state-sync", daemon=True)

    def __enter__(self) -> StateSync:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sync()

    def sync(self) -> None:
        try:
            sent = self.store.push_dir(self.local, uploaded=self._uploaded)
        except FileNotFoundError:
            return          # the stage cleared its state between listing and copying
        except Exception as exc:  # noqa: BLE001 - a failed upload must not stop the training
            self.log(f"resume state not uploaded this time ({type(exc).__name__}: {exc})")
            return
        if sent:
            self.log(f"resume state: {sent} file(s) uploaded to {self.store.url}/state")
