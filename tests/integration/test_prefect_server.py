"""The embedded Prefect server, against real ``prefect server start`` processes.

A cold start costs 10-20 s, so one server (``shared_server``) serves every test that only
needs *a* healthy server; the stale-state/race/stop tests get their own. Every server a
test starts is stopped by a finalizer, and the finalizer kills it outright if ``stop_server``
did not, so a failing test leaves no process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from claudecluster.errors import ConfigError, ServerError
from claudecluster.prefect_server import (
    LOG_FILE_NAME,
    STATE_FILE_NAME,
    ServerInfo,
    ensure_server,
    flow_run_url,
    server_status,
    stop_server,
    using_server,
)
from claudecluster.workspace import claudecluster_home

pytestmark = [pytest.mark.prefect_server, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --------------------------------------------------------------------------- helpers


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        # An orphan may linger as a zombie if PID 1 does not reap: that is gone too.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _port_answers(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _get(url: str, *, accept: str = "application/json") -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Accept": accept})
    with _NO_PROXY.open(request, timeout=10) as response:
        return response.status, response.read().decode()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_of(info: ServerInfo) -> int:
    return int(info.api_url.rsplit(":", 1)[1].split("/", 1)[0])


def _stop_for_sure(home: Path, pids: set[int]) -> None:
    """Finalizer: stop the home's server, then SIGKILL any known pid that survived."""
    with contextlib.suppress(Exception):
        stop_server(home)
    for pid in pids:
        if not _process_gone(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def _subprocess_env(home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env["CLAUDECLUSTER_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(autouse=True)
def _no_api_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerInfo, float]]:
    """One embedded server for the module, cold-started via CLAUDECLUSTER_HOME."""
    home = tmp_path_factory.mktemp("cc-home")
    pids: set[int] = set()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLAUDECLUSTER_HOME", str(home))
        mp.delenv("PREFECT_API_URL", raising=False)
        try:
            started = time.monotonic()
            info = ensure_server(startup_timeout_s=120)
            elapsed = time.monotonic() - started
            assert info.pid is not None
            pids.add(info.pid)
            print(f"\ncold start: {elapsed:.1f} s")
            yield info, elapsed
        finally:
            _stop_for_sure(home, pids)


@pytest.fixture
def shared_home(shared_server: tuple[ServerInfo, float], monkeypatch: pytest.MonkeyPatch) -> Path:
    info, _ = shared_server
    monkeypatch.setenv("CLAUDECLUSTER_HOME", str(info.home))
    return info.home


# --------------------------------------------------------------------------- tests


class TestHome:
    """Where ClaudeCluster keeps the server's state."""

    def test_env_var_wins_and_is_created(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        target = tmp_path / "nested" / "home"
        monkeypatch.setenv("CLAUDECLUSTER_HOME", str(target))
        assert claudecluster_home() == target
        assert target.is_dir()

    def test_default_is_dot_claudecluster(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("CLAUDECLUSTER_HOME", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path))
        assert claudecluster_home() == tmp_path / ".claudecluster"

    def test_a_file_in_the_way_is_a_config_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        blocker = tmp_path / "file"
        blocker.write_text("")
        monkeypatch.setenv("CLAUDECLUSTER_HOME", str(blocker))
        with pytest.raises(ConfigError, match="not a directory"):
            claudecluster_home()


class TestColdStartAndReuse:
    """The first call starts a local server; later calls reuse it cheaply."""

    def test_cold_start_returns_a_healthy_managed_server(
        self, shared_server: tuple[ServerInfo, float]
    ) -> None:
        info, _ = shared_server
        assert info.started_now
        assert info.managed
        assert info.pid is not None
        assert not _process_gone(info.pid)
        assert info.api_url.startswith("http://127.0.0.1:")
        assert info.api_url.endswith("/api")
        assert info.ui_url == info.api_url.removesuffix("/api")
        assert _get(f"{info.api_url}/health") == (200, "true")
        assert info.log_file == info.home / LOG_FILE_NAME
        assert info.log_file.is_file()
        state = json.loads((info.home / STATE_FILE_NAME).read_text())
        assert state["pid"] == info.pid
        assert state["api_url"] == info.api_url
        assert (info.home / "prefect" / "prefect.db").is_file()

    def test_listens_on_loopback_only(self, shared_server: tuple[ServerInfo, float]) -> None:
        info, _ = shared_server
        tcp = Path("/proc/net/tcp")
        if not tcp.exists():
            pytest.skip("needs /proc/net/tcp")
        port_hex = f"{_port_of(info):04X}"
        listening = [
            fields[1]
            for fields in (line.split() for line in tcp.read_text().splitlines()[1:])
            if fields[1].endswith(f":{port_hex}") and fields[3] == "0A"
        ]
        assert listening == ["0100007F:" + port_hex]
        assert not any(
            line.split()[1].endswith(f":{port_hex}") and line.split()[3] == "0A"
            for line in Path("/proc/net/tcp6").read_text().splitlines()[1:]
        )

    def test_second_call_reuses_it_quickly(self, shared_server: tuple[ServerInfo, float]) -> None:
        info, cold = shared_server
        started = time.monotonic()
        again = ensure_server()
        warm = time.monotonic() - started
        print(f"\ncold start {cold:.1f} s, warm ensure {warm * 1000:.1f} ms")
        assert again.pid == info.pid
        assert again.api_url == info.api_url
        assert not again.started_now
        assert warm < 1.0

    def test_warm_path_does_not_import_prefect(self, shared_home: Path) -> None:
        script = (
            "import sys, time\n"
            "import claudecluster.prefect_server as ps\n"
            "before = 'prefect' in sys.modules\n"
            "t = time.monotonic(); info = ps.ensure_server(); t = time.monotonic() - t\n"
            "print(before, 'prefect' in sys.modules, info.started_now, t)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script],
            env=_subprocess_env(shared_home),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.split()
        before, after, started_now, seconds = out
        assert after == before
        assert started_now == "False"
        assert float(seconds) < 1.0

    def test_status_reports_the_running_server(
        self, shared_server: tuple[ServerInfo, float], shared_home: Path
    ) -> None:
        info, _ = shared_server
        status = server_status()
        assert status == info.model_copy(update={"started_now": False})

    def test_flow_run_url_opens_the_ui(self, shared_server: tuple[ServerInfo, float]) -> None:
        info, _ = shared_server
        run_id = "0b5fd4bc-2b7c-4f39-9a4a-2a4ac2c0b6f1"
        url = flow_run_url(info, run_id)
        assert url == f"{info.ui_url}/runs/flow-run/{run_id}"
        status, body = _get(url, accept="text/html")
        assert status == 200
        assert "<html" in body.lower()


class TestUseServer:
    """Flow runs in this process and its children land on the chosen server."""

    def test_flow_run_after_use_server_is_on_that_server(
        self, shared_server: tuple[ServerInfo, float]
    ) -> None:
        from prefect import flow
        from prefect.client.orchestration import get_client
        from prefect.runtime import flow_run

        info, _ = shared_server

        @flow(name="cc-use-server-probe")
        def probe() -> str:
            return str(flow_run.id)

        with using_server(info):
            assert os.environ["PREFECT_API_URL"] == info.api_url
            run_id = probe()
            with get_client(sync_client=True) as client:
                assert str(client.api_url).rstrip("/") == info.api_url
                run = client.read_flow_run(UUID(run_id))
        assert run.state is not None
        assert run.state.is_completed()
        # Independent of prefect's settings: the run is in that server's database.
        status, body = _get(f"{info.api_url}/flow_runs/{run_id}")
        assert status == 200
        assert json.loads(body)["id"] == run_id
        assert "PREFECT_API_URL" not in os.environ

    def test_use_server_before_prefect_is_imported(
        self, shared_server: tuple[ServerInfo, float], shared_home: Path
    ) -> None:
        info, _ = shared_server
        script = (
            "import sys\n"
            "from claudecluster.prefect_server import ensure_server, use_server\n"
            "print('PREFECT_IMPORTED_BEFORE', 'prefect' in sys.modules)\n"
            "use_server(ensure_server())\n"
            "from prefect import flow\n"
            "from prefect.runtime import flow_run\n"
            "@flow(name='cc-use-server-child')\n"
            "def probe() -> str:\n"
            "    return str(flow_run.id)\n"
            "print('RUN', probe())\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            env=_subprocess_env(shared_home),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        run_id = next(
            line.split()[1] for line in result.stdout.splitlines() if line.startswith("RUN ")
        )
        status, body = _get(f"{info.api_url}/flow_runs/{run_id}")
        assert status == 200
        assert json.loads(body)["state_type"] == "COMPLETED"

    def test_use_server_exports_the_urls(self, shared_server: tuple[ServerInfo, float]) -> None:
        # In a fresh interpreter with prefect already imported: a test session may hold its
        # own temporary Prefect settings (the harness), which rightly win in-process.
        info, _ = shared_server
        script = (
            "import os, prefect\n"
            "from claudecluster.prefect_server import ensure_server, use_server\n"
            "from prefect.settings import get_current_settings\n"
            "info = ensure_server()\n"
            "use_server(info)\n"
            "print(os.environ['PREFECT_API_URL'], os.environ['PREFECT_UI_URL'],"
            " get_current_settings().api.url)\n"
        )
        env = _subprocess_env(info.home)
        env.pop("PREFECT_UI_URL", None)
        result = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr[-2000:]
        api_env, ui_env, api_settings = result.stdout.split()
        assert api_env == info.api_url
        assert ui_env == info.ui_url
        assert api_settings == info.api_url

    def test_use_ephemeral_clears_the_api_url(self, tmp_path: Path) -> None:
        script = (
            "import os, prefect\n"
            "from claudecluster.prefect_server import use_ephemeral\n"
            "from prefect.settings import get_current_settings\n"
            "use_ephemeral()\n"
            "settings = get_current_settings()\n"
            "print('PREFECT_API_URL' in os.environ,"
            " os.environ['PREFECT_SERVER_ALLOW_EPHEMERAL_MODE'],"
            " repr(settings.api.url), settings.server.ephemeral.enabled)\n"
        )
        env = _subprocess_env(tmp_path)
        env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"
        env.pop("PREFECT_SERVER_EPHEMERAL_ENABLED", None)
        env.pop("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", None)
        result = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.split() == ["False", "true", "None", "True"]


class TestExternalServer:
    """With PREFECT_API_URL set, that server is checked and used; nothing is started."""

    def test_unreachable_url_raises_server_error_with_hint(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        url = f"http://127.0.0.1:{_free_port()}/api"
        monkeypatch.setenv("PREFECT_API_URL", url)
        with pytest.raises(ServerError) as caught:
            ensure_server(tmp_path)
        assert url in caught.value.message
        assert caught.value.hint is not None
        assert "PREFECT_API_URL" in caught.value.hint
        assert not (tmp_path / STATE_FILE_NAME).exists()

    def test_url_without_api_path_gets_a_hint(
        self,
        shared_server: tuple[ServerInfo, float],
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        info, _ = shared_server
        monkeypatch.setenv("PREFECT_API_URL", f"{info.ui_url}/nope")
        with pytest.raises(ServerError) as caught:
            ensure_server(tmp_path)
        assert caught.value.hint is not None
        assert "/api" in caught.value.hint

    def test_not_a_url_is_a_config_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("PREFECT_API_URL", "localhost:4200")
        with pytest.raises(ConfigError, match="PREFECT_API_URL"):
            ensure_server(tmp_path)

    def test_reachable_url_is_used_as_is(
        self,
        shared_server: tuple[ServerInfo, float],
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        info, _ = shared_server
        monkeypatch.setenv("PREFECT_API_URL", info.api_url + "/")
        monkeypatch.delenv("PREFECT_UI_URL", raising=False)
        external = ensure_server(tmp_path)
        assert external.api_url == info.api_url
        assert external.ui_url == info.ui_url
        assert external.pid is None
        assert not external.managed
        assert not external.started_now
        assert external.log_file is None
        assert not (tmp_path / STATE_FILE_NAME).exists()


@pytest.fixture(scope="class")
def raced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A stale server.json (dead pid), then two CLIs calling ensure_server at once."""
    home = tmp_path_factory.mktemp("cc-race")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_port = _free_port()
    (home / STATE_FILE_NAME).write_text(
        json.dumps(
            {
                "pid": dead.pid,
                "port": stale_port,
                "api_url": f"http://127.0.0.1:{stale_port}/api",
                "ui_url": f"http://127.0.0.1:{stale_port}",
                "started_at": "2024-01-01T00:00:00Z",
            }
        )
    )
    script = (
        "from claudecluster.prefect_server import ensure_server\n"
        "print(ensure_server(startup_timeout_s=120).model_dump_json())\n"
    )
    pids: set[int] = set()
    racers: list[subprocess.Popen[str]] = []
    try:
        racers = [
            subprocess.Popen(
                [sys.executable, "-c", script],
                env=_subprocess_env(home),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        infos: list[ServerInfo] = []
        for racer in racers:
            out, err = racer.communicate(timeout=240)
            assert racer.returncode == 0, err[-2000:]
            info = ServerInfo.model_validate_json(out.strip().splitlines()[-1])
            infos.append(info)
            if info.pid is not None:
                pids.add(info.pid)
        yield {"home": home, "dead_pid": dead.pid, "infos": infos}
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.wait()
        _stop_for_sure(home, pids)


class TestStaleStateRaceAndStop:
    """A dead server is replaced once even under a race, and stopping leaves nothing."""

    def test_stale_state_file_leads_to_one_fresh_start(self, raced: dict[str, Any]) -> None:
        infos: list[ServerInfo] = raced["infos"]
        assert len({info.pid for info in infos}) == 1
        assert infos[0].pid != raced["dead_pid"]
        assert sorted(info.started_now for info in infos) == [False, True]
        status = server_status(raced["home"])
        assert status is not None
        assert status.pid == infos[0].pid

    def test_stop_server_leaves_no_process(self, raced: dict[str, Any]) -> None:
        home: Path = raced["home"]
        info = server_status(home)
        assert info is not None
        assert info.pid is not None
        port = _port_of(info)
        assert _port_answers(port)
        assert stop_server(home) is True
        assert _process_gone(info.pid)
        assert not _port_answers(port)
        assert not (home / STATE_FILE_NAME).exists()
        assert server_status(home) is None
        assert stop_server(home) is False


class TestFailures:
    """Failed starts clean up after themselves and say why."""

    def test_startup_timeout_kills_the_server_and_shows_the_log(self, tmp_path: Path) -> None:
        with pytest.raises(ServerError) as caught:
            ensure_server(tmp_path, startup_timeout_s=0.5)
        assert "last lines of" in caught.value.message
        assert caught.value.hint is not None
        log = (tmp_path / LOG_FILE_NAME).read_text()
        pid = int(log.split("server pid ", 1)[1].split(",", 1)[0])
        try:
            assert _process_gone(pid)
            assert not (tmp_path / STATE_FILE_NAME).exists()
        finally:
            _stop_for_sure(tmp_path, {pid})

    def test_stop_without_a_server_returns_false(self, tmp_path: Path) -> None:
        home = tmp_path / "never-used"
        assert stop_server(home) is False
        assert not home.exists()
        assert server_status(home) is None
