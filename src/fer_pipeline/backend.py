"""Which Keras backend a process trains on, and which devices that backend sees.

Keras fixes its backend when it is first imported (from KERAS_BACKEND), so the choice is made
before that import. The worker's environment (KERAS_BACKEND, set per machine: a GPU worker with
JAX on CUDA) wins over the project's `train.backend`; TensorFlow stays the default because the
CPU install ships it. Nothing here imports Keras or a stage.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass

from fer_pipeline.errors import FerError
from fer_pipeline.params import BACKENDS

ENV = "KERAS_BACKEND"
GPU_HELP = ("install the GPU extra on this worker (`pip install -e '.[gpu]'`: JAX with CUDA) "
            "and set KERAS_BACKEND=jax in its environment (or train.backend: jax)")


@dataclass(frozen=True)
class Device:
    """One device as the backend reports it; `capability` is the CUDA compute capability."""

    kind: str                              # "gpu" | "cpu"
    name: str
    capability: tuple[int, int] | None = None

    def __str__(self) -> str:
        cc = f", compute capability {self.capability[0]}.{self.capability[1]}" \
            if self.capability else ""
        return f"{self.kind}: {self.name}{cc}"


def requested(param: str) -> str:
    """The backend this process will use: KERAS_BACKEND when set, else the param."""
    chosen = os.environ.get(ENV) or param
    if chosen not in BACKENDS:
        src = f"{ENV}={chosen}" if os.environ.get(ENV) else f"train.backend: {chosen}"
        raise FerError(f"{src}: unsupported Keras backend; use one of {', '.join(BACKENDS)}")
    return chosen


def select(param: str) -> str:
    """Make Keras load `requested(param)`. Fails clearly when the backend is not installed or
    when Keras is already loaded in this process with another backend (a new process is
    needed then: the CLI and DVC stages always start one)."""
    chosen = requested(param)
    if "keras" in sys.modules:
        current = sys.modules["keras"].backend.backend()
        if current != chosen:
            raise FerError(f"the Keras backend {chosen} was asked for, but Keras is already loaded "
                           f"with {current} in this process; start it with {ENV}={chosen}")
        return current
    if importlib.util.find_spec(chosen) is None:
        raise FerError(f"the Keras backend {chosen} is not installed here; "
                       + (GPU_HELP if chosen == "jax" else "pip install -e . installs it"))
    os.environ[ENV] = chosen
    return chosen


def devices(backend: str) -> list[Device]:
    """The devices `backend` sees (importing the backend library, not Keras)."""
    if backend == "jax":
        import jax

        out = []
        for d in jax.devices():
            cc = getattr(d, "compute_capability", None)
            out.append(Device("gpu" if d.platform in ("gpu", "cuda", "rocm") else d.platform,
                              str(getattr(d, "device_kind", d)), _capability(cc)))
        return out
    if backend == "tensorflow":
        import tensorflow as tf

        out = [Device("cpu", "host CPU")]
        for d in tf.config.list_physical_devices("GPU"):
            details = tf.config.experimental.get_device_details(d)
            out.append(Device("gpu", details.get("device_name", d.name),
                              _capability(details.get("compute_capability"))))
        return out
    raise FerError(f"unsupported Keras backend {backend}; use one of {', '.join(BACKENDS)}")


def gpus(backend: str) -> list[Device]:
    """The GPUs `backend` sees; none when it cannot tell (no device info = no GPU)."""
    try:
        return [d for d in devices(backend) if d.kind == "gpu"]
    except FerError:
        raise
    except Exception:  # noqa: BLE001 - a broken CUDA install reads as no GPU, with the reason logged
        import logging

        logging.getLogger(__name__).warning("%s could not list its devices", backend, exc_info=True)
        return []


def _capability(cc) -> tuple[int, int] | None:
    """(major, minor) from JAX's "9.0" or TensorFlow's (9, 0)."""
    if cc is None:
        return None
    if isinstance(cc, str):
        major, _, minor = cc.partition(".")
        return int(major), int(minor or 0)
    return int(cc[0]), int(cc[1])
