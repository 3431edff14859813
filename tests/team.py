"""A team's cluster on one box: machines made of network namespaces, a team server, a git URL.

- **Server host** (this machine's own namespace): PostgreSQL and Redis on loopback, the team
  server (``claudecluster server start --team``: two API replicas and the services behind
  nginx) listening on a bridge, the repository served by ``git daemon`` on the bridge, and
  the scripted model server on the bridge (standing in for the Anthropic API).
- **Worker machines**: each a network namespace on that bridge with a mount namespace where a
  private tmpfs covers the folder holding every test's files (its disk: the driver's and the
  other machines' files are invisible to it; the software is not hidden). A long-lived anchor
  process holds both namespaces, as the machine's kernel would: killing the machine's
  processes leaves its disk. Each runs ``prefect worker start`` for the process pool with
  its own HOME, CLAUDECLUSTER_HOME, PREFECT_HOME and result storage, and reaches the server
  and the repository only over the bridge.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from claudecluster.remote import ServedRepository
from claudecluster.testing import ScriptedModelServer
from claudecluster.testing.services import (
    PostgresServer,
    RedisServer,
    postgres_server,
    redis_server,
)
from tests.cluster import FINAL_STATES, wait_for
from tests.conftest import git

ROOT = Path(__file__).resolve().parents[1]
POOL = "claudecluster-process"
GOAL_DEPLOYMENT = "claudecluster-goal/goal"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# The API is on the network: everyone needs the auth string, as the README says.
AUTH_STRING = "team:not-a-real-secret"
AUTH_HEADER = "Basic " + base64.b64encode(AUTH_STRING.encode()).decode()


def team_topology_missing() -> str | None:
    """Why the topology cannot be built here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nsenter", "unshare", "redis-server", "nginx", "git"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (.ci/run installs it)"
    try:
        import prefect_redis  # noqa: F401
    except ImportError:
        return "prefect-redis is not installed (pip install -e '.[dev]')"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _net_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


