"""The Prefect server ClaudeCluster talks to: an embedded local one, your own, or a throwaway.

How it works, for operators
---------------------------
Every ``claudecluster`` command that runs flows needs a Prefect API. It picks one like this:

1. **Your own server.** If ``PREFECT_API_URL`` is set in the environment (for example
   ``http://prefect.internal:4200/api`` or a Prefect Cloud workspace URL), ClaudeCluster
   checks that ``<PREFECT_API_URL>/health`` answers and uses it as is. Nothing is started
   or stopped; workers on other machines can use the same server.
2. **The embedded server (the default).** Otherwise the first command starts
   ``python -m prefect server start --host 127.0.0.1 --port <free port>`` in the
   background, detached from the terminal, and later commands reuse it, so a flow run
   costs about a second instead of a 12-21 s throwaway server per process. It listens on
   the loopback interface only. Everything lives under the ClaudeCluster home,
   ``$CLAUDECLUSTER_HOME`` or ``~/.claudecluster``:

   - ``server.json``: the running server's pid, port and URLs (deleted when stopped);
   - ``server.log``: its output (the previous run's is kept as ``server.log.1``);
   - ``server.lock``: serialises concurrent starts so two commands share one server;
   - ``prefect/``: its ``PREFECT_HOME``, including the SQLite database ``prefect.db``
     with the flow-run history. Delete it (with the server stopped) to start afresh.

   The UI is at the ``ui_url`` the CLI prints (``http://127.0.0.1:<port>``). Stop the
   server with ``claudecluster server stop`` (:func:`stop_server`), or by sending SIGTERM
   to the pid in ``server.json``; the next command starts a new one on the same data.
   The server keeps running after the command that started it exits, until stopped or
   the machine reboots. It ignores the calling shell's ``PREFECT_*`` settings apart from
   ``PREFECT_SERVER_*`` ones (for example ``PREFECT_SERVER_DATABASE_CONNECTION_URL``),
   so a stray profile cannot point it elsewhere; to run Prefect your way, start your own
   server and set ``PREFECT_API_URL``.
3. **Throwaway.** ``--ephemeral`` uses Prefect's own per-process temporary server
   (:func:`use_ephemeral`): slow to start, no UI, invisible to workers, gone at exit.

For code: :func:`ensure_server` returns a :class:`ServerInfo`; :func:`use_server` (or the
:func:`using_server` context manager) then points this process's Prefect client at it.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import inspect
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from claudecluster.errors import ConfigError, ServerError
from claudecluster.workspace import claudecluster_home, home_path

__all__ = [
    "LOG_STREAM_ENV",
    "SERVER_SETTINGS_ENV",
    "ServerInfo",
    "ensure_server",
    "flow_run_url",
    "server_base_env",
    "server_status",
    "stop_server",
    "use_ephemeral",
    "use_server",
    "using_server",
]

STATE_FILE_NAME = "server.json"
LOCK_FILE_NAME = "server.lock"
LOG_FILE_NAME = "server.log"
PREFECT_HOME_DIR_NAME = "prefect"
LOOPBACK_HOST = "127.0.0.1"

# A healthy local server answers /api/health in milliseconds; the warm path must stay fast.
_WARM_HEALTH_TIMEOUT_S = 2.0
# Under the lock we are about to kill and replace the server, so give a busy one longer.
_CONFIRM_HEALTH_TIMEOUT_S = 5.0
_EXTERNAL_HEALTH_TIMEOUT_S = 5.0
# How long a "try again" answer (502/503/504) from a server that is not ours is waited out.
_EXTERNAL_RETRY_WINDOW_S = 20.0
_RETRY_LATER = frozenset({502, 503, 504})
_POLL_INTERVAL_S = 0.2
# uvicorn finishes in-flight requests on SIGTERM; ~2 s here, so 10 s is generous.
_STOP_GRACE_S = 10.0
_START_ATTEMPTS = 3
_LOG_TAIL_LINES = 20

# Loopback requests must never go through an HTTP(S)_PROXY from the environment.
_DIRECT_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# Servers started by this process: only a parent can reap its child, and an unreaped
# child stays a zombie that os.kill(pid, 0) still reports as alive.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class ServerInfo(BaseModel):
    """Where the Prefect API is and whether ClaudeCluster manages it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_url: str = Field(description="Prefect API base URL, e.g. 'http://127.0.0.1:4321/api'.")
    ui_url: str = Field(description="Prefect UI base URL, e.g. 'http://127.0.0.1:4321'.")
    pid: int | None = Field(
        description="Process id of the embedded server; None for an external server."
    )
    home: Path = Field(description="The ClaudeCluster home directory holding the server state.")
    started_now: bool = Field(description="True if this call started the server (a cold start).")
    managed: bool = Field(
        description="True for the embedded server ClaudeCluster started; False for an "
        "external server named by PREFECT_API_URL."
    )
    log_file: Path | None = Field(
        description="The embedded server's log file; None for an external server."
    )


