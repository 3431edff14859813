"""A Prefect server for a team: PostgreSQL, Redis, several API replicas behind nginx.

``claudecluster server start --team --database-url URL --redis-url URL`` starts, on this host,
the topology of Prefect's self-hosting guide ("Scale self-hosted Prefect"):

1. ``prefect server database upgrade -y`` against PostgreSQL, once, before anything serves
   (two replicas migrating a fresh database at once race on ``uq_block_type__slug``);
2. ``--replicas`` API servers, ``prefect server start --no-services``, on loopback ports;
3. one ``prefect server services start`` (scheduler, triggers, foreman, late runs, ...);
4. nginx in front of the replicas on ``--host``/``--port``: the one URL workers and people
   use. A replica that stops answering is taken out of rotation and requests that found it
   dead go to another one (websockets for events and logs pass through).

Events, the docket of the background services and concurrency leases go through Redis
(``prefect-redis``), so every replica and the services process see the same ones. Analytics
are off. PostgreSQL and Redis are yours (or your cloud's): ClaudeCluster only connects.

State lives under ``$CLAUDECLUSTER_HOME/team/``: ``team-server.json`` (pids, ports, URLs), one
log per process, nginx's configuration. ``claudecluster server stop --team`` stops them all.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, ValidationError

from claudecluster.errors import ConfigError, ServerError
from claudecluster.models import StrictModel
from claudecluster.prefect_server import (
    LOG_STREAM_ENV,
    SERVER_SETTINGS_ENV,
    _command_line,
    _pid_alive,
    _private_opener,
    _probe,
    _terminate,
    server_base_env,
)
from claudecluster.workspace import claudecluster_home

__all__ = [
    "TeamServer",
    "TeamServerConfig",
    "start_team_server",
    "stop_team_server",
    "team_server_env",
    "team_server_status",
]

TEAM_DIR_NAME = "team"
STATE_FILE_NAME = "team-server.json"
PIDS_FILE_NAME = "team-server.pids"  # every process started, as it starts
_MIGRATE_TIMEOUT_S = 600.0
_START_TIMEOUT_S = 120.0


class TeamServerConfig(StrictModel):
    """What the team server is made of and where it listens."""

    database_url: str = Field(
        description="PostgreSQL URL, e.g. 'postgresql+asyncpg://prefect:PASSWORD@db:5432/prefect' "
        "('postgresql://' is accepted and given the asyncpg driver)."
    )
    redis_url: str = Field(
        description="Redis URL for events and the docket, e.g. 'redis://cache:6379/0'."
    )
    replicas: int = Field(default=2, ge=1, le=32, description="How many API servers to run.")
    host: str = Field(
        default="0.0.0.0",
        description="Address the load balancer listens on (0.0.0.0: every interface, so "
        "workers on other hosts reach it).",
    )
    port: int = Field(default=4200, ge=1, le=65535, description="The load balancer's port.")
    public_url: str | None = Field(
        default=None,
        description="The URL people and workers use, e.g. 'http://prefect.internal:4200' "
        "(what the UI calls); default: this host's name and --port.",
    )


class TeamServer(StrictModel):
    """A running team server, as recorded in ``team-server.json``."""

    api_url: str = Field(description="The API through the load balancer, for PREFECT_API_URL.")
    ui_url: str = Field(description="The UI through the load balancer.")
    balancer_pid: int = Field(description="nginx's master process.")
    balancer_port: int = Field(description="The port nginx listens on.")
    replica_pids: list[int] = Field(description="The API replicas' process ids, in port order.")
    replica_ports: list[int] = Field(description="The API replicas' loopback ports.")
    services_pid: int = Field(description="The `prefect server services start` process.")
    home: Path = Field(description="Where the state, logs and nginx's configuration live.")

    @property
    def pids(self) -> list[int]:
        """Every process of the server, load balancer first (the order to stop them in)."""
        return [self.balancer_pid, *self.replica_pids, self.services_pid]


def _team_home(home: Path | None) -> Path:
    path = (home or claudecluster_home()) / TEAM_DIR_NAME
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _asyncpg_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme in ("postgresql", "postgres"):
        return urlunsplit(parts._replace(scheme="postgresql+asyncpg"))
    if parts.scheme != "postgresql+asyncpg":
        raise ConfigError(
            f"--database-url must be a PostgreSQL URL, not {parts.scheme or 'a bare name'}://",
            hint="Pass postgresql://USER:PASSWORD@HOST:5432/DATABASE (SQLite serves one "
            "machine only: use the embedded server for that).",
        )
    return url


def team_server_env(config: TeamServerConfig, prefect_home: Path) -> dict[str, str]:
    """The environment of every process of the team server (replicas, services, migration)."""
    if urlsplit(config.redis_url).scheme not in ("redis", "rediss"):
        raise ConfigError(
            f"--redis-url must be a redis:// or rediss:// URL, not {config.redis_url!r}",
            hint="Pass redis://HOST:6379/0",
        )
    public = (config.public_url or f"http://{socket.getfqdn()}:{config.port}").rstrip("/")
    env = server_base_env()
    env.update(
        {
            "PREFECT_HOME": str(prefect_home),
            "PREFECT_API_DATABASE_CONNECTION_URL": _asyncpg_url(config.database_url),
            "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
            "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
            "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
            "PREFECT_REDIS_MESSAGING_URL": config.redis_url,
            "PREFECT_SERVER_DOCKET_URL": config.redis_url,
            "PREFECT_UI_API_URL": f"{public}/api",
            **SERVER_SETTINGS_ENV,
            **LOG_STREAM_ENV,
        }
    )
    return env


def _check_parts(config: TeamServerConfig) -> None:
    """PostgreSQL answers, Redis answers, prefect-redis and nginx are installed: else one line."""
    if importlib.util.find_spec("prefect_redis") is None:
        raise ConfigError(
            "the team server needs the prefect-redis package",
            hint="pip install 'claudecluster[team]'",
        )
    if shutil.which("nginx") is None:
        raise ConfigError(
            "the team server's load balancer is nginx, and nginx is not installed",
            hint="apt-get install nginx-light (or your system's nginx package)",
        )
    import redis

    try:
        redis.Redis.from_url(config.redis_url, socket_connect_timeout=5).ping()
    except (redis.RedisError, ValueError) as exc:
        raise ConfigError(
            f"Redis at {_without_password(config.redis_url)} does not answer: "
            + _without_password(str(exc)),
            hint="Start Redis or fix --redis-url.",
        ) from None
    try:
        parts = urlsplit(config.database_url)
        socket.create_connection((parts.hostname or "localhost", parts.port or 5432), 5).close()
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"PostgreSQL at {_without_password(config.database_url)} does not answer: {exc}",
            hint="Start PostgreSQL or fix --database-url.",
        ) from None


def _without_password(text: str) -> str:
    """``text`` (a URL, or a message quoting URLs) with every URL's password masked."""
    return _PASSWORD.sub(r"\1***@", text)


