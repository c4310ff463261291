"""Kill a training mid-run the way a machine is lost: SIGKILL to its whole process group, no
cleanup, as soon as its history lists a number of finished epochs (the package itself has no
crash hook)."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Killed:
    returncode: int
    output: str
    epochs: int          # finished epochs in the history when the kill landed


def finished_epochs(history: Path) -> int:
    try:
        return max(0, len(history.read_text().splitlines()) - 1)
    except OSError:
        return 0


def kill_after_epochs(cmd: list[str], history: Path, epochs: int, *, cwd: Path,
                      env: dict[str, str], timeout_s: float = 600) -> Killed:
    """Run `cmd` in its own session; SIGKILL the session once `history` (a CSV with a header)
    has `epochs` rows. Fails if the command ends first or the timeout passes."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while finished_epochs(history) < epochs:
            if proc.poll() is not None:
                out.seek(0)
                raise AssertionError(f"{cmd[:3]} ended (exit {proc.returncode}) before epoch "
                                     f"{epochs}:\n{out.read()[-3000:]}")
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise AssertionError(f"no {epochs} finished epochs within {timeout_s:g}s")
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        out.seek(0)
        return Killed(proc.returncode, out.read(), finished_epochs(history))
