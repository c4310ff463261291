"""What every benchmark script shares: a description of the machine, and the one way to append
a dated section (with the git commit it ran at) to the lab journal, experiments/journal.md.

Benchmarks run as `python benchmarks/<script>.py`, so `import common` finds this file; the
scripts in experiments/ import it too, run as `PYTHONPATH=benchmarks python experiments/<script>.py`.
The package itself is installed (editable) in the venv. A run's section is the raw record; the
figures a user reads are copied by hand into docs/results.md, with a link to the section.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from fer_pipeline.tracking import git_info

if TYPE_CHECKING:
    from fer_pipeline.arrays import SplitArrays

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "journal.md"
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_bf16_flags() -> list[str]:
    """The CPU's native bf16 matmul flags (what `train.precision: auto` looks at)."""
    from fer_pipeline.train.precision import cpu_flags

    flags = cpu_flags()
    return [f for f in BF16_FLAGS if f in flags]


def machine(backend: str | None = None, policy: str | None = None) -> str:
    """"<CPU>, <n> cores, <OS> (<bf16 flags>)[; keras backend X][; policy Y]"."""
    text = (f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} "
            f"({', '.join(cpu_bf16_flags()) or 'no AMX/AVX512-BF16'})")
    if backend:
        text += f"; keras backend {backend}"
    if policy:
        text += f"; dtype policy {policy}"
    return text


def command_line() -> str:
    """How this script was started, for the results' `command:` line."""
    return shlex.join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def commit() -> str:
    info = git_info(ROOT)
    short = info["commit"][:7] if info["commit"] != "unknown" else "unknown"
    return short + ("-dirty" if info["dirty"] == "true" else "")


def append_results(title: str, body_markdown: str, command: str | None = None,
                   results: str | Path = RESULTS) -> str:
    """Append `## <date> - <title> - commit <sha>` + the command + `body_markdown` to
    `results`; returns the section (scripts print it too)."""
    section = (f"\n## {datetime.now():%Y-%m-%d %H:%M} - {title} - commit {commit()}\n\n"
               f"- command: `{command or command_line()}`\n{body_markdown.rstrip()}\n")
    results = Path(results)
    if not results.exists():
        results.write_text("# Lab journal\n")
    with results.open("a") as fh:
        fh.write(section)
    return section


def capped(arrays: SplitArrays, cap: int | None, seed: int = 0) -> SplitArrays:
    """At most `cap` images per class of a split (SplitArrays), drawn at random (seeded);
    None keeps them all."""
    import numpy as np

    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.permutation(np.flatnonzero(arrays.y == c))[:cap]
                           for c in np.unique(arrays.y)])
    keep.sort()
    return subset(arrays, keep)


def subset(arrays: SplitArrays, idx) -> SplitArrays:
    """The images of a split at these indices (classes kept)."""
    from fer_pipeline.arrays import SplitArrays

    return SplitArrays(arrays.x[idx], arrays.y[idx], arrays.ids[idx], arrays.origin[idx],
                       arrays.classes)
