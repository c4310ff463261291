"""Choose the Keras dtype policy: mixed precision only where the hardware gains from it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fer_pipeline.backend import Device, gpus

log = logging.getLogger(__name__)
BF16_CAPABILITY = (8, 0)   # Ampere and later: bf16 tensor cores (and fp32 range, no loss scaling)


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def visible_gpus() -> list[Device]:
    import keras

    return gpus(keras.backend.backend())


def auto_policy(flags: set[str] | None = None, gpu_devices: list[Device] | None = None) -> str:
    """On GPUs: mixed_bfloat16 when every visible GPU has bf16 tensor cores (compute capability
    8.0+: A100, H100, H200, L4...), mixed_float16 on older ones (V100, T4: fp16 only).
    On CPUs: mixed_bfloat16 with native bf16 matmul units (AMX or AVX512-BF16, where bf16
    measured 2x faster than float32 on this project's CNN); float32 otherwise (bf16 emulated in
    software is slower than float32)."""
    found = visible_gpus() if gpu_devices is None else gpu_devices
    if found:
        if all(d.capability and d.capability >= BF16_CAPABILITY for d in found):
            return "mixed_bfloat16"
        return "mixed_float16"
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags or "avx512_bf16" in flags:
        return "mixed_bfloat16"
    return "float32"


def resolve_policy(precision: str) -> str:
    env = os.environ.get("FER_TRAIN_PRECISION")
    if env:
        precision = env
    return auto_policy() if precision == "auto" else precision


def apply_policy(precision: str) -> str:
    import keras

    policy = resolve_policy(precision)
    keras.mixed_precision.set_global_policy(policy)
    log.info("dtype policy: %s (train.precision=%s, backend %s)", policy, precision,
             keras.backend.backend())
    return policy
