"""A real Prefect server with ClaudeCluster set up, deployed, and a worker for one pool.

Shared by the work-pool tests (process pool) and the container tests (Docker pool). The
driver runs as users run it: the ``claudecluster`` CLI or ``prefect deployment run``, as
subprocesses pointed at the server.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from claudecluster.prefect_server import ensure_server, stop_server
from claudecluster.testing import ScriptedModelServer

ROOT = Path(__file__).resolve().parents[1]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
DEFAULT_SESSIONS = 8

# Loopback requests must never go through a proxy from the environment.
_API_TRIES = 5
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --------------------------------------------------------------------------- the cluster


@dataclass
class Cluster:
    """A Prefect server, its deployments and one pool's worker."""

    api_url: str
    home: Path
    env: dict[str, str]
    worker_log: Path
    worker: subprocess.Popen[bytes] | None = None
    pool: str = "claudecluster-process"
    deployment_ids: dict[str, str] = field(default_factory=dict)

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """Call the Prefect REST API; returns the decoded JSON (None for no content)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.api_url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        for attempt in range(_API_TRIES):
            try:
                with _OPENER.open(request, timeout=30) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as exc:
                # A busy SQLite server answers 503; Prefect's own client retries it too.
                if exc.code != 503 or attempt == _API_TRIES - 1:
                    raise
                time.sleep(0.5 * (attempt + 1))
        return json.loads(raw) if raw else None

    def flow_run(self, flow_run_id: str) -> dict[str, Any]:
        """One flow run."""
        run: dict[str, Any] = self.api("GET", f"/flow_runs/{flow_run_id}")
        return run

    def flow_runs(self, **filters: Any) -> list[dict[str, Any]]:
        """Flow runs matching a ``/flow_runs/filter`` body."""
        runs: list[dict[str, Any]] = self.api("POST", "/flow_runs/filter", filters)
        return runs

    def children(self, flow_run_id: str) -> list[dict[str, Any]]:
        """The flow runs whose parent task run belongs to ``flow_run_id``."""
        return self.flow_runs(flow_runs={"parent_flow_run_id": {"any_": [flow_run_id]}})

    def wait_final(self, flow_run_id: str, timeout_s: float = 150) -> dict[str, Any]:
        """Poll a flow run until it is in a final state; fail with its state at the deadline."""
        run: dict[str, Any] = wait_for(
            lambda: (now := self.flow_run(flow_run_id))["state_type"] in FINAL_STATES and now,
            timeout_s,
            lambda: (
                f"flow run {flow_run_id}: {self.flow_run(flow_run_id)['state']}\n"
                + self.worker_tail()
            ),
        )
        return run

    def worker_tail(self, lines: int = 40) -> str:
        """The end of the worker's log, for failure messages."""
        text_lines = self.worker_log.read_text(errors="replace").splitlines()
        return "worker log:\n" + "\n".join(text_lines[-lines:])

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 240
    ) -> subprocess.CompletedProcess[str]:
        """A command in the repository root, pointed at the module's server."""
        return subprocess.run(
            list(args),
            cwd=ROOT,
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def cli(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """The ``claudecluster`` command line."""
        return self.run(sys.executable, "-m", "claudecluster.cli", *args, env=env)

    def prefect(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The ``prefect`` command line."""
        return self.run(sys.executable, "-m", "prefect", "--no-prompt", *args)

    def run_deployment(self, name: str, params: dict[str, Any]) -> str:
        """``prefect deployment run NAME --params JSON``; returns the new flow run's id."""
        proc = self.prefect("deployment", "run", name, "--params", json.dumps(params))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        found: list[str] = UUID_RE.findall(proc.stdout)
        assert found, proc.stdout
        return found[-1]

    def set_sessions(self, sessions: int) -> None:
        """Set the session limit with ``claudecluster setup --sessions N``."""
        proc = self.cli("setup", "--sessions", str(sessions))
        assert proc.returncode == 0, proc.stderr
        assert f"claudecluster-sessions: {sessions} sessions" in proc.stdout, proc.stdout


def wait_for(
    probe: Callable[[], Any], timeout_s: float, describe: Callable[[], str], every: float = 0.5
) -> Any:
    """Poll ``probe`` until it returns something truthy; fail with ``describe()`` otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"not within {timeout_s:g} s: {describe()}")
        time.sleep(every)


def processes_with(*needles: str) -> list[int]:
    """Pids of live processes whose environment carries every ``KEY=value`` in ``needles``."""
    wanted = [n.encode() for n in needles]
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(n in environ for n in wanted):
            pids.append(int(entry.name))
    return pids


def kill_pids(pids: list[int]) -> None:
    """SIGKILL these pids (ours), ignoring ones already gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _wait_worker_online(cluster: Cluster, name: str) -> None:
    def online() -> bool:
        assert cluster.worker is not None
        if cluster.worker.poll() is not None:
            pytest.fail(f"the worker exited: {cluster.worker.returncode}\n{cluster.worker_tail()}")
        workers = cluster.api("POST", f"/work_pools/{cluster.pool}/workers/filter", {})
        return any(w["name"] == name and w.get("status") == "ONLINE" for w in workers)

    wait_for(online, 90, cluster.worker_tail)


@contextlib.contextmanager
def running_cluster(
    home: Path,
    model_server: ScriptedModelServer,
    *,
    pool: str,
    deployments: tuple[str, ...],
    setup_args: tuple[str, ...] = (),
    worker_env: dict[str, str] | None = None,
    before_worker: Callable[[Cluster], None] | None = None,
) -> Iterator[Cluster]:
    """A real Prefect server in ``home``, set up and deployed, with a worker for ``pool``."""
    # The server must be our own embedded one, whatever another module exported. Its
    # scheduler runs every few seconds, so scheduled runs appear without a minute's wait, and
    # its cancellation cleanup (which cancels subflows of a Cancelled parent) is off, so only
    # ClaudeCluster's own on_cancellation hook can cancel a goal's worker flow runs.
    server_settings = {
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "3",
        "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED": "false",
    }
    saved = {key: os.environ.pop(key, None) for key in ("PREFECT_API_URL", *server_settings)}
    os.environ.update(server_settings)
    try:
        info = ensure_server(home)
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value
    worker: subprocess.Popen[bytes] | None = None
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(model_server.env(max_retries=2))
        env.update(
            {
                "PREFECT_API_URL": info.api_url,
                "PREFECT_UI_URL": info.ui_url,
                # Client-side Prefect state (profiles, local result storage) of the driver,
                # the worker and its flow runs: one place, shared, out of the real home.
                "PREFECT_HOME": str(home / "client"),
                "PREFECT_WORKER_QUERY_SECONDS": "1",
                "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
                "CLAUDECLUSTER_HOME": str(home),
                "PYTHONUNBUFFERED": "1",
            }
        )
        worker_log = home / "worker.log"
        worker_log.touch()
        made = Cluster(info.api_url, home, env, worker_log)
        made.pool = pool
        if before_worker is not None:
            before_worker(made)
        proc = made.cli("setup", "--sessions", str(DEFAULT_SESSIONS), *setup_args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        proc = made.prefect("deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for name in deployments:
            made.deployment_ids[name] = made.api("GET", f"/deployments/name/{name}")["id"]
        worker_name = f"test-worker-{uuid.uuid4().hex[:8]}"
        with open(worker_log, "ab") as log:
            worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "worker",
                    "start",
                    "--pool",
                    pool,
                    "--name",
                    worker_name,
                ],
                cwd=ROOT,
                env={**env, **(worker_env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        made.worker = worker
        _wait_worker_online(made, worker_name)
        yield made
    finally:
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=10)
        # Flow runs and sessions the worker started and that outlived it are ours too.
        kill_pids(processes_with(f"CLAUDECLUSTER_HOME={home}"))
        stop_server(home)


@contextlib.contextmanager
def ftp_result_store(root: Path) -> Iterator[dict[str, object]]:
    """An FTP server on loopback serving ``root``: result storage that the driver and the
    containers (or pods) both reach, without sharing a disk. Yields the root and the
    ``RemoteFileSystem`` settings for it."""
    import threading

    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.servers import ThreadedFTPServer

    authorizer = DummyAuthorizer()
    authorizer.add_user("results", "results-password", str(root), perm="elradfmwMT")
    handler = type("ResultsHandler", (FTPHandler,), {"authorizer": authorizer})
    server = ThreadedFTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"timeout": 0.2}, daemon=True)
    thread.start()
    try:
        yield {
            "root": root,
            "settings": {
                "host": "127.0.0.1",
                "port": server.socket.getsockname()[1],
                "username": "results",
                "password": "results-password",
            },
        }
    finally:
        server.close_all()
        thread.join(timeout=5)
