"""A pool of machines on one box, for the scale-out test and `make demo-workers`: a git server
(git daemon on 127.0.0.1), a Prefect server, and "machines" that share nothing but those, S3
and MLflow. Each machine has its own root (HOME, TMPDIR, PREFECT_HOME, DVC cache, the worker's
clones) and runs in a private mount + PID namespace (`unshare`) where the other machines' roots
and the source repository are hidden behind empty tmpfs mounts: a process that reaches for
another root's files finds nothing and fails. Killing a machine (SIGKILL of its `unshare`)
kills every process in it at once, as a power cut would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sandbox import free_port
from team_stack import Server, _spawn, _wait_http, stop_pid

BIN = Path(sys.executable).parent
HOST = "127.0.0.1"


def namespaces_work() -> bool:
    """True when this user may make mount + PID namespaces (root in most CI containers)."""
    if not shutil.which("unshare"):
        return False
    res = subprocess.run(["unshare", "--mount", "--pid", "--fork", "--propagation", "private",
                          "true"], capture_output=True)
    return res.returncode == 0


def start_git_daemon(base: Path, log_dir: Path) -> Server:
    """git daemon serving every repository under `base` at git://127.0.0.1:<port>/<name>,
    pushes allowed (the parent pushes its DVC experiment)."""
    port = free_port()
    log = log_dir / "git-daemon.log"
    proc = _spawn(["git", "daemon", "--reuseaddr", "--export-all", "--enable=receive-pack",
                   f"--base-path={base}", f"--listen={HOST}", f"--port={port}", str(base)], log)
    deadline = time.time() + 30
    while True:
        with socket.socket() as sock:
            if sock.connect_ex((HOST, port)) == 0:
                break
        if proc.poll() is not None or time.time() > deadline:
            stop_pid(proc.pid)
            raise RuntimeError(f"git daemon did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return Server(proc, f"git://{HOST}:{port}", log)


def start_prefect_server(home: Path) -> Server:
    """`prefect server start` on 127.0.0.1 with its state in `home` (services on: the zombie
    automation needs the triggers service)."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://{HOST}:{port}/api"}
    log = home / "server.log"
    proc = _spawn([str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(port)],
                  log, env)
    server = Server(proc, f"http://{HOST}:{port}/api", log)
    try:
        _wait_http(server.url + "/health", proc, log, "prefect server", 240, need_200=True)
    except BaseException:
        server.stop()
        raise
    return server


@dataclass
class Machine:
    name: str
    root: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def _wrapped(self, cmd: list[str], hide: list[Path], kill_child: bool) -> list[str]:
        """`cmd` in a new mount + PID namespace whose `hide` folders are empty tmpfs mounts."""
        script = ('for d in "$@"; do if [ -d "$d" ]; then mount -t tmpfs -o size=16k,mode=000 '
                  'none "$d" || exit 1; fi; done; exec ' + " ".join(f"'{c}'" for c in cmd))
        return ["unshare", "--mount", "--pid", "--fork", *(["--kill-child"] if kill_child else []),
                "--propagation", "private", "--mount-proc", "sh", "-c", script, "sh",
                *map(str, hide)]

    def start(self, cmd: list[str], hide: list[Path]) -> None:
        """`cmd` in this machine's namespace, in its root, output to <root>/<name>.log."""
        self.log = self.root / f"{self.name}.log"
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(self._wrapped(cmd, hide, kill_child=True), stdout=fh,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=self.env, cwd=self.root)

    def run(self, cmd: list[str], hide: list[Path]) -> subprocess.CompletedProcess:
        """A short command in the same kind of namespace (the isolation probe)."""
        return subprocess.run(self._wrapped(cmd, hide, kill_child=False), capture_output=True,
                              text=True, env=self.env, cwd=self.root)

    def kill(self) -> None:
        """Power cut: SIGKILL to `unshare`; --kill-child takes the namespace's init, and with
        it every process of the machine."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            stop_pid(self.proc.pid, grace_s=20)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""


def machine(base: Path, name: str, shared_env: dict[str, str]) -> Machine:
    """A root with its own HOME (git identity), TMPDIR, PREFECT_HOME, worker root and DVC site
    cache; `shared_env` names the servers (Prefect API, MLflow, S3, git URL)."""
    root = base / name
    for sub in ("home", "tmp", "prefect", "worker", "dvc-site"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "home" / ".gitconfig").write_text(f"[user]\n\temail = {name}@pool\n\tname = {name}\n")
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("PREFECT_", "MLFLOW_", "FER_", "AWS_", "DVC_", "PYTEST",
                                 "GIT_", "XDG_", "KERAS_"))}
    env = {**keep, **shared_env,
           "HOME": str(root / "home"), "TMPDIR": str(root / "tmp"),
           "PREFECT_HOME": str(root / "prefect"), "FER_WORKER_ROOT": str(root / "worker"),
           "DVC_SITE_CACHE_DIR": str(root / "dvc-site"),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
           "FER_WORKER_ALLOW_NO_GPU": "1", "GX_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    return Machine(name, root, env)
