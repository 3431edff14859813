"""The team server's configuration and the pieces a lost machine's retry relies on.

The topology itself (PostgreSQL, Redis, replicas, nginx, worker machines) runs in
``tests/integration/test_team.py``; these check what can be checked without it: the
settings every process gets, one-line errors for bad input before anything starts, nginx's
configuration, a client waiting out a passing 503 behind the balancer, checkpoints of a
worktree, and reading lost attempts back.
"""

from __future__ import annotations

import http.server
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import git
import pytest

from claudecluster import gitops, prefect_server
from claudecluster.errors import ConfigError, ServerError
from claudecluster.team_server import (
    TeamServerConfig,
    nginx_config,
    start_team_server,
    team_server_env,
)
from claudecluster.worker import (
    ATTEMPT_TRAILER,
    COST_TRAILER,
    RUN_TRAILER,
    STARTED_TRAILER,
    TASK_TRAILER,
    TURNS_TRAILER,
    lost_attempts,
)
from tests.conftest import git as run_git

ROOT = Path(__file__).resolve().parents[2]


def config(**changes: object) -> TeamServerConfig:
    values: dict[str, object] = {
        "database_url": "postgresql://prefect:secret@db.internal:5432/prefect",
        "redis_url": "redis://cache.internal:6379/0",
        "public_url": "http://prefect.internal:4200",
    }
    values.update(changes)
    return TeamServerConfig.model_validate(values)


