"""Production-shaped services for the tests, each a real server on 127.0.0.1 in its own process
session (stopped with its whole process group): a throwaway PostgreSQL cluster from Debian's
packages, an S3 API (moto's standalone server: the real S3 HTTP protocol in another process), and
`mlflow server` on any backend store and artifact root."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

BIN = Path(sys.executable).parent
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait(ok, what: str, proc: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text()[-2000:]}")
        if ok():
            return
        time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError(f"{what} did not come up: {log.read_text()[-2000:]}")


def postgres_bin() -> Path:
    """Debian's PostgreSQL binaries (scripts/test.sh installs the `postgresql` package)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (scripts/test.sh does)")
    return Path(found[-1]).parent


@dataclass
class Postgres:
    """A throwaway cluster: initdb into a fresh folder, `postgres` on a free loopback port. As root
    it runs as Debian's `postgres` user (the server refuses to run as root)."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pipeline-stage-pg-")))
    port: int = field(default_factory=free_port)
    created: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        bindir = postgres_bin()
        self.bin = bindir
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chmod(self.root, 0o755)
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        data = self.root / "data"
        subprocess.run(
            [*self.as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
        )
        self.log = self.root / "postgres.log"
        self.proc = subprocess.Popen(
            [
                *self.as_user,
                str(bindir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(self.port),
                "-k",
                str(self.root),
                "-h",
                "127.0.0.1",
            ],
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait(self._ready, "postgres", self.proc, self.log)

    def _ready(self) -> bool:
        probe = subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)], capture_output=True)
        return probe.returncode == 0

    def database(self, name: str) -> str:
        """Database `name` (created on first use); its SQLAlchemy URL (psycopg 3, which MLflow 3 uses)."""
        if name not in self.created:
            subprocess.run(
                [str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name],
                check=True,
                capture_output=True,
            )
            self.created.add(name)
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        stop_server(self.proc)
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class S3:
    """moto's standalone S3 server on loopback; buckets made with boto3."""

    root: Path
    port: int = field(default_factory=free_port)
    created: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = self.root / "moto.log"
        self.proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **S3_ENV},
        )
        _wait(self._ready, "moto_server", self.proc, self.log)

    def _ready(self) -> bool:
        try:
            return requests.get(self.endpoint, timeout=2).status_code < 500
        except requests.RequestException:
            return False

    @property
    def env(self) -> dict[str, str]:
        """What a client writing to this store directly needs."""
        return {**S3_ENV, "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        )

    def bucket(self, name: str) -> str:
        """Bucket `name` (created on first use)."""
        if name not in self.created:
            self.client().create_bucket(Bucket=name)
            self.created.add(name)
        return name

    def stop(self) -> None:
        stop_server(self.proc)


def start_mlflow_server(
    root: Path,
    port: int | None = None,
    *,
    backend: str | None = None,
    artifacts: str | None = None,
    direct: bool = False,
    workers: int = 1,
    env: dict[str, str] | None = None,
    app: str | None = None,
) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` on 127.0.0.1 and wait until healthy. Default: a sqlite store in `root`
    with artifacts proxied to a folder; `backend` (a database URL) and `artifacts` (an s3:// root,
    proxied, or with `direct` written by the clients themselves) give the production shapes; `app`
    is MLflow's --app-name (``basic-auth`` for its permissions)."""
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    log = root / "server.log"
    backend = backend or f"sqlite:///{root / 'mlflow.db'}"
    artifacts = artifacts or str(root / "artifacts")
    where = ["--no-serve-artifacts", "--default-artifact-root", artifacts] if direct else ["--artifacts-destination", artifacts]
    # Its own session, so the uvicorn workers die with it (killpg).
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", backend, *where]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
        + (["--app-name", app] if app else []),
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})},
    )
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return requests.get(f"{uri}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    _wait(healthy, "mlflow server", proc, log, seconds=180)
    return proc, uri


def production_server(root: Path, postgres: Postgres, s3: S3, name: str, *, direct: bool = False, port: int | None = None):
    """`mlflow server` on PostgreSQL (database `name`) with artifacts in S3 (bucket `name`):
    proxied by the server, or with `direct` written by the clients themselves."""
    backend, bucket = postgres.database(name.replace("-", "_")), s3.bucket(name)
    return start_mlflow_server(
        root, port, backend=backend, artifacts=f"s3://{bucket}/artifacts", direct=direct, workers=2, env=s3.env
    )
