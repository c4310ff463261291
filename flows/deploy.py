"""Register the deployments of prefect.yaml on the server at PREFECT_API_URL.

Idempotent: creates the `gpu` process work pool (+ its `train` queue), sets the pool's
`default` queue to one flow run at a time (the one limit over every pipeline deployment:
nightly, on-demand and any added to that queue), sets the `gpu` tag concurrency limit, then runs
`prefect deploy --all`. `make deploy` calls this.

Workers clone the code of each run (prefect.yaml's pull steps) from FER_GIT_REPOSITORY at
FER_GIT_BRANCH, read here: default this checkout's `origin` remote (else the checkout itself, a
single-machine setup) and its current branch. Only committed code reaches the workers.

    python flows/deploy.py [--pool gpu] [--gpus 1] [--repository URL] [--branch NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")


def prefect(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run([PREFECT, "--no-prompt", *args], cwd=ROOT, capture_output=True, text=True,
                         env=env)
    if check and res.returncode != 0:
        raise SystemExit(f"prefect {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return res


def _git(*args: str) -> str:
    res = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else ""


def default_repository() -> str:
    """This checkout's `origin` URL; without one, the checkout's own path (one machine)."""
    return _git("remote", "get-url", "origin") or str(ROOT)


def default_branch() -> str:
    return _git("branch", "--show-current") or "main"


ZOMBIE_AUTOMATION = "fer: crash silent flow runs"


def ensure_zombie_automation(within_s: float) -> None:
    """Prefect's zombie detection (docs: detect-zombie-flows): after a flow run's heartbeat,
    expect another one or a final state within `within_s`, else mark the run Crashed. Workers
    send heartbeats (`fer worker` sets PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30); a dead machine's
    training is then retried by the parent on another worker within minutes, not at its
    train timeout. Replaced on every deploy (idempotent)."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    with contextlib.suppress(ValueError):      # ValueError: none yet
        Automation.read(name=ZOMBIE_AUTOMATION).delete()
    Automation(
        name=ZOMBIE_AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed",
                    "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                    "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=within_s)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message="no heartbeat: its worker stopped answering")],
    ).create()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", default="gpu", help="work pool (default: %(default)s)")
    ap.add_argument("--gpus", type=int, default=int(os.environ.get("GPUS", "1")),
                    help="trainings allowed at once in the pool = GPUs in it (default: %(default)s)")
    ap.add_argument("--repository", default=os.environ.get("FER_GIT_REPOSITORY"),
                    help="git URL (or path) the workers clone (default: FER_GIT_REPOSITORY, else "
                         "the origin remote, else this checkout)")
    ap.add_argument("--branch", default=os.environ.get("FER_GIT_BRANCH"),
                    help="branch they clone (default: FER_GIT_BRANCH, else the current branch)")
    ap.add_argument("--zombie-after-s", type=float,
                    default=float(os.environ.get("FER_ZOMBIE_AFTER_S", "90")),
                    help="a flow run with no heartbeat for this long is marked Crashed, and its "
                         "training retried on another worker (default: %(default)s)")
    args = ap.parse_args(argv)
    repository = args.repository or default_repository()
    branch = args.branch or default_branch()
    url = urlparse(repository)
    if url.scheme in ("http", "https") and (url.username or url.password):
        raise SystemExit("the repository URL holds credentials: give the URL without them and "
                         "the token through a Secret block (docs/security.md)")
    if args.pool != "gpu":
        raise SystemExit("prefect.yaml names the pool `gpu`; edit it to use another pool")

    if prefect("work-pool", "inspect", args.pool, check=False).returncode != 0:
        prefect("work-pool", "create", args.pool, "--type", "process")
        print(f"created work pool {args.pool} (process)")
    if prefect("work-queue", "inspect", "train", "--pool", args.pool, check=False).returncode != 0:
        prefect("work-queue", "create", "train", "--pool", args.pool)
    # One pipeline run at a time over every deployment of the flow: they all use this queue
    # (a per-deployment limit would let nightly and on-demand run together).
    prefect("work-queue", "set-concurrency-limit", "default", "1", "--pool", args.pool)
    print(f"concurrency limit: queue {args.pool}/default = 1 pipeline run at once")
    # Tag-based task concurrency: every training task carries the tag `gpu`.
    prefect("concurrency-limit", "delete", "gpu", check=False)
    prefect("concurrency-limit", "create", "gpu", str(args.gpus))
    print(f"concurrency limit: tag gpu = {args.gpus} training(s) at once")

    ensure_zombie_automation(args.zombie_after_s)
    print(f"automation {ZOMBIE_AUTOMATION!r}: a flow run silent for {args.zombie_after_s:g}s "
          f"is marked Crashed (workers send heartbeats every 30 s)")

    env = dict(os.environ, FER_GIT_REPOSITORY=repository, FER_GIT_BRANCH=branch)
    print(f"workers clone {repository} (branch {branch}) for each run")
    if not args.repository and _git("status", "--porcelain", "--untracked-files=no"):
        print("note: this checkout has uncommitted changes; workers run the committed code")
    out = prefect("deploy", "--all", env=env)
    print(out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "deployed")
    print(prefect("deployment", "ls").stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
