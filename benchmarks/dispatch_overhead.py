"""Overhead of one dispatched training: what a stage job costs beyond the training itself.

A tiny sandbox project (synthetic data, one 1-epoch model) whose git remote is a git daemon on
127.0.0.1 and whose DVC remote is moto's S3 server; the parent side (make_job, push_inputs) and
the worker side (`runner.worker.execute`: clone, package check, pull, stage, push, result) run
here without Prefect, `--repeat` times with fresh run ids (the worker's mirror and DVC cache
warm after the first, as on a real worker). Prints and appends to benchmarks/results.md.

    PYTHONPATH=tests .venv/bin/python benchmarks/dispatch_overhead.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from fer_pipeline.runner import dispatch, worker
from fer_pipeline.sandbox import make_project, sh
from pool import start_git_daemon
from team_stack import AWS_TEST_ENV, DVC_BUCKET, start_s3

RESULTS = Path(__file__).with_name("results.md")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-record", action="store_true", help="do not append to results.md")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="fer-dispatch-"))
    s3 = start_s3(base)
    os.environ.update({**AWS_TEST_ENV, "AWS_ENDPOINT_URL_S3": s3.url})
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        repo = make_project(base / "src", n_models=1,
                            mlflow_uri=f"sqlite:///{base / 'mlflow.db'}")
        sh("dvc", "remote", "add", "-d", "storage", f"s3://{DVC_BUCKET}/bench", cwd=repo)
        sh("git", "commit", "-qam", "remote", cwd=repo)
        (base / "git").mkdir()
        sh("git", "clone", "-q", "--bare", str(repo), str(base / "git" / "fer.git"), cwd=base)
        daemon = start_git_daemon(base / "git", base)
        url = f"{daemon.url}/fer.git"
        os.environ["FER_GIT_REPOSITORY"] = url
        sh("git", "remote", "add", "origin", url, cwd=repo)
        sh("git", "fetch", "-q", "origin", cwd=repo)
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        for stage in ("validate", "clean", "split", "teach@custom_cnn"):
            subprocess.run(["dvc", "repro", "--single-item", stage], cwd=repo, env=env, check=True,
                           capture_output=True)
        commit = sh("git", "rev-parse", "HEAD", cwd=repo).strip()
        rows = []
        for _ in range(args.repeat):
            run_id = uuid.uuid4().hex
            t0 = time.monotonic()
            job, inputs = dispatch.make_job(repo, "train@custom_cnn", run_id, url, commit, {})
            dispatch.push_inputs(repo, inputs)
            push_in = time.monotonic() - t0
            result = worker.execute(job, root=base / "worker", log=lambda _m: None)
            t1 = time.monotonic()
            dispatch.collect(repo, "train@custom_cnn", dispatch.read_result(repo, job),
                             log=lambda _m: None)
            collect = time.monotonic() - t1
            laps = result["seconds"]
            overhead = push_in + sum(v for k, v in laps.items() if k != "stage") + collect
            rows.append({"parent_push_inputs": round(push_in, 2), **laps,
                         "parent_collect": round(collect, 2), "overhead": round(overhead, 2)})
            print(json.dumps(rows[-1]), flush=True)
        daemon.stop()
    finally:
        s3.stop()
    keys = list(rows[0])
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    machine = f"{cpu_name()}, {os.cpu_count()} cores"
    table = ["| phase | " + " | ".join(f"run {i + 1}" for i in range(len(rows))) + " | median |",
             "|---" * (len(rows) + 2) + "|"]
    table += [f"| {k} | " + " | ".join(f"{r[k]:.2f}" for r in rows) + f" | {med[k]:.2f} |"
              for k in keys]
    text = (f"\n## {time.strftime('%Y-%m-%d %H:%M')}: dispatch overhead of one stage job "
            f"(tiny data)\n\n`PYTHONPATH=tests .venv/bin/python benchmarks/dispatch_overhead.py "
            f"--repeat {args.repeat}` on {machine}; git daemon + moto S3 on 127.0.0.1; one "
            f"1-epoch tiny CNN, float32. Seconds; `stage` is the training itself (dvc repro), "
            f"overhead = everything else (parent push + clone + pull + push + result + "
            f"parent collect). Run 1 has a cold mirror and DVC cache.\n\n" + "\n".join(table) + "\n")
    print(text)
    if not args.no_record:
        with RESULTS.open("a") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