@dataclass
class Machine:
    """A worker host: a network namespace and a private disk, held by an anchor process."""

    name: str
    netns: str
    address: str
    anchor: subprocess.Popen[bytes]
    log: Path
    root: str = ""  # its disk: a tmpfs over the folder holding every test's files
    worker: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def enter(self, *command: str) -> list[str]:
        """``command`` run inside this machine (its network and its disk)."""
        return [
            "nsenter",
            f"--net=/run/netns/{self.netns}",
            f"--mount=/proc/{self.anchor.pid}/ns/mnt",
            "--",
            *command,
        ]

    def disk(self, path: str | None = None) -> Path:
        """Where this machine's ``path`` (default: its disk) is seen from the host."""
        return Path(f"/proc/{self.anchor.pid}/root") / (path or self.root).lstrip("/")

    def start_worker(self, *, limit: int) -> None:
        """``prefect worker start`` for the process pool, as this machine's operator would."""
        script = f"mkdir -p {self.root}/home {self.root}/tmp && cd {self.root} && exec " + " ".join(
            [
                sys.executable,
                "-m",
                "prefect",
                "worker",
                "start",
                "--pool",
                POOL,
                "--name",
                self.name,
                "--limit",
                str(limit),
            ]
        )
        with open(self.log, "ab") as log:
            self.worker = subprocess.Popen(
                self.enter("sh", "-c", script),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def processes(self) -> list[int]:
        """Every live process on this machine but its anchor."""
        inode = _net_inode(self.anchor.pid)
        found = []
        for entry in Path("/proc").iterdir():
            pid = int(entry.name) if entry.name.isdigit() else None
            if pid is not None and pid != self.anchor.pid and _net_inode(pid) == inode:
                found.append(pid)
        return found

    def kill_processes(self) -> list[int]:
        """SIGKILL every process of this machine (its disk stays): a crashed host."""
        killed = self.processes()
        for pid in killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.worker is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.worker.wait(timeout=10)
        return killed

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return f"{self.name} log:\n" + "\n".join(text[-lines:])


@dataclass
class Team:
    """The running topology."""

    bridge_ip: str
    api_url: str
    home: Path
    env: dict[str, str]
    postgres: PostgresServer
    redis: RedisServer
    model: ScriptedModelServer
    origin: Path
    repo_url: str
    machines: list[Machine]

    # ----------------------------------------------------------------- the API

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """Call the Prefect REST API through the load balancer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.api_url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "Authorization": AUTH_HEADER},
        )
        for attempt in range(10):
            try:
                with _OPENER.open(request, timeout=30) as response:
                    raw = response.read()
                break
            except OSError:
                if attempt == 9:
                    raise
                time.sleep(1)
        return json.loads(raw) if raw else None

    def flow_run(self, flow_run_id: str) -> dict[str, Any]:
        run: dict[str, Any] = self.api("GET", f"/flow_runs/{flow_run_id}")
        return run

    def children(self, flow_run_id: str) -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = self.api(
            "POST",
            "/flow_runs/filter",
            {"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}},
        )
        return runs

    def states(self, flow_run_id: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.api(
            "GET", f"/flow_run_states/?flow_run_id={flow_run_id}"
        )
        return sorted(found, key=lambda s: s["timestamp"])

    def wait_final(self, flow_run_id: str, timeout_s: float = 300) -> dict[str, Any]:
        run: dict[str, Any] = wait_for(
            lambda: (now := self.flow_run(flow_run_id))["state_type"] in FINAL_STATES and now,
            timeout_s,
            lambda: (
                f"flow run {flow_run_id}: {self.flow_run(flow_run_id)['state']}\n"
                + self.logs_tail()
            ),
            every=1,
        )
        return run

    def logs_tail(self) -> str:
        return "\n".join(m.log_tail(15) for m in self.machines)

    # ----------------------------------------------------------------- commands

    def run(
        self, *args: str, timeout: float = 600, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args),
            cwd=ROOT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "claudecluster.cli", *args, timeout=timeout)

    def prefect(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "prefect", "--no-prompt", *args)

    def origin_branches(self, prefix: str) -> list[str]:
        out = git(self.origin, "for-each-ref", "--format=%(refname:short)", f"refs/heads/{prefix}")
        return sorted(out.split())

    def show(self, ref: str, path: str) -> str:
        return git(self.origin, "show", f"{ref}:{path}")

    def machines_of(self, flow_run: dict[str, Any]) -> set[str]:
        """Every machine that ran ``flow_run``: its worker streams the run's own log lines
        (``Flow run 'NAME' - ...``) into its log; a worker that lost the race for a run
        logs only its id."""
        needle = f"Flow run '{flow_run['name']}' - "
        return {m.name for m in self.machines if needle in m.log.read_text(errors="replace")}

    def machine_of(self, flow_run: dict[str, Any]) -> str | None:
        """The one machine that ran ``flow_run`` (None: none, or several)."""
        found = self.machines_of(flow_run)
        return next(iter(found)) if len(found) == 1 else None


def _seed_origin(root: Path) -> tuple[Path, Path]:
    """A bare repository with a small Python project, and the folder it is served from."""
    work = root / "seed"
    work.mkdir(parents=True)
    git(work, "init", "-q", "-b", "main")
    git(work, "config", "user.email", "team@example.com")
    git(work, "config", "user.name", "Team")
    (work / "README.md").write_text("# shared repository\n")
    (work / "test_smoke.py").write_text("def test_smoke():\n    assert True\n")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "initial")
    served = root / "served"
    served.mkdir()
    origin = served / "shared.git"
    git(root, "clone", "-q", "--bare", str(work), str(origin))
    git(origin, "config", "receive.denyNonFastForwards", "false")
    return work, origin


def add_module_files(team: Team, names: list[str]) -> None:
    """Commit one module per name to the origin's main (through a clone, as a person would)."""
    work = team.home / f"edit-{time.monotonic_ns()}"
    git(team.home, "clone", "-q", str(team.origin), str(work))
    git(work, "config", "user.email", "team@example.com")
    git(work, "config", "user.name", "Team")
    for name in names:
        (work / f"{name}.py").write_text(f"def {name.replace('-', '_')}():\n    return 1\n")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", f"add {len(names)} modules")
    git(work, "push", "-q", "origin", "HEAD:main")
    shutil.rmtree(work)


@contextlib.contextmanager
def team_topology(root: Path, *, machines: int = 3, worker_limit: int = 6) -> Iterator[Team]:
    """Build the whole topology under ``root``; tear it all down after."""
    tag = f"{os.getpid() % 10000}"
    subnet = f"10.{77 + os.getpid() % 50}.{os.getpid() % 250}"
    bridge, bridge_ip = f"ccbr{tag}", f"{subnet}.1"
    made: list[Machine] = []
    with contextlib.ExitStack() as stack:
        _ip("link", "add", bridge, "type", "bridge")
        stack.callback(lambda: subprocess.run(["ip", "link", "del", bridge], check=False))
        _ip("addr", "add", f"{bridge_ip}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        pg = stack.enter_context(postgres_server(root / "postgres"))
        rd = stack.enter_context(redis_server(root / "redis"))
        model = ScriptedModelServer(host=bridge_ip, latency_s=0.0)
        model.start()
        stack.callback(model.stop)
        _, origin = _seed_origin(root / "origin")
        served = stack.enter_context(ServedRepository(origin, host=bridge_ip))
        home = root / "home"
        home.mkdir()
        port = _free_port(bridge_ip)
        api_url = f"http://{bridge_ip}:{port}/api"
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env = {
            **base_env,
            **model.env(max_retries=2),
            "CLAUDECLUSTER_HOME": str(home),
            "PREFECT_HOME": str(home / "client"),
            "PREFECT_API_URL": api_url,
            "PREFECT_API_AUTH_STRING": AUTH_STRING,
            "PREFECT_CLIENT_RETRY_EXTRA_CODES": "500",  # as the README says
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
        server_env = {
            **base_env,
            "CLAUDECLUSTER_HOME": str(home),
            "PREFECT_SERVER_API_AUTH_STRING": AUTH_STRING,
        }
        stack.callback(
            lambda: subprocess.run(
                [sys.executable, "-m", "claudecluster.cli", "server", "stop", "--team"],
                cwd=ROOT,
                env=server_env,
                capture_output=True,
                timeout=120,
            )
        )
        started = subprocess.run(
            [
                sys.executable,
                "-m",
                "claudecluster.cli",
                "server",
                "start",
                "--team",
                "--redis-url",
                rd.url,
                "--host",
                bridge_ip,
                "--port",
                str(port),
                "--public-url",
                api_url[:-4],
            ],
            cwd=ROOT,
            # The database's password through the environment, as the README advises.
            env={**server_env, "CLAUDECLUSTER_DATABASE_URL": pg.url.replace("+asyncpg", "")},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert started.returncode == 0, started.stdout + started.stderr
        team = Team(bridge_ip, api_url, home, env, pg, rd, model, origin, served.url, made)
        proc = team.cli("setup", "--team", "--sessions", "12")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        proc = team.prefect("deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for index in range(machines):
            made.append(
                _machine(stack, root, f"machine-{index + 1}-{tag}", bridge, subnet, index + 2)
            )
        for machine in made:
            machine.env = {
                **base_env,
                **model.env(max_retries=2),
                "HOME": f"{machine.root}/home",
                "TMPDIR": f"{machine.root}/tmp",
                "CLAUDECLUSTER_HOME": f"{machine.root}/claudecluster",
                "PREFECT_HOME": f"{machine.root}/prefect",
                "PREFECT_API_URL": api_url,
                "PREFECT_API_AUTH_STRING": AUTH_STRING,
                "PREFECT_CLIENT_RETRY_EXTRA_CODES": "500",
                "PREFECT_WORKER_QUERY_SECONDS": "1",
                "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "INFO",
                "PYTHONUNBUFFERED": "1",
            }
            machine.start_worker(limit=worker_limit)
        wait_for(
            lambda: (
                len(
                    [
                        w
                        for w in team.api("POST", f"/work_pools/{POOL}/workers/filter", {})
                        if w["status"] == "ONLINE" and w["name"] in {m.name for m in made}
                    ]
                )
                == machines
            ),
            120,
            team.logs_tail,
            every=1,
        )
        try:
            yield team
        finally:
            for machine in made:
                machine.kill_processes()


def _machine(
    stack: contextlib.ExitStack, root: Path, name: str, bridge: str, subnet: str, host: int
) -> Machine:
    netns = name
    _ip("netns", "add", netns)
    stack.callback(lambda: subprocess.run(["ip", "netns", "del", netns], check=False))
    veth = f"cc{host}v{name.rsplit('-', 1)[1]}"[:15]
    _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
    stack.callback(lambda: subprocess.run(["ip", "link", "del", veth], check=False))
    _ip("link", "set", veth, "master", bridge)
    _ip("link", "set", veth, "up")
    _ip("-n", netns, "addr", "add", f"{subnet}.{host}/24", "dev", "eth0")
    _ip("-n", netns, "link", "set", "eth0", "up")
    _ip("-n", netns, "link", "set", "lo", "up")
    # The machine's disk: a private tmpfs, in a mount namespace of its own, over the folder
    # that holds every test's files (the driver's home, the origin, the other machines'):
    # it sees none of them. The software (the checkout, the virtualenv) stays visible, as an
    # installed package would be, wherever it lives (even under /tmp, as in CI).
    hidden = str(root.parent)
    machine_root = f"{hidden}/{name}-disk"
    disk = f"mount -t tmpfs -o size=4g tmpfs {hidden} && mkdir -p {machine_root}"
    anchor = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            netns,
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            f"{disk} && exec sleep infinity",
        ],
        start_new_session=True,
    )
    stack.callback(lambda: (anchor.kill(), anchor.wait(10)))
    machine = Machine(
        name, netns, f"{subnet}.{host}", anchor, root / f"{name}.log", root=machine_root
    )
    machine.log.touch()
    wait_for(lambda: machine.disk().is_dir(), 20, lambda: f"{name}: its disk did not appear")
    return machine


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def require_topology() -> None:
    """Skip unless the topology can be built here; CI sets CLAUDECLUSTER_REQUIRE_TEAM=1 (it
    installs everything), and there a missing part is a failure, not a skip."""
    reason = team_topology_missing()
    if reason is not None:
        missing = (
            pytest.fail if os.environ.get("CLAUDECLUSTER_REQUIRE_TEAM") == "1" else pytest.skip
        )
        missing(f"the team topology cannot be built: {reason}")


def replica_processes(team: Team) -> list[int]:
    """The API replicas' pids, from the team server's state file."""
    from claudecluster.team_server import TeamServer

    state = TeamServer.model_validate_json((team.home / "team" / "team-server.json").read_bytes())
    return state.replica_pids


@contextlib.contextmanager
def replica_killed(team: Team, index: int) -> Iterator[int]:
    """SIGKILL API replica ``index``; when the block ends, start it again as it was started."""
    pid = replica_processes(team)[index]
    command = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    environ = dict(
        item.split(b"=", 1)
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if b"=" in item
    )
    cwd = os.readlink(f"/proc/{pid}/cwd")
    port = command[command.index(b"--port") + 1].decode()
    os.killpg(pid, signal.SIGKILL)
    try:
        yield pid
    finally:
        log = open(Path(cwd) / f"replica-{index + 1}.log", "ab")  # noqa: SIM115
        with log:
            again = subprocess.Popen(
                [c.decode() for c in command],
                env={k.decode(): v.decode() for k, v in environ.items()},
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def healthy() -> bool:
            url = f"http://127.0.0.1:{port}/api/health"
            with contextlib.suppress(OSError), _OPENER.open(url, timeout=2) as response:
                return bool(response.status == 200)
            return False

        # Recorded in the state file, so `claudecluster server stop --team` stops it too.
        from claudecluster.team_server import TeamServer

        state_file = team.home / "team" / "team-server.json"
        state = TeamServer.model_validate_json(state_file.read_bytes())
        state.replica_pids[index] = again.pid
        state_file.write_text(state.model_dump_json(indent=2))
        wait_for(healthy, 90, lambda: f"replica {index + 1} did not come back")
