"""Wall time of the data stages on the real dataset: `dvc repro -f split`, then a no-op repro.

    python benchmarks/data_stages.py        # appends to benchmarks/results.md

Run from the project root with the data pulled (`make data`) and the machine otherwise idle.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

RESULTS = Path(__file__).with_name("results.md")


def timed(cmd: list[str]) -> float:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    dvc = str(Path(sys.executable).parent / "dvc")
    full = timed([dvc, "repro", "-f", "split"])
    noop = timed([dvc, "repro", "split"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    text = (
        f"\n## {datetime.now():%Y-%m-%d %H:%M} - data stages - commit {commit}\n\n"
        f"- command: `python benchmarks/data_stages.py` (= `dvc repro -f split`, then `dvc repro split`)\n"
        f"- machine: {cpu_name()}, {os.cpu_count()} cores\n"
        f"- validate + clean + split on the full FER-2013 (35,887 files): **{full:.1f} s** wall\n"
        f"- second `dvc repro split`, nothing changed: **{noop:.1f} s**\n"
    )
    with RESULTS.open("a") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