_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _spawn(command: list[str], env: dict[str, str], log_file: Path) -> subprocess.Popen[bytes]:
    """Start one process of the server, detached; its pid is recorded at once, so a start
    that dies half-way leaves nothing that ``stop`` cannot find."""
    with open(log_file, "ab", opener=_private_opener) as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=log_file.parent,
            env=env,
            start_new_session=True,  # outlives the command that started it
            close_fds=True,
        )
    with open(log_file.parent / PIDS_FILE_NAME, "a") as pids:
        pids.write(f"{process.pid}\n")
    return process


def _last_line(log_file: Path) -> str:
    """The last line of a log that says something (its error, usually), for a one-line error."""
    with contextlib.suppress(OSError):
        for line in reversed(log_file.read_text(errors="replace").splitlines()):
            if line.strip() and not line.startswith(("Traceback", "  ")):
                return line.strip()[:300]
    return "(its log is empty)"


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log_file: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(
                f"{log_file.stem} exited ({process.returncode}) while starting: "
                + _last_line(log_file),
                hint=f"See {log_file}.",
            )
        status, body = _probe(url, 2.0, direct=True)
        if status == 200 and body.strip() == "true":
            return
        time.sleep(0.3)
    raise ServerError(
        f"{log_file.stem} did not answer {url} within {_START_TIMEOUT_S:g} s",
        hint=f"See {log_file}.",
    )