class _ServerState(BaseModel):
    """What ``server.json`` records about the running embedded server."""

    model_config = ConfigDict(extra="ignore")

    pid: int = Field(description="Process id (and process-group id) of the server.")
    port: int = Field(description="Loopback TCP port the server listens on.")
    api_url: str = Field(description="Prefect API base URL.")
    ui_url: str = Field(description="Prefect UI base URL.")
    started_at: datetime = Field(description="When the server became healthy (UTC).")
    prefect_version: str | None = Field(
        default=None, description="Version of the prefect package that started it."
    )
    command: list[str] = Field(default_factory=list, description="The command line started.")


# --------------------------------------------------------------------------- homes & files


def _read_state(home: Path) -> _ServerState | None:
    try:
        return _ServerState.model_validate_json((home / STATE_FILE_NAME).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError, ValueError):
        # A torn or hand-edited file means we know nothing about a server: start afresh.
        return None


def _write_state(home: Path, state: _ServerState) -> None:
    # Readers never take the lock, so they must see either the old file or the new one.
    fd, tmp = tempfile.mkstemp(prefix=".server-", suffix=".json", dir=home)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(state.model_dump_json(indent=2))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, home / STATE_FILE_NAME)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _remove_state(home: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (home / STATE_FILE_NAME).unlink()


@contextlib.contextmanager
def _locked(home: Path, timeout_s: float) -> Iterator[None]:
    """Hold ``home/server.lock`` exclusively; flock dies with the holder, so no stale locks."""
    path = home / LOCK_FILE_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ServerError(
                        f"Timed out after {timeout_s:.0f} s waiting for another "
                        "claudecluster command that is starting the Prefect server",
                        hint=f"Check that command, or its log {home / LOG_FILE_NAME}.",
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def _log_tail(log_file: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = log_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(tail) if tail else "(log is empty)"


# --------------------------------------------------------------------------- processes


def _pid_alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        _CHILDREN.pop(pid, None)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # A zombie of some other parent is dead for our purposes.
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        pass
    try:
        # No /proc (macOS): ask ps.
        out = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def _looks_like_our_server(pid: int, port: int) -> bool:
    """Guard against pid reuse: never signal a process that is not the server we started."""
    command = _command_line(pid)
    return "prefect" in command and "server" in command and f"--port {port}" in command


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        # start_new_session made the server a group leader; signal its helpers too.
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _wait_dead(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _terminate(pid: int, grace_s: float = _STOP_GRACE_S) -> None:
    """SIGTERM the server's process group, SIGKILL whatever is left after ``grace_s``."""
    try:
        leader = os.getpgid(pid) == pid
    except ProcessLookupError:
        _CHILDREN.pop(pid, None)
        return
    _signal_group(pid, signal.SIGTERM)
    if not _wait_dead(pid, grace_s):
        _signal_group(pid, signal.SIGKILL)
        if not _wait_dead(pid, 5.0):
            raise ServerError(
                f"Prefect server process {pid} survived SIGKILL",
                hint="Check it with `ps`; it may be stuck in the kernel.",
            )
    if leader and _group_alive(pid):
        time.sleep(0.5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    _CHILDREN.pop(pid, None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------- health


def _auth_headers(env: Mapping[str, str]) -> dict[str, str]:
    # Same precedence as prefect.client.orchestration.PrefectClient.
    if auth_string := env.get("PREFECT_API_AUTH_STRING"):
        token = base64.b64encode(auth_string.encode()).decode()
        return {"Authorization": f"Basic {token}"}
    if api_key := env.get("PREFECT_API_KEY"):
        return {"Authorization": f"Bearer {api_key}"}
    return {}


def _probe(
    url: str, timeout_s: float, *, direct: bool, headers: Mapping[str, str] | None = None
) -> tuple[int | None, str]:
    """GET ``url``: (HTTP status, body or error text); status None if nothing answered."""
    request = urllib.request.Request(url, headers=dict(headers or {}), method="GET")
    try:
        opener = _DIRECT_OPENER if direct else urllib.request.build_opener()
        with opener.open(request, timeout=timeout_s) as response:
            status: int = response.status
            return status, response.read(200).decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, str(exc.reason)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return None, str(reason)


def _probe_external(url: str, *, headers: Mapping[str, str]) -> tuple[int | None, str]:
    """Probe a server that is not ours, waiting out a passing 502/503/504.

    Those say "try again" (a load balancer between replicas, a database restarting), and
    Prefect's own client retries them too (``PREFECT_CLIENT_MAX_RETRIES``): a run started
    the moment a database comes back should not fail on its first probe. Anything else,
    including no answer at all, is reported at once.
    """
    deadline = time.monotonic() + _EXTERNAL_RETRY_WINDOW_S
    delay = 0.5
    while True:
        status, detail = _probe(url, _EXTERNAL_HEALTH_TIMEOUT_S, direct=False, headers=headers)
        if status not in _RETRY_LATER or time.monotonic() + delay > deadline:
            return status, detail
        time.sleep(delay)
        delay = min(delay * 2, 4.0)


def _local_healthy(api_url: str, timeout_s: float) -> bool:
    status, body = _probe(f"{api_url}/health", timeout_s, direct=True)
    return status == 200 and body.strip() == "true"


# --------------------------------------------------------------------------- URLs


def _ui_url_for(api_url: str, env: Mapping[str, str]) -> str:
    """Mirror prefect.settings.models._defaults.default_ui_url without importing prefect."""
    if explicit := env.get("PREFECT_UI_URL", "").strip():
        return explicit.rstrip("/")
    ui_url = api_url.rstrip("/")
    cloud_api = env.get("PREFECT_CLOUD_API_URL", "https://api.prefect.cloud/api").rstrip("/")
    if ui_url.startswith(cloud_api):
        cloud_ui = env.get("PREFECT_CLOUD_UI_URL", "").strip()
        if not cloud_ui:
            cloud_ui = cloud_api.replace("https://api", "https://app", 1).removesuffix("/api")
        ui_url = ui_url.replace(cloud_api, cloud_ui.rstrip("/"), 1)
    ui_url = ui_url.removesuffix("/api").replace("/api/", "/")
    return ui_url.replace("/accounts/", "/account/").replace("/workspaces/", "/workspace/")


def flow_run_url(info: ServerInfo, flow_run_id: UUID | str) -> str:
    """The UI page of a flow run, ``<ui_url>/runs/flow-run/<id>`` (Prefect's UI route)."""
    return f"{info.ui_url.rstrip('/')}/runs/flow-run/{flow_run_id}"


# --------------------------------------------------------------------------- external


def _external_server(api_url: str, home: Path | None) -> ServerInfo:
    api_url = api_url.strip().rstrip("/")
    parts = urlsplit(api_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"PREFECT_API_URL {api_url!r} is not an http(s) URL",
            hint="Set it to your server's API, e.g. http://127.0.0.1:4200/api, "
            "or unset it to use the embedded server.",
        )
    status, detail = _probe_external(f"{api_url}/health", headers=_auth_headers(os.environ))
    unset_hint = "or unset PREFECT_API_URL to use ClaudeCluster's embedded server"
    if status is None:
        raise ServerError(
            f"The Prefect server at PREFECT_API_URL={api_url} does not answer ({detail})",
            hint=f"Start it (e.g. `prefect server start`), fix the URL, {unset_hint}.",
        )
    if status == 404:
        raise ServerError(
            f"PREFECT_API_URL={api_url} answers but has no /health endpoint",
            hint=f"The URL usually ends in /api, e.g. http://host:4200/api; {unset_hint}.",
        )
    # 401/403 still means a Prefect API is there; credentials may come from a Prefect
    # profile we do not read, and Prefect reports auth errors precisely.
    if status >= 400 and status not in (401, 403):
        raise ServerError(
            f"The Prefect server at PREFECT_API_URL={api_url} is unhealthy "
            f"(HTTP {status}: {detail})",
            hint=f"Check the server's logs, {unset_hint}.",
        )
    return ServerInfo(
        api_url=api_url,
        ui_url=_ui_url_for(api_url, os.environ),
        pid=None,
        home=home_path(home),
        started_now=False,
        managed=False,
        log_file=None,
    )


# --------------------------------------------------------------------------- embedded


def _managed_info(state: _ServerState, home: Path, *, started_now: bool) -> ServerInfo:
    return ServerInfo(
        api_url=state.api_url,
        ui_url=state.ui_url,
        pid=state.pid,
        home=home,
        started_now=started_now,
        managed=True,
        log_file=home / LOG_FILE_NAME,
    )


# Every server process ClaudeCluster starts: no analytics, and a log file, not a terminal
# (no colours, no wrapping, never prompt).
SERVER_SETTINGS_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_CLI_COLORS": "false",
    "PREFECT_CLI_WRAP_LINES": "false",
    "PREFECT_CLI_PROMPT": "false",
    "PYTHONUNBUFFERED": "1",
}


# Logs stream out over the /api/logs/out websocket (off in Prefect by default), so the
# TypeScript SDK's watchRun shows a shared server's logs the moment they arrive. Not for the
# embedded server: publishing every log line costs its one process enough CPU to slow a run
# of four sessions on two cores by a quarter (benchmarks/run.py, N=32 K=4: ratio 1.62-1.69
# with it, 1.37 without); watchRun reads logs over REST every two seconds there instead.
LOG_STREAM_ENV = {
    "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "true",
    "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": "true",
}


def server_base_env() -> dict[str, str]:
    """This process's environment for a server process: without the caller's client-side and
    profile settings (an API URL, a profile, another PREFECT_HOME), which could redirect it;
    PREFECT_SERVER_* tuning passes."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PREFECT_") or key.startswith("PREFECT_SERVER_")
    }


def _server_env(home: Path, port: int) -> dict[str, str]:
    env = server_base_env()
    api_url = f"http://{LOOPBACK_HOST}:{port}/api"
    for key in ("PREFECT_SERVER_API_BASE_PATH", "PREFECT_SERVER_UI_SERVE_BASE"):
        env.pop(key, None)  # our URLs assume the API at /api and the UI at /
    env.update(
        {
            "PREFECT_HOME": str(home / PREFECT_HOME_DIR_NAME),
            "PREFECT_SERVER_API_HOST": LOOPBACK_HOST,
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_SERVER_UI_API_URL": api_url,
            **SERVER_SETTINGS_ENV,
        }
    )
    return env


def _rotate_log(log_file: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if log_file.stat().st_size > 0:
            os.replace(log_file, log_file.with_name(log_file.name + ".1"))


def _log_line(log: IO[bytes], text: str) -> None:
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    log.write(f"--- claudecluster {stamp}: {text}\n".encode())
    log.flush()


def _server_command(port: int) -> list[str]:
    prefect_cli = [sys.executable, "-m", "prefect"]
    return [*prefect_cli, "server", "start", "--host", LOOPBACK_HOST, "--port", str(port)]


def _private_opener(path: str, flags: int) -> int:
    # The log can hold flow parameters and tracebacks: owner-only, like the database.
    return os.open(path, flags, 0o600)


def _spawn(home: Path, command: list[str], port: int, log_file: Path) -> subprocess.Popen[bytes]:
    (home / PREFECT_HOME_DIR_NAME).mkdir(mode=0o700, exist_ok=True)
    with open(log_file, "ab", opener=_private_opener) as log:
        _log_line(log, f"starting: {' '.join(command)}")
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=home,
                env=_server_env(home, port),
                # Own session: Ctrl-C in the terminal or the CLI exiting must not stop it.
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise ServerError(
                f"Could not run {sys.executable} -m prefect server start: {exc}",
                hint="Check that prefect is installed in this Python environment.",
            ) from exc
        _CHILDREN[process.pid] = process
        _log_line(log, f"server pid {process.pid}, port {port}")
    return process


def _start(home: Path, startup_timeout_s: float) -> _ServerState:
    log_file = home / LOG_FILE_NAME
    _rotate_log(log_file)
    deadline = time.monotonic() + startup_timeout_s
    for attempt in range(1, _START_ATTEMPTS + 1):
        port = _free_port()
        api_url = f"http://{LOOPBACK_HOST}:{port}/api"
        command = _server_command(port)
        process = _spawn(home, command, port, log_file)
        try:
            while True:
                if _local_healthy(api_url, 1.0):
                    return _ServerState(
                        pid=process.pid,
                        port=port,
                        api_url=api_url,
                        ui_url=f"http://{LOOPBACK_HOST}:{port}",
                        started_at=datetime.now(UTC),
                        prefect_version=_prefect_version(),
                        command=command,
                    )
                if process.poll() is not None:
                    break
                if time.monotonic() >= deadline:
                    _terminate(process.pid)
                    raise ServerError(
                        f"The Prefect server did not become healthy within "
                        f"{startup_timeout_s:.0f} s; last lines of {log_file}:\n"
                        f"{_log_tail(log_file)}",
                        hint="Retry with a longer startup timeout, set PREFECT_API_URL to a "
                        "server of your own, or use --ephemeral.",
                    )
                time.sleep(_POLL_INTERVAL_S)
        except BaseException:
            # Interrupted (Ctrl-C) or failed: never leave a half-started server behind.
            if process.poll() is None:
                _terminate(process.pid)
            raise
        _CHILDREN.pop(process.pid, None)
        tail = _log_tail(log_file)
        # The free port can be taken between our probe and the server's bind: try another.
        if "already in use" in tail.lower() and attempt < _START_ATTEMPTS:
            continue
        raise ServerError(
            f"The Prefect server exited with code {process.returncode} while starting; "
            f"last lines of {log_file}:\n{tail}",
            hint="Fix the error above, set PREFECT_API_URL to a server of your own, "
            "or use --ephemeral.",
        )
    raise AssertionError("unreachable")  # pragma: no cover


def _prefect_version() -> str | None:
    # importlib.metadata, not `import prefect`: a full import costs about a second.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prefect")
    except PackageNotFoundError:
        return None


def ensure_server(home: Path | None = None, *, startup_timeout_s: float = 90) -> ServerInfo:
    """Return a healthy Prefect server: ``$PREFECT_API_URL``'s, or the embedded one.

    With ``PREFECT_API_URL`` set, only checks that its ``/health`` answers. Otherwise reuses
    the embedded server recorded in ``home/server.json`` if its process is alive and
    healthy (a few milliseconds, prefect is not imported), or starts one and waits up to
    ``startup_timeout_s`` for it. Concurrent callers share one server.

    Raises:
        ServerError: the server cannot be reached or started (the message includes the
            end of the server log).
        ConfigError: ``PREFECT_API_URL`` or the home directory is unusable.
    """
    if startup_timeout_s <= 0:
        raise ConfigError(
            f"startup_timeout_s must be positive, got {startup_timeout_s}",
            hint="Pass a timeout in seconds, e.g. 90.",
        )
    if external := os.environ.get("PREFECT_API_URL", "").strip():
        return _external_server(external, home)

    home = claudecluster_home(home)
    state = _read_state(home)
    if (
        state is not None
        and _pid_alive(state.pid)
        and _local_healthy(state.api_url, _WARM_HEALTH_TIMEOUT_S)
    ):
        return _managed_info(state, home, started_now=False)

    # Slack on top of the startup timeout for a holder that is itself starting a server.
    with _locked(home, startup_timeout_s + 30):
        # Another command may have started the server while we waited for the lock.
        state = _read_state(home)
        if state is not None:
            if _pid_alive(state.pid) and _looks_like_our_server(state.pid, state.port):
                if _local_healthy(state.api_url, _CONFIRM_HEALTH_TIMEOUT_S):
                    return _managed_info(state, home, started_now=False)
                # Alive but not answering even with a long timeout: hung, replace it.
                _terminate(state.pid)
            _remove_state(home)
        state = _start(home, startup_timeout_s)
        _write_state(home, state)
        return _managed_info(state, home, started_now=True)


def server_status(home: Path | None = None) -> ServerInfo | None:
    """The embedded server's info if it is running and healthy, else None.

    Reports only the server ClaudeCluster manages in ``home``, whatever ``PREFECT_API_URL``
    says, and changes nothing.
    """
    home = home_path(home)
    state = _read_state(home)
    if state is None or not _pid_alive(state.pid):
        return None
    if not _local_healthy(state.api_url, _WARM_HEALTH_TIMEOUT_S):
        return None
    return _managed_info(state, home, started_now=False)


def stop_server(home: Path | None = None) -> bool:
    """Stop the embedded server and forget it; True if a server process was stopped.

    Sends SIGTERM to its process group, then SIGKILL if it has not exited after a grace
    period. The database under ``home/prefect`` is kept for the next start.
    """
    home = home_path(home)
    if not (home / STATE_FILE_NAME).exists():
        return False
    with _locked(home, 60):
        state = _read_state(home)
        stopped = False
        if (
            state is not None
            and _pid_alive(state.pid)
            and _looks_like_our_server(state.pid, state.port)
        ):
            _terminate(state.pid)
            stopped = True
        _remove_state(home)
        return stopped


# --------------------------------------------------------------------------- this process


def _refresh_prefect(old_api_url: str | None) -> None:
    """Make an already imported prefect see the environment as it is now.

    Prefect builds its process-wide settings once, when ``prefect.context`` is imported;
    ``refresh_global_settings_context`` rebuilds them from the environment (prefect
    itself calls it after plugins change environment variables). If prefect is not
    imported yet, the environment alone is enough.
    """
    if "prefect.context" not in sys.modules:
        return
    import prefect.context

    prefect.context.refresh_global_settings_context()
    new_api_url = os.environ.get("PREFECT_API_URL") or None
    if old_api_url != new_api_url:
        _drain_prefect_workers()


def _drain_prefect_workers() -> None:
    # The events and API-log workers are process singletons bound to the API URL at
    # creation; stop them (flushing what they hold) so the next ones use the new server.
    if "prefect.events.worker" in sys.modules:
        from prefect.events.worker import EventsWorker

        _discard_awaitable(EventsWorker.drain_all(timeout=5))
    if "prefect.logging.handlers" in sys.modules:
        from prefect.logging.handlers import APILogWorker

        _discard_awaitable(APILogWorker.drain_all(timeout=5))


def _discard_awaitable(result: object) -> None:
    # Inside a running event loop drain_all has already stopped the workers and returns a
    # coroutine that only waits for them; we cannot wait here, so close it unawaited.
    if inspect.iscoroutine(result):
        result.close()


def _current_api_url() -> str | None:
    if "prefect.settings" in sys.modules:
        from prefect.settings import get_current_settings

        return get_current_settings().api.url or None
    return os.environ.get("PREFECT_API_URL") or None


def use_server(info: ServerInfo) -> None:
    """Point this process's Prefect client (and its subprocesses) at ``info``'s server.

    Sets ``PREFECT_API_URL`` and ``PREFECT_UI_URL`` in ``os.environ`` and, if prefect is
    already imported, rebuilds its global settings. Call it before running flows; it
    lasts for the rest of the process. A ``temporary_settings`` block that is active
    when this is called still wins inside that block; use :func:`using_server` there.
    """
    old_api_url = _current_api_url()
    os.environ["PREFECT_API_URL"] = info.api_url
    os.environ["PREFECT_UI_URL"] = info.ui_url
    _refresh_prefect(old_api_url)


@contextlib.contextmanager
def using_server(info: ServerInfo) -> Iterator[ServerInfo]:
    """Like :func:`use_server` for the duration of a ``with`` block, then restore.

    Also overrides any prefect settings context active around the block, and on exit
    flushes Prefect's event and log workers so nothing is sent to the wrong server.
    """
    saved = {key: os.environ.get(key) for key in ("PREFECT_API_URL", "PREFECT_UI_URL")}
    use_server(info)
    try:
        from prefect.settings import temporary_settings

        with temporary_settings(updates={"api.url": info.api_url, "ui_url": info.ui_url}):
            yield info
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _refresh_prefect(info.api_url)


def use_ephemeral() -> None:
    """Use Prefect's per-process throwaway server (``--ephemeral``) in this process.

    Removes ``PREFECT_API_URL`` from the environment and allows ephemeral mode. An API
    URL set in the active Prefect *profile* (not the environment) still takes precedence.
    """
    old_api_url = _current_api_url()
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.pop("PREFECT_UI_URL", None)
    # Both spellings: the canonical one wins if a stale value of it is set.
    os.environ["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "true"
    os.environ["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "true"
    _refresh_prefect(old_api_url)
