"""Overhead of one dispatched training: what a stage job costs beyond the training itself,
in seconds and in bytes through S3.

A project whose git remote is a git daemon on 127.0.0.1 and whose DVC remote is moto's S3
server behind a byte-counting TCP relay; the parent side (make_job, push_inputs) and the worker
side (`runner.worker.execute`: clone, package check, pull, stage, push, result) run here without
Prefect, `--repeat` times with fresh run ids (the worker's mirror and DVC cache warm after the
first, as on a real worker). Prints and appends to experiments/journal.md.

    # tiny sandbox project (synthetic data, one 1-epoch model): the overhead in seconds
    PYTHONPATH=tests .venv/bin/python benchmarks/dispatch_overhead.py [--repeat 3]
    # a clone of a real project (raw data from its fer2013 remote, upstream stages run here):
    # the bytes one real training moves
    PYTHONPATH=tests .venv/bin/python benchmarks/dispatch_overhead.py --project . \
        --raw-remote /path/to/fer2013/dvc-remote --stage train@fernet \
        --prepare validate clean split teach@fernet -S models.fernet.epochs=2 --repeat 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from fer_pipeline.params import parse_overrides
from fer_pipeline.runner import dispatch, worker
from fer_pipeline.runner.overrides import write_overrides
from pool import start_git_daemon
from sandbox import make_project, sh
from team_stack import AWS_TEST_ENV, DVC_BUCKET, start_s3

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "journal.md"   # common.RESULTS


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


class ByteRelay:
    """A TCP relay in front of the S3 server that counts the bytes each way (HTTP headers
    included): `up` client -> S3, `down` S3 -> client."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit("//", 1)[1].rsplit(":", 1)
        self.target = (host, int(port))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.count = {"up": 0, "down": 0}
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def snapshot(self) -> tuple[int, int]:
        with self.lock:
            return self.count["up"], self.count["down"]

    def _accept(self) -> None:
        while True:
            client, _ = self.sock.accept()
            server = socket.create_connection(self.target)
            for src, dst, key in ((client, server, "up"), (server, client, "down")):
                threading.Thread(target=self._pump, args=(src, dst, key), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, key: str) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                with self.lock:
                    self.count[key] += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def real_project(args: argparse.Namespace, base: Path, env: dict[str, str]) -> Path:
    """A clone of --project with its default remote on the S3 server (committed in the clone:
    the workers read the remote from git), raw data pulled from --raw-remote, --prepare run."""
    repo = base / "src" / "repo"
    sh("git", "clone", "-q", str(Path(args.project).resolve()), str(repo), cwd=base)
    sh("git", "config", "user.email", "bench@fer", cwd=repo)
    sh("git", "config", "user.name", "bench", cwd=repo)
    sh("dvc", "remote", "modify", "storage", "url", f"s3://{DVC_BUCKET}/bench", cwd=repo)
    sh("git", "commit", "-qam", "bench: DVC remote on the test S3", cwd=repo)
    sh("dvc", "remote", "modify", "--local", "fer2013", "url",
       str(Path(args.raw_remote).resolve()), cwd=repo)
    subprocess.run(["dvc", "pull", "-q", "-r", "fer2013", "data/raw/fer2013.dvc"], cwd=repo,
                   env=env, check=True)
    for stage in args.prepare:
        print(f"prepare: {stage}", flush=True)
        subprocess.run(["dvc", "repro", "--single-item", stage], cwd=repo, env=env, check=True,
                       capture_output=True)
    return repo


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--project", help="clone this project instead of a tiny sandbox")
    ap.add_argument("--raw-remote", help="--project: DVC remote holding the raw images")
    ap.add_argument("--stage", default="train@custom_cnn")
    ap.add_argument("--prepare", nargs="*", default=["validate", "clean", "split",
                                                     "teach@custom_cnn"],
                    help="stages run in the parent before the job (its inputs)")
    ap.add_argument("-S", "--set", dest="sets", action="append", default=[],
                    metavar="KEY=VALUE", help="param override of the job (repeatable)")
    ap.add_argument("--no-record", action="store_true", help="do not append to experiments/journal.md")
    args = ap.parse_args()
    overrides = parse_overrides(args.sets)
    base = Path(tempfile.mkdtemp(prefix="fer-dispatch-"))
    s3 = start_s3(base)
    relay = ByteRelay(s3.url)
    os.environ.update({**AWS_TEST_ENV, "AWS_ENDPOINT_URL_S3": relay.url})
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{base / 'mlflow.db'}"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    try:
        if args.project:
            repo = real_project(args, base, env)
        else:
            repo = make_project(base / "src", n_models=1,
                                mlflow_uri=f"sqlite:///{base / 'mlflow.db'}")
            sh("dvc", "remote", "add", "-d", "storage", f"s3://{DVC_BUCKET}/bench", cwd=repo)
            shutil.copy(Path(__file__).parents[1] / "pyproject.toml", repo)   # the worker checks it
            sh("git", "add", "pyproject.toml", cwd=repo)
            sh("git", "commit", "-qam", "remote", cwd=repo)
        (base / "git").mkdir()
        sh("git", "clone", "-q", "--bare", str(repo), str(base / "git" / "fer.git"), cwd=base)
        daemon = start_git_daemon(base / "git", base)
        url = f"{daemon.url}/fer.git"
        os.environ["FER_GIT_REPOSITORY"] = url
        subprocess.run(["git", "remote", "remove", "origin"], cwd=repo, capture_output=True)
        sh("git", "remote", "add", "origin", url, cwd=repo)
        sh("git", "fetch", "-q", "origin", cwd=repo)
        if not args.project:
            for stage in args.prepare:
                subprocess.run(["dvc", "repro", "--single-item", stage], cwd=repo, env=env,
                               check=True, capture_output=True)
        commit = sh("git", "rev-parse", "HEAD", cwd=repo).strip()
        write_overrides(repo, overrides)   # the parent's run copy holds them, as in the flow
        rows, traffic, policy = [], [], []

        def log(message: str) -> None:
            print("  " + message[:160], flush=True)
            if "dtype policy:" in message:   # what train.precision chose on this machine
                policy.append(message.split("dtype policy:", 1)[1].split("(")[0].strip())

        for _ in range(args.repeat):
            run_id = uuid.uuid4().hex
            b0, t0 = relay.snapshot(), time.monotonic()
            job, inputs = dispatch.make_job(repo, args.stage, run_id, url, commit, overrides)
            dispatch.push_inputs(repo, inputs)
            push_in = time.monotonic() - t0
            b1 = relay.snapshot()
            result = worker.execute(job, root=base / "worker", log=log)
            t1, b2 = time.monotonic(), relay.snapshot()
            dispatch.collect(repo, args.stage, dispatch.read_result(repo, job),
                             log=lambda _m: None)
            collect, b3 = time.monotonic() - t1, relay.snapshot()
            laps = result["seconds"]
            overhead = push_in + sum(v for k, v in laps.items() if k != "stage") + collect
            rows.append({"parent_push_inputs": round(push_in, 2), **laps,
                         "parent_collect": round(collect, 2), "overhead": round(overhead, 2)})
            outs = sum(o.get("size", 0) for o in result["lock"].get("outs", []))
            traffic.append({"parent up (inputs)": b1[0] - b0[0],
                            "worker down (inputs, state)": b2[1] - b1[1],
                            "worker up (outputs, state, result)": b2[0] - b1[0],
                            "of which the stage's outputs (dvc.lock sizes)": outs,
                            "parent down (result, model)": b3[1] - b2[1],
                            "epochs run": _epochs(result)})
            print(json.dumps(rows[-1]), json.dumps(traffic[-1]), flush=True)
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
            f"({'real data' if args.project else 'tiny data'})\n\n`{_command(args)}` on "
            f"{machine}; git daemon + moto S3 on 127.0.0.1; one "
            f"1-epoch tiny CNN, float32. Seconds; `stage` is the training itself (dvc repro), "
            f"overhead = everything else (parent push + clone + pull + push + result + "
            f"parent collect). Run 1 has a cold mirror and DVC cache.\n\n" + "\n".join(table) + "\n")
    mib = [f"| {k} | " + " | ".join(
        f"{t[k] / 2**20:.1f} MiB" if "epochs" not in k else str(t[k]) for t in traffic) + " |"
        for k in traffic[0]]
    what = (f"{args.stage} of a clone of the project (real data), overrides {overrides or 'none'}"
            if args.project else "one 1-epoch tiny CNN on synthetic data")
    flags = "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    text = text.replace("one 1-epoch tiny CNN, float32", f"{what}, precision "
                        f"{policy[0] if policy else 'unknown'} (CPU {'with' if flags else 'without'} "
                        f"AVX512-BF16)")
    text += ("\nBytes through S3 (TCP relay in front of moto, HTTP headers included):\n\n| | "
             + " | ".join(f"run {i + 1}" for i in range(len(traffic))) + " |\n"
             + "|---" * (len(traffic) + 1) + "|\n" + "\n".join(mib) + "\n")
    print(text)
    if not args.no_record:
        with RESULTS.open("a") as fh:
            fh.write(text)
    return 0


def _command(args: argparse.Namespace) -> str:
    """This run's command line as a reader reruns it (no path of this machine)."""
    argv = sys.argv[1:]
    if args.raw_remote:
        argv = [("<fer2013 dvc-remote>" if a == args.raw_remote else a) for a in argv]
    return "PYTHONPATH=tests .venv/bin/python benchmarks/dispatch_overhead.py " + " ".join(argv)


def _epochs(result: dict) -> int | None:
    metrics = next((v for k, v in result.get("files", {}).items() if k.endswith("metrics.json")),
                   None)
    return json.loads(metrics).get("epochs_run") if metrics else None


if __name__ == "__main__":
    sys.exit(main())
