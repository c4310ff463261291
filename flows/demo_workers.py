"""Two local workers share the trainings of one fer-pipeline run (`make demo-workers`).

Starts a throw-away Prefect server (own PREFECT_HOME), registers prefect.yaml's deployments
with a `gpu` limit of 2, starts two workers on the pool's `train` queue (`--limit 1` each: one
training per worker, as on a one-GPU machine), then runs fer-pipeline with dispatch="workers" on
a synthetic copy of the project and prints which worker ran each training and when.

    python -m flows.demo_workers [--models 2] [--epochs N] [--keep]   (from the repo root)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"{url} did not answer within {timeout:.0f}s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=2, help="models to train (default: %(default)s)")
    ap.add_argument("--epochs", type=int, help="override models.<each>.epochs (sandbox: 1)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (server db, project)")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="fer-demo-"))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(tmp / "prefect"), PREFECT_API_URL=api,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", FER_WORKSPACE_DIR=str(tmp / "ws"),
               # Workers clone the code (prefect.yaml's git_clone step): this checkout's
               # committed HEAD, never a remote this machine may not reach.
               FER_GIT_REPOSITORY=str(ROOT), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    os.environ.update(env)
    procs: list[subprocess.Popen] = []

    def start(name: str, *cmd: str) -> subprocess.Popen:
        log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(list(cmd), cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        procs.append(p)
        return p

    t0 = time.monotonic()
    try:
        start("server", str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
              "--port", str(port))
        wait_http(api + "/health", 180)
        print(f"[{time.monotonic() - t0:5.1f}s] Prefect server {api} (logs in {tmp})")
        subprocess.run([sys.executable, str(ROOT / "flows/deploy.py"), "--gpus", "2"], env=env,
                       check=True, capture_output=True, text=True)
        workers = {}
        for name in ("worker-a", "worker-b"):
            p = start(name, str(BIN / "prefect"), "worker", "start", "--pool", "gpu",
                      "--work-queue", "train", "--limit", "1", "--name", name)
            workers[p.pid] = name
        print(f"[{time.monotonic() - t0:5.1f}s] deployments registered; workers "
              f"{', '.join(f'{n} (pid {p})' for p, n in workers.items())} polling gpu/train")

        from fer_pipeline.sandbox import make_project
        from flows.pipeline import fer_pipeline

        project = make_project(tmp, n_models=args.models)
        t1 = time.monotonic()
        state = fer_pipeline(project_dir=str(project), epochs=args.epochs, dispatch="workers",
                             return_state=True)
        total = time.monotonic() - t1
        if not state.is_completed():
            print(state.message)
            return 1
        out = state.result()
        print(f"\nfer-pipeline run {out['run_id']}: {total:.1f}s with dispatch=workers")
        trains = [s for s in out["stages"] if "@" in s["stage"]]
        first = min(s.get("started", 0) for s in trains)
        for s in out["stages"]:
            if "@" in s["stage"]:
                who = workers.get(s.get("worker_pid"), f"pid {s.get('worker_pid')}")
                print(f"  {s['stage']:26} {s['status']:7} on {who:9} "
                      f"{s['started'] - first:5.1f}s -> {s['ended'] - first:5.1f}s "
                      f"(fer-train run {s['flow_run']})")
            else:
                print(f"  {s['stage']:26} {s['status']:7} {s['seconds']:.1f}s")
        ran_on = {s.get("worker_pid") for s in trains}
        overlap = max(s["started"] for s in trains) < min(s["ended"] for s in trains)
        print(f"\ntrainings ran on {len(ran_on)} worker(s); overlapping in time: {overlap}")
        status = subprocess.run([str(BIN / "dvc"), "status"], cwd=project, capture_output=True,
                                text=True).stdout.strip()
        print(f"dvc status in the project after bring-back: {status}")
        return 0 if (len(ran_on) > 1 or len(trains) < 2) and overlap else 1
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
