"""A team's shared stores, started for real on 127.0.0.1: PostgreSQL (MLflow's backend store),
moto's S3 API server (artifact + DVC buckets) and `mlflow server` on both.

Tests use the context managers (`team_stack()`, or the pieces); `make team-stack` uses the same
code through `python -m team_stack up|down --dir .team-stack`, so the stack a person stands up
is the one the tests check. No mocks: these are the real servers a team would run, with test
credentials that only moto accepts. Why PostgreSQL runs as `postgres`: it refuses to run as root.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sandbox import free_port

HOST = "127.0.0.1"
PG_USER = "fer"
PG_DB = "mlflow"
MLFLOW_BUCKET = "fer-mlflow"
DVC_BUCKET = "fer-dvc"
# Test credentials: moto accepts anything; real buckets take the team's own (never committed).
AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1"}
BIN = Path(sys.executable).parent   # this venv's console scripts (mlflow, moto_server)


class PostgresMissing(RuntimeError):
    """No initdb/pg_ctl on this machine: tests skip, saying so (CI installs them)."""


# ---- PostgreSQL ----
def pg_bindir() -> Path:
    """The folder holding initdb and pg_ctl: PATH first, then Debian's /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                       key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
                       reverse=True):
        if (Path(cand) / "initdb").is_file() and (Path(cand) / "pg_ctl").is_file():
            return Path(cand)
    raise PostgresMissing("PostgreSQL server binaries (initdb, pg_ctl) not found: "
                          "apt-get install postgresql")


