"""Waiting for flow runs that a real worker process executes, then stopping that worker
(tests/flows: the deployment and git-clone tests)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from typing import Any

from prefect import get_client


def finish_runs(worker: subprocess.Popen, run_ids: list[Any], timeout_s: int = 600,
                grace_s: int = 30) -> tuple[list[Any], str]:
    """The flow runs once all are final (or as they are after `timeout_s`), and the worker's
    output after it was stopped: SIGTERM to its process group, SIGKILL after `grace_s`."""

    async def wait() -> list[Any]:
        async with get_client() as client:
            for _ in range(timeout_s):
                runs = [await client.read_flow_run(i) for i in run_ids]
                if all(r.state and r.state.is_final() for r in runs):
                    break
                await asyncio.sleep(1)
            return runs

    try:
        runs = asyncio.run(wait())
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            log = worker.communicate(timeout=grace_s)[0]
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            log = worker.communicate()[0]
    return runs, log
