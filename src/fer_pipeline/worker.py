"""`fer worker`: a Prefect worker that states its devices and refuses a GPU pool without a GPU.

A worker of the `gpu` pool that cannot see a GPU (a CPU-only TensorFlow, a broken CUDA install,
the wrong backend) would take trainings and run them on its CPU for hours; it refuses to start
instead, unless told that CPU is fine (`--allow-no-gpu` or FER_WORKER_ALLOW_NO_GPU=1).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from fer_pipeline.backend import GPU_HELP, Device, devices
from fer_pipeline.errors import FerError

GPU_POOLS = ("gpu",)
ALLOW_ENV = "FER_WORKER_ALLOW_NO_GPU"


def check_devices(pool: str, backend: str, allow_no_gpu: bool = False) -> list[Device]:
    """The devices `backend` sees here; FerError when `pool` is a GPU pool and none is a GPU."""
    found = devices(backend)
    if pool in GPU_POOLS and not any(d.kind == "gpu" for d in found) and not allow_no_gpu:
        seen = "; ".join(map(str, found)) or "nothing"
        raise FerError(
            f"work pool `{pool}` runs trainings on GPUs, but the {backend} backend sees no GPU "
            f"here (it sees: {seen}). To fix: {GPU_HELP}; check with `nvidia-smi`. To run this "
            f"pool's trainings on CPU anyway: `fer worker --allow-no-gpu` or {ALLOW_ENV}=1.")
    return found


def allowed_by_env() -> bool:
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes")


def prefect_command(pool: str, queue: str | None = None, limit: int | None = None,
                    name: str | None = None) -> list[str]:
    """`prefect worker start` for a process worker of `pool` (the venv's prefect first)."""
    exe = Path(sys.executable).parent / "prefect"
    cmd = [str(exe) if exe.is_file() else (shutil.which("prefect") or "prefect"),
           "worker", "start", "--pool", pool, "--type", "process"]
    if queue:
        cmd += ["--work-queue", queue]
    if limit:
        cmd += ["--limit", str(limit)]
    if name:
        cmd += ["--name", name]
    return cmd