def _as_pg_owner() -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its binaries as the `postgres` user."""
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser") is None:
        raise RuntimeError("running as root needs `runuser` to start PostgreSQL as `postgres`")
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError as exc:
        raise RuntimeError("running as root: no `postgres` user to run PostgreSQL as "
                           "(apt-get install postgresql creates it)") from exc
    return ["runuser", "-u", "postgres", "--"]


@dataclass
class Postgres:
    """A running server: its own temp dir holds the data, the socket and the log."""

    home: Path
    port: int
    bindir: Path

    @property
    def url(self) -> str:
        """SQLAlchemy 2.1 maps plain `postgresql://` to psycopg 3: name the installed driver."""
        return f"postgresql+psycopg2://{PG_USER}@{HOST}:{self.port}/{PG_DB}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*_as_pg_owner(), *args], cwd=self.home, capture_output=True,
                              text=True, check=check, timeout=120)

    def stop(self) -> None:
        """Fast shutdown, then the temp dir goes (data, socket, log)."""
        if (self.home / "data" / "postmaster.pid").exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.home / "data"), "-m", "fast",
                      "-w", "stop", check=False)
        shutil.rmtree(self.home, ignore_errors=True)


def start_postgres(port: int | None = None, durable: bool = False) -> Postgres:
    """initdb + pg_ctl start on 127.0.0.1:<port> (trust auth for user `fer`), database `mlflow`.

    The temp dir is made with tempfile.mkdtemp and given to `postgres` when running as root
    (pytest's tmp dirs are 0700 root: postgres could not enter them). durable=False turns fsync
    off: a throw-away test server need not survive a power cut.
    """
    bindir = pg_bindir()
    prefix = _as_pg_owner()
    home = Path(tempfile.mkdtemp(prefix="fer-pg-"))
    if prefix:
        shutil.chown(home, "postgres", "postgres")
    pg = Postgres(home, port or free_port(), bindir)
    try:
        pg._run(str(bindir / "initdb"), "-D", str(home / "data"), "-A", "trust", "-U", PG_USER,
                "-E", "UTF8", "--locale=C", "--no-sync")
        opts = f"-p {pg.port} -k {home} -c listen_addresses={HOST}"
        if not durable:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        res = pg._run(str(bindir / "pg_ctl"), "-D", str(home / "data"), "-l", str(home / "pg.log"),
                      "-o", opts, "-w", "-t", "60", "start", check=False)
        if res.returncode != 0:
            log = (home / "pg.log").read_text()[-2000:] if (home / "pg.log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {res.stdout}{res.stderr}\n{log}")
        import psycopg2

        conn = psycopg2.connect(host=HOST, port=pg.port, user=PG_USER, dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE {PG_DB}")
        finally:
            conn.close()
    except BaseException:
        pg.stop()
        raise
    return pg


# ---- servers started as processes (moto, mlflow) ----
@dataclass
class Server:
    """A server process in its own session (its workers are stopped with it) and its log."""

    proc: subprocess.Popen
    url: str
    log: Path
    extra: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        stop_pid(self.proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def stop_pid(pid: int, grace_s: float = 20) -> None:
    """SIGTERM the process group `pid` leads, SIGKILL whatever is left after grace_s."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)   # reap our own child, else it lingers as a zombie
            time.sleep(0.2)


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with log.open("ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=log.parent, env={**os.environ, **(env or {})},
                                start_new_session=True)


def _wait_http(url: str, proc: subprocess.Popen, log: Path, name: str, timeout_s: float,
               need_200: bool) -> None:
    """Until `url` answers (need_200: with 200), the process dies, or the deadline passes;
    the failures show the server's log tail."""
    deadline = time.time() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited ({proc.returncode}):\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200 or not need_200:
                    return
        except urllib.error.HTTPError:
            if not need_200:
                return
        except OSError:
            pass
        if time.time() > deadline:
            stop_pid(proc.pid)
            raise RuntimeError(f"{name} did not answer {url} in {timeout_s:.0f} s:\n{_tail(log)}")
        time.sleep(0.3)


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


def start_s3(workdir: Path, buckets: tuple[str, ...] = (MLFLOW_BUCKET, DVC_BUCKET),
             port: int | None = None, timeout_s: float = 60) -> Server:
    """moto's S3 API server on 127.0.0.1:<port> (in memory), with `buckets` created by boto3."""
    port = port or free_port()
    log = workdir / "moto.log"
    proc = _spawn([str(BIN / "moto_server"), "-H", HOST, "-p", str(port)], log)
    server = Server(proc, f"http://{HOST}:{port}", log)
    try:
        _wait_http(server.url + "/moto-api/", proc, log, "moto_server", timeout_s, need_200=False)
        client = s3_client(server.url)
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
    except BaseException:
        server.stop()
        raise
    return server


def s3_client(endpoint: str):  # -> botocore S3 client (boto3 has no public type for it)
    """A boto3 S3 client for the moto server, with the test credentials."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint,
                        aws_access_key_id=AWS_TEST_ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
                        region_name=AWS_TEST_ENV["AWS_DEFAULT_REGION"])


def start_mlflow(workdir: Path, backend_uri: str, s3_endpoint: str,
                 artifacts: str = f"s3://{MLFLOW_BUCKET}/mlflow", port: int | None = None,
                 timeout_s: float = 180) -> Server:
    """`mlflow server` on 127.0.0.1 with the database backend and S3 artifact destination.

    Clients upload/download artifacts through the server (mlflow-artifacts:/ proxy), so only
    the server needs the S3 endpoint and keys. The first start migrates the schema (slow).
    MLflow's job runner (GenAI scorers, trace rollups; 8 processes, a /dev/shm folder left
    behind) is off: this project uses none of it, and the CPUs are shared.
    """
    port = port or free_port()
    log = workdir / "mlflow.log"
    env = {**AWS_TEST_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = _spawn([str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri,
                   "--artifacts-destination", artifacts, "--host", HOST, "--port", str(port),
                   "--workers", "1"], log, env)
    server = Server(proc, f"http://{HOST}:{port}", log)
    try:
        _wait_http(server.url + "/health", proc, log, "mlflow server", timeout_s, need_200=True)
    except BaseException:
        server.stop()
        raise
    return server


# ---- the whole stack, for tests ----
@dataclass
class TeamStack:
    """Where each store answers; `env` is what a client process exports."""

    postgres_url: str
    s3_endpoint: str
    mlflow_uri: str
    mlflow_bucket: str = MLFLOW_BUCKET
    dvc_bucket: str = DVC_BUCKET

    @property
    def env(self) -> dict[str, str]:
        return {**AWS_TEST_ENV, "MLFLOW_TRACKING_URI": self.mlflow_uri,
                "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint}


@contextlib.contextmanager
def postgres() -> Iterator[Postgres]:
    pg = start_postgres()
    try:
        yield pg
    finally:
        pg.stop()


@contextlib.contextmanager
def s3_server(workdir: Path) -> Iterator[Server]:
    server = start_s3(workdir)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def mlflow_server(workdir: Path, backend_uri: str, s3_endpoint: str) -> Iterator[Server]:
    server = start_mlflow(workdir, backend_uri, s3_endpoint)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def team_stack(workdir: Path) -> Iterator[TeamStack]:
    """PostgreSQL + moto S3 + MLflow server, all stopped and removed at exit (logs in workdir)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with postgres() as pg, s3_server(workdir) as s3, mlflow_server(workdir, pg.url, s3.url) as ml:
        yield TeamStack(pg.url, s3.url, ml.url)