class TestSettings:
    def test_every_process_gets_postgres_redis_and_no_analytics(self, tmp_path: Path) -> None:
        env = team_server_env(config(), tmp_path)

        assert env["PREFECT_API_DATABASE_CONNECTION_URL"] == (
            "postgresql+asyncpg://prefect:secret@db.internal:5432/prefect"
        )
        assert env["PREFECT_MESSAGING_BROKER"] == "prefect_redis.messaging"
        assert env["PREFECT_MESSAGING_CACHE"] == "prefect_redis.messaging"
        assert env["PREFECT_SERVER_EVENTS_CAUSAL_ORDERING"] == "prefect_redis.ordering"
        assert env["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"] == "prefect_redis.lease_storage"
        assert env["PREFECT_REDIS_MESSAGING_URL"] == "redis://cache.internal:6379/0"
        assert env["PREFECT_SERVER_DOCKET_URL"] == "redis://cache.internal:6379/0"
        assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
        # The SDK's watchRun gets a shared server's logs as they arrive.
        assert env["PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED"] == "true"
        assert env["PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED"] == "true"
        assert env["PREFECT_UI_API_URL"] == "http://prefect.internal:4200/api"
        assert env["PREFECT_HOME"] == str(tmp_path)

    def test_a_client_setting_of_the_caller_does_not_leak_in(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("PREFECT_API_URL", "http://elsewhere:4200/api")
        monkeypatch.setenv("PREFECT_SERVER_API_KEEPALIVE_TIMEOUT", "9")

        env = team_server_env(config(), tmp_path)

        assert "PREFECT_API_URL" not in env
        assert env["PREFECT_SERVER_API_KEEPALIVE_TIMEOUT"] == "9"

    @pytest.mark.parametrize(
        ("changes", "wrong"),
        [
            ({"database_url": "sqlite+aiosqlite:///prefect.db"}, "--database-url"),
            ({"redis_url": "http://cache:6379"}, "--redis-url"),
        ],
    )
    def test_wrong_urls_are_one_line_errors(
        self, tmp_path: Path, changes: dict[str, str], wrong: str
    ) -> None:
        with pytest.raises(ConfigError) as caught:
            team_server_env(config(**changes), tmp_path)

        assert wrong in caught.value.message and "\n" not in caught.value.one_line()
        assert caught.value.hint

    def test_nothing_starts_when_redis_does_not_answer(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError) as caught:
            start_team_server(config(redis_url="redis://127.0.0.1:1/0"), tmp_path)

        assert caught.value.message.startswith("Redis at redis://127.0.0.1:1/0 does not answer")
        assert not (tmp_path / "team" / "team-server.json").exists()
        assert not list((tmp_path / "team").glob("replica-*.log"))

    @pytest.mark.skipif(
        shutil.which("nginx") is None or importlib.util.find_spec("prefect_redis") is None,
        reason="nginx or prefect-redis is not installed (.ci/run installs them)",
    )
    def test_passwords_are_not_echoed(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError) as caught:
            start_team_server(config(redis_url="redis://:hunter2@127.0.0.1:1/0"), tmp_path)

        assert caught.value.message.startswith("Redis at redis://:***@127.0.0.1:1/0 does not")
        assert "hunter2" not in caught.value.one_line()

    def test_a_port_in_use_is_refused_before_anything_starts(self, tmp_path: Path) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(ConfigError) as caught:
                start_team_server(config(host="127.0.0.1", port=port), tmp_path)

        assert caught.value.message.startswith(f"cannot listen on 127.0.0.1:{port}")
        assert not list((tmp_path / "team").glob("*.log"))


class TestCommandLine:
    def run(self, *args: str, home: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "claudecluster.cli", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin", "CLAUDECLUSTER_HOME": str(home), "HOME": str(home)},
            timeout=60,
        )

    def test_team_start_without_urls_is_a_usage_error(self, tmp_path: Path) -> None:
        proc = self.run("server", "start", "--team", home=tmp_path)

        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "--database-url and --redis-url" in lines[0], proc.stderr

    @pytest.mark.parametrize(
        ("flag", "value"),
        [("--redis-url", "http://cache:6379"), ("--database-url", "sqlite:///prefect.db")],
    )
    def test_a_wrong_url_is_one_line_not_a_traceback(
        self, tmp_path: Path, flag: str, value: str
    ) -> None:
        urls = {"--database-url": "postgresql://db/prefect", "--redis-url": "redis://cache/0"}
        urls[flag] = value
        args = [part for pair in urls.items() for part in pair]

        proc = self.run("server", "start", "--team", *args, home=tmp_path)

        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and flag in lines[0], proc.stderr

    def test_an_impossible_port_is_a_usage_error(self, tmp_path: Path) -> None:
        proc = self.run(
            "server", "start", "--team", "--database-url", "postgresql://db/prefect",
            "--redis-url", "redis://cache:6379/0", "--port", "70000", home=tmp_path,
        )  # fmt: skip

        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "--port" in lines[0], proc.stderr

    def test_team_status_when_none_runs(self, tmp_path: Path) -> None:
        proc = self.run("server", "status", "--team", home=tmp_path)

        assert proc.returncode == 1
        assert proc.stdout.strip() == "no team server running here"


class TestLoadBalancer:
    def test_nginx_spreads_over_the_replicas_and_passes_websockets(self, tmp_path: Path) -> None:
        text = nginx_config(tmp_path, host="0.0.0.0", port=4200, replica_ports=[5001, 5002])
        ipv6 = nginx_config(tmp_path, host="::", port=4200, replica_ports=[5001])

        assert "server 127.0.0.1:5001 max_fails=0;" in text
        assert "server 127.0.0.1:5002 max_fails=0;" in text
        assert "listen 0.0.0.0:4200;" in text
        assert "listen [::]:4200;" in ipv6
        assert "proxy_set_header Upgrade $http_upgrade;" in text
        assert "proxy_next_upstream error timeout http_502 http_504;" in text
        assert "keepalive_timeout 4s;" in text
        assert "client_body_buffer_size 64m;" in text  # never a temp file nginx cannot write

    @pytest.mark.skipif(
        subprocess.run(["which", "nginx"], capture_output=True).returncode != 0,
        reason="nginx is not installed (.ci/run installs it)",
    )
    def test_nginx_accepts_the_configuration(self, tmp_path: Path) -> None:
        (tmp_path / "nginx-temp").mkdir()
        conf = tmp_path / "nginx.conf"
        conf.write_text(
            nginx_config(tmp_path, host="127.0.0.1", port=4200, replica_ports=[5001, 5002])
        )

        proc = subprocess.run(
            ["nginx", "-t", "-c", str(conf), "-p", str(tmp_path)], capture_output=True, text=True
        )

        assert proc.returncode == 0, proc.stderr
        broken = conf.read_text().replace("upstream prefect_api {", "upstream prefect_api ")
        conf.write_text(broken)
        assert subprocess.run(["nginx", "-t", "-c", str(conf), "-p", str(tmp_path)]).returncode


class TestCheckpoints:
    def test_a_snapshot_leaves_the_worktree_as_it_was(self, repo: Path) -> None:
        (repo / "calc.py").write_text("changed\n")
        (repo / "new.py").write_text("new\n")
        run_git(repo, "add", "new.py")
        status = run_git(repo, "status", "--porcelain")
        head = run_git(repo, "rev-parse", "HEAD").strip()

        commit = gitops.snapshot_commit(repo, "snapshot")

        assert commit is not None
        assert run_git(repo, "status", "--porcelain") == status
        assert run_git(repo, "rev-parse", "HEAD").strip() == head
        assert run_git(repo, "show", f"{commit}:calc.py") == "changed\n"
        assert run_git(repo, "show", f"{commit}:new.py") == "new\n"
        assert run_git(repo, "rev-parse", f"{commit}^").strip() == head

    def test_no_snapshot_without_changes(self, repo: Path) -> None:
        assert gitops.snapshot_commit(repo, "snapshot") is None

    def test_lost_attempts_come_back_from_their_checkpoints(self, repo: Path) -> None:
        branch = "claudecluster/run-1/docs"
        started = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
        for number, cost in ((1, 0.25), (2, 0.5)):
            (repo / "calc.py").write_text(f"attempt {number}\n")
            message = "\n".join(
                [
                    f"Unfinished work of attempt {number} of docs",
                    "",
                    f"{TASK_TRAILER}: docs",
                    f"{RUN_TRAILER}: run-1",
                    f"{ATTEMPT_TRAILER}: {number}",
                    f"{COST_TRAILER}: {cost:.6f}",
                    f"{TURNS_TRAILER}: 3",
                    f"{STARTED_TRAILER}: {started.isoformat()}",
                ]
            )
            commit = gitops.snapshot_commit(repo, message)
            assert commit is not None
            run_git(repo, "branch", gitops.attempt_branch(branch, number), commit)
        # An attempt archived on this machine carries no trailers: the journal knows it.
        run_git(repo, "branch", gitops.attempt_branch(branch, 3), "HEAD")

        found = lost_attempts(git.Repo(repo), branch)

        assert [(a.number, a.cost_usd, a.turns, a.outcome) for a in found] == [
            (1, 0.25, 3, "interrupted"),
            (2, 0.5, 3, "interrupted"),
        ]
        assert found[0].branch == "claudecluster-attempts/claudecluster/run-1/docs/1"
        assert found[0].started_at == started


class _Answers(http.server.BaseHTTPRequestHandler):
    """A server that answers /api/health with the next status in ``statuses``, then 200."""

    statuses: list[int] = []
    seen: list[int] = []

    def do_GET(self) -> None:
        status = self.statuses.pop(0) if self.statuses else 200
        self.seen.append(status)
        body = b"true" if status == 200 else b"busy"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def answering(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_Answers]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{server.server_address[1]}/api")
    _Answers.statuses, _Answers.seen = [], []
    yield _Answers
    server.shutdown()


class TestExternalServerHealth:
    """A server behind a balancer may say "try again" for a moment (a database restarting)."""

    def test_a_passing_503_or_502_is_waited_out(self, answering: type[_Answers]) -> None:
        answering.statuses = [503, 502, 504]

        info = prefect_server.ensure_server()

        assert answering.seen == [503, 502, 504, 200]
        assert info.api_url == os.environ["PREFECT_API_URL"]

    def test_a_lasting_503_is_one_line_after_the_window(
        self, answering: type[_Answers], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(prefect_server, "_EXTERNAL_RETRY_WINDOW_S", 1.0)
        answering.statuses = [503] * 50

        with pytest.raises(ServerError, match=r"is unhealthy \(HTTP 503") as caught:
            prefect_server.ensure_server()

        assert 2 <= len(answering.seen) <= 4
        assert "\n" not in caught.value.one_line()

    def test_a_500_is_not_retried(self, answering: type[_Answers]) -> None:
        answering.statuses = [500, 500]

        with pytest.raises(ServerError, match=r"is unhealthy \(HTTP 500"):
            prefect_server.ensure_server()

        assert answering.seen == [500]
