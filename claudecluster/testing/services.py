"""Throwaway PostgreSQL and Redis servers for the team-server tests and benchmark.

Each runs from a data directory of its own, on a port of its own, and is stopped (and its
data removed with the directory) when the context ends. PostgreSQL refuses to run as root:
as root, its data directory is given to the ``postgres`` user and its commands run as that
user (``runuser``); otherwise as the current user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PostgresServer", "RedisServer", "postgres_server", "redis_server"]


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        raise FileNotFoundError(f"PostgreSQL's {name} is not installed")
    return found


@dataclass
class PostgresServer:
    """A running PostgreSQL with one database ``prefect`` owned by user ``prefect``."""

    data: Path
    host: str
    port: int
    password: str
    _as_postgres: bool

    @property
    def url(self) -> str:
        """The asyncpg URL Prefect takes."""
        return f"postgresql+asyncpg://prefect:{self.password}@{self.host}:{self.port}/prefect"

    def _run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        full = ["runuser", "-u", "postgres", "--", *command] if self._as_postgres else [*command]
        return subprocess.run(full, capture_output=True, text=True, check=check, timeout=120)

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._run(
            _pg_bin("pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.data / "server.log"),
            "-o",
            f"-h {self.host} -p {self.port} -k {self.data}",
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: roll back open transactions and close connections;
        ``immediate``: like a crash, recovered at the next start)."""
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        """Stop and start again, as an operator restarting the database would."""
        self.stop()
        self.start()

    def size_bytes(self) -> int:
        """The ``prefect`` database's size on disk."""
        out = self._run(
            _pg_bin("psql"),
            "-h",
            str(self.data),
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-tAc",
            "select pg_database_size('prefect')",
        )
        return int(out.stdout.strip())


@contextlib.contextmanager
def postgres_server(root: Path, host: str = "127.0.0.1") -> Iterator[PostgresServer]:
    """A fresh PostgreSQL cluster under ``root``, listening on ``host``."""
    as_postgres = os.geteuid() == 0
    if as_postgres:
        # The postgres user cannot enter root's private temporary folders (pytest's are 0700).
        root = Path(tempfile.mkdtemp(prefix="claudecluster-pg-"))
        shutil.chown(root, "postgres")
    data = root / "pgdata"
    data.mkdir(parents=True)
    if as_postgres:
        shutil.chown(data, "postgres")
    server = PostgresServer(data, host, _free_port(host), "prefect-test-password", as_postgres)
    server._run(_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    with open(data / "postgresql.conf", "a") as conf:
        # Many API replicas, services and clients: more than the default 100 connections.
        conf.write("max_connections = 400\nfsync = off\nsynchronous_commit = off\n")
    (data / "pg_hba.conf").write_text(
        "local all all trust\nhost all all 0.0.0.0/0 md5\nhost all all 127.0.0.1/32 md5\n"
    )
    if as_postgres:
        shutil.chown(data / "pg_hba.conf", "postgres")
    server.start()
    try:
        psql = [_pg_bin("psql"), "-h", str(data), "-p", str(server.port), "-U", "postgres"]
        server._run(*psql, "-c", f"create user prefect password '{server.password}'")
        server._run(*psql, "-c", "create database prefect owner prefect")
        yield server
    finally:
        server.stop("immediate")
        if as_postgres:
            shutil.rmtree(root, ignore_errors=True)


@dataclass
class RedisServer:
    """A running redis-server."""

    process: subprocess.Popen[bytes]
    host: str
    port: int

    @property
    def url(self) -> str:
        """Its redis:// URL."""
        return f"redis://{self.host}:{self.port}/0"


@contextlib.contextmanager
def redis_server(root: Path, host: str = "127.0.0.1") -> Iterator[RedisServer]:
    """A redis-server without persistence under ``root``, listening on ``host``."""
    root.mkdir(parents=True, exist_ok=True)
    port = _free_port(host)
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    with open(root / "redis.log", "ab") as log:
        process = subprocess.Popen(
            [
                binary,
                "--bind",
                host,
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(root),
                "--protected-mode",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection((host, port), 1).close()
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: see {root / 'redis.log'}")
            time.sleep(0.05)
        yield RedisServer(process, host, port)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