# ---- `python -m team_stack up|down --dir .team-stack` (make team-stack / team-stack-stop) ----
def _state_file(folder: Path) -> Path:
    return folder / "state.json"


def up(folder: Path, mlflow_port: int | None) -> str:
    """Start the stack detached; record pids and ports in folder/state.json, exports in
    folder/env. Returns the lines to print."""
    folder.mkdir(parents=True, exist_ok=True)
    if _state_file(folder).exists():
        raise SystemExit(f"{folder} holds a running stack (state.json): `make team-stack-stop` first")
    pg = start_postgres(durable=True)
    started: list[Server] = []
    try:
        s3 = start_s3(folder)
        started.append(s3)
        ml = start_mlflow(folder, pg.url, s3.url, port=mlflow_port)
        started.append(ml)
    except BaseException:
        for server in started:
            server.stop()
        pg.stop()
        raise
    stack = TeamStack(pg.url, s3.url, ml.url)
    _state_file(folder).write_text(json.dumps(
        {"postgres": {"home": str(pg.home), "port": pg.port, "bindir": str(pg.bindir)},
         "pids": {"moto": s3.proc.pid, "mlflow": ml.proc.pid}, **stack.__dict__}, indent=2))
    exports = "".join(f"export {k}={v}\n" for k, v in stack.env.items())
    (folder / "env").write_text(exports)
    return (f"team stack up (logs in {folder}/):\n"
            f"  PostgreSQL   {stack.postgres_url}\n"
            f"  S3 (moto)    {stack.s3_endpoint}  buckets {MLFLOW_BUCKET}, {DVC_BUCKET} (in memory)\n"
            f"  MLflow       {stack.mlflow_uri}  artifacts s3://{MLFLOW_BUCKET}/mlflow\n"
            f"Export these (or `source {folder}/env`):\n{exports}"
            f"DVC outputs to its bucket (local settings, not committed):\n"
            f"  dvc remote modify --local storage url s3://{DVC_BUCKET}/fer-pipeline\n"
            f"  dvc remote modify --local storage endpointurl {stack.s3_endpoint}\n"
            f"Stop: make team-stack-stop")


def down(folder: Path) -> str:
    """Stop what `up` started and remove the database; the folder's logs stay."""
    state_file = _state_file(folder)
    if not state_file.exists():
        return f"no team stack recorded in {folder}"
    state = json.loads(state_file.read_text())
    for pid in state["pids"].values():
        stop_pid(int(pid))
    pg = state["postgres"]
    Postgres(Path(pg["home"]), int(pg["port"]), Path(pg["bindir"])).stop()
    state_file.unlink()
    (folder / "env").unlink(missing_ok=True)
    return "team stack stopped (PostgreSQL data and the in-memory buckets are gone)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m team_stack", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", type=Path, default=Path(".team-stack"))
    parser.add_argument("--mlflow-port", type=int, default=None, help="default: a free port")
    args = parser.parse_args(argv)
    print(up(args.dir, args.mlflow_port) if args.action == "up" else down(args.dir))


if __name__ == "__main__":
    main()
