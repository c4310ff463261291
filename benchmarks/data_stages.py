"""Wall time of the data stages on the real dataset: `dvc repro -f split`, then a no-op repro.

    python benchmarks/data_stages.py        # appends to experiments/journal.md

Run from the project root with the data pulled (`make data`) and the machine otherwise idle.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import common


def timed(cmd: list[str]) -> float:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=common.RESULTS, help="file to append to")
    args = ap.parse_args()
    dvc = str(Path(sys.executable).parent / "dvc")
    full = timed([dvc, "repro", "-f", "split"])
    noop = timed([dvc, "repro", "split"])
    body = ("- runs `dvc repro -f split`, then `dvc repro split`\n"
            f"- machine: {common.machine()}\n"
            f"- validate + clean + split on the full FER-2013 (35,887 files): **{full:.1f} s** wall\n"
            f"- second `dvc repro split`, nothing changed: **{noop:.1f} s**\n")
    print(common.append_results("data stages", body, results=args.results))


if __name__ == "__main__":
    main()