def nginx_config(team_home: Path, *, host: str, port: int, replica_ports: list[int]) -> str:
    """nginx's configuration: one upstream of the replicas, websockets passed through.

    A replica that refuses or drops a connection is skipped for the request. None is ever
    taken out of rotation (``max_fails=0``): when the database blips, every replica fails
    the same requests at once, and marking them all down would answer 502 "no live
    upstreams" for a while after the database is back; a dead replica on loopback costs a
    refused connect, microseconds. A 503 (Prefect's "database unavailable, retry") goes back
    to the client, which retries: the other replica shares the database. Idle connections
    close before the replicas' own 5 s keep-alive does, so nginx never reuses one a replica
    is closing. Long timeouts because Prefect's event and log websockets stay open for a
    run's length.
    """
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=0;" for p in replica_ports)
    temp = team_home / "nginx-temp"
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"""# Written by claudecluster server start --team; rewritten at every start.
daemon off;
worker_processes 2;
pid {team_home / "nginx.pid"};
error_log {team_home / "nginx.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    client_max_body_size 64m;
    # Bodies stay in memory: written to a temp file they would need a folder nginx's
    # workers (nobody, when started as root) can write, and a big goal's plan is ~100 KB.
    client_body_buffer_size 64m;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
    upstream prefect_api {{
{servers}
        keepalive 64;
        keepalive_timeout 4s;
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://prefect_api;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_next_upstream error timeout http_502 http_504;
            proxy_next_upstream_tries 0;
            proxy_connect_timeout 2s;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_buffering off;
        }}
    }}
}}
"""


def start_team_server(config: TeamServerConfig, home: Path | None = None) -> TeamServer:
    """Migrate, then start the replicas, the services and the load balancer; wait until the
    API answers through the load balancer. Raises ConfigError / ServerError with one line."""
    team_home = _team_home(home)
    running = team_server_status(home)
    if running is not None:
        raise ConfigError(
            f"a team server is already running here ({running.api_url})",
            hint="Stop it first: claudecluster server stop --team",
        )
    stop_team_server(home)  # what a start that died half-way left running
    prefect_home = team_home / "prefect"
    prefect_home.mkdir(exist_ok=True, mode=0o700)
    env = team_server_env(config, prefect_home)  # checks the URLs before anything answers
    _check_port_free(config.host, config.port)
    _check_parts(config)
    prefect_cli = [sys.executable, "-m", "prefect"]
    migrate_log = team_home / "migrate.log"
    try:
        with open(migrate_log, "wb", opener=_private_opener) as log:
            migrated = subprocess.run(
                [*prefect_cli, "server", "database", "upgrade", "-y"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=team_home,
                timeout=_MIGRATE_TIMEOUT_S,
                check=False,
            )
    except subprocess.TimeoutExpired:
        raise ServerError(
            f"migrating the database took over {_MIGRATE_TIMEOUT_S:g} s",
            hint=f"See {migrate_log}; check that nothing holds a lock on the database.",
        ) from None
    if migrated.returncode != 0:
        raise ServerError(
            f"migrating the database failed: {_last_line(migrate_log)}",
            hint=f"See {migrate_log}; check the database URL and the user's rights.",
        )
    started: list[subprocess.Popen[bytes]] = []
    try:
        ports = [_free_loopback_port() for _ in range(config.replicas)]
        replicas = []
        for index, port in enumerate(ports):
            log_file = team_home / f"replica-{index + 1}.log"
            replica = _spawn(
                [
                    *prefect_cli,
                    "server",
                    "start",
                    "--no-services",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                env,
                log_file,
            )
            started.append(replica)
            replicas.append((replica, log_file, port))
            if index == 0:
                # Each replica registers Prefect's block types as it starts: the first must
                # finish before the others begin, or they race on uq_block_type__slug.
                _wait_healthy(f"http://127.0.0.1:{port}/api/health", replica, log_file)
        services_log = team_home / "services.log"
        services = _spawn([*prefect_cli, "server", "services", "start"], env, services_log)
        started.append(services)
        for replica, log_file, port in replicas[1:]:
            _wait_healthy(f"http://127.0.0.1:{port}/api/health", replica, log_file)
        (team_home / "nginx-temp").mkdir(exist_ok=True)
        conf = team_home / "nginx.conf"
        conf.write_text(
            nginx_config(team_home, host=config.host, port=config.port, replica_ports=ports)
        )
        balancer_log = team_home / "nginx.log"
        balancer = _spawn(
            ["nginx", "-c", str(conf), "-p", str(team_home)], os.environ.copy(), balancer_log
        )
        started.append(balancer)
        local = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
        if ":" in local:
            local = f"[{local}]"
        _wait_healthy(f"http://{local}:{config.port}/api/health", balancer, balancer_log)
        time.sleep(0.5)
        if balancer.poll() is not None:  # something else answered on the port
            raise ServerError(
                f"nginx exited ({balancer.returncode}): {_last_line(balancer_log)}",
                hint=f"See {balancer_log}.",
            )
        if services.poll() is not None:
            raise ServerError(
                f"the background services exited ({services.returncode}): "
                + _last_line(services_log),
                hint=f"See {services_log}.",
            )
    except BaseException:
        for process in reversed(started):
            with contextlib.suppress(ProcessLookupError, ServerError):
                _terminate(process.pid, grace_s=5)
        raise
    public = env["PREFECT_UI_API_URL"].removesuffix("/api")
    server = TeamServer(
        api_url=f"{public}/api",
        ui_url=public,
        balancer_pid=balancer.pid,
        balancer_port=config.port,
        replica_pids=[replica.pid for replica, _, _ in replicas],
        replica_ports=ports,
        services_pid=services.pid,
        home=team_home,
    )
    (team_home / STATE_FILE_NAME).write_text(server.model_dump_json(indent=2))
    return server


def team_server_status(home: Path | None = None) -> TeamServer | None:
    """The team server started from this home, if its load balancer still runs."""
    path = (home or claudecluster_home()) / TEAM_DIR_NAME / STATE_FILE_NAME
    try:
        server = TeamServer.model_validate_json(path.read_bytes())
    except (OSError, ValidationError, ValueError):
        return None
    return server if _ours(server.balancer_pid) else None


def stop_team_server(home: Path | None = None) -> bool:
    """Stop every process of the team server started from this home (also what a start
    that died half-way left); False if none ran."""
    team_home = (home or claudecluster_home()) / TEAM_DIR_NAME
    pids: list[int] = []
    with contextlib.suppress(OSError, ValidationError, ValueError):
        pids += TeamServer.model_validate_json((team_home / STATE_FILE_NAME).read_bytes()).pids
    with contextlib.suppress(OSError, ValueError):
        pids += [int(p) for p in (team_home / PIDS_FILE_NAME).read_text().split()]
    stopped = False
    for pid in dict.fromkeys(pids):
        if _ours(pid):
            stopped = True
            with contextlib.suppress(ProcessLookupError):
                _terminate(pid, grace_s=10)
    for name in (STATE_FILE_NAME, PIDS_FILE_NAME):
        with contextlib.suppress(FileNotFoundError):
            (team_home / name).unlink()
    return stopped


def _ours(pid: int) -> bool:
    """A live process of a team server (never a process that reused a recorded pid)."""
    if not _pid_alive(pid):
        return False
    command = _command_line(pid)
    return "nginx" in command or ("prefect" in command and "server" in command)


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As nginx binds: connections of an earlier server in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                hint="Stop what uses the port, or pass --port.",
            ) from None
