"""The scripted model server driven by the real Claude Code CLI through claude_agent_sdk.query."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import anyio
import pytest
from claude_agent_sdk import (
    ClaudeAgentOptions,
    ResultMessage,
    SystemMessage,
    query,
)

from claudecluster.testing import (
    RequestView,
    Script,
    ScriptedModelServer,
    Turn,
    api_error,
    hang,
    structured,
    text,
    tool_use,
    tool_uses,
)

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

MODEL = "claude-sonnet-4-5"
FALLBACK = "claude-haiku-4-5"
TOOLS = ["Read", "Write", "Edit", "Bash"]


@pytest.fixture
def server() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer() as running:
        yield running


class Session:
    """What one query() call produced."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.error: Exception | None = None

    @property
    def result(self) -> ResultMessage:
        results = [m for m in self.messages if isinstance(m, ResultMessage)]
        assert results, f"no ResultMessage (error: {self.error!r})"
        return results[-1]

    @property
    def retries(self) -> list[dict[str, Any]]:
        return [
            m.data
            for m in self.messages
            if isinstance(m, SystemMessage) and m.subtype == "api_retry"
        ]


async def run_session(
    server: ScriptedModelServer,
    prompt: str,
    workdir: Path,
    *,
    max_retries: int | None = None,
    **options: Any,
) -> Session:
    """Run one CLI session in ``workdir`` against ``server``; never raises on error results."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_dir = workdir.parent / f".{workdir.name}-claude-config"
    config_dir.mkdir(exist_ok=True)
    settings: dict[str, Any] = {
        "env": server.env(config_dir=config_dir, max_retries=max_retries),
        "cwd": workdir,
        "setting_sources": [],
        "model": MODEL,
        "max_turns": 10,
        "permission_mode": "dontAsk",
        "allowed_tools": TOOLS,
    }
    settings.update(options)
    session = Session()
    try:
        async for message in query(prompt=prompt, options=ClaudeAgentOptions(**settings)):
            session.messages.append(message)
    except Exception as exc:  # the SDK raises after an error result; tests look at both
        session.error = exc
    return session


class TestToolSession:
    """A scripted session really writes, edits and runs things through the CLI's tools."""

    async def test_write_edit_bash(self, server: ScriptedModelServer, tmp_path: Path) -> None:
        work = tmp_path / "repo"
        work.mkdir()
        (work / "b.py").write_text("y = 1\n")
        server.add_script(
            Script(
                name="edit-two",
                match="EDIT-TWO-MARKER",
                turns=[
                    tool_use("Write", {"file_path": str(work / "a.py"), "content": "x = 1\n"}),
                    tool_use("Read", {"file_path": str(work / "b.py")}),
                    tool_use(
                        "Edit",
                        {"file_path": str(work / "b.py"), "old_string": "1", "new_string": "2"},
                    ),
                    tool_use("Bash", {"command": "echo ran > ran.txt"}),
                    text("Done."),
                ],
            )
        )

        session = await run_session(server, "EDIT-TWO-MARKER: edit two files", work)

        assert session.error is None
        assert (work / "a.py").read_text() == "x = 1\n"
        assert (work / "b.py").read_text() == "y = 2\n"
        assert (work / "ran.txt").read_text() == "ran\n"
        result = session.result
        assert result.subtype == "success"
        assert not result.is_error
        assert result.result == "Done."
        assert result.num_turns == 5
        assert result.total_cost_usd is not None
        assert result.total_cost_usd > 0
        (summary,) = server.sessions().values()
        assert summary.script == "edit-two"
        assert summary.turns_served == 5
        assert summary.statuses == (200,) * 5
        assert [r.turn_index for r in server.requests] == [0, 1, 2, 3, 4]
        # Every tool result came back without error, in the request after the call.
        for record in server.requests[1:]:
            assert [res.is_error for res in record.view.tool_results()] == [False]

    async def test_several_calls_in_one_turn(
        self, server: ScriptedModelServer, tmp_path: Path
    ) -> None:
        work = tmp_path / "repo"
        server.add_script(
            Script(
                name="two-writes",
                match="TWO-WRITES-MARKER",
                turns=[
                    tool_uses(
                        [
                            ("Write", {"file_path": str(work / "one.txt"), "content": "1"}),
                            ("Write", {"file_path": str(work / "two.txt"), "content": "2"}),
                        ],
                        preamble="Writing both files.",
                    ),
                    text("Both written."),
                ],
            )
        )

        session = await run_session(server, "TWO-WRITES-MARKER", work)

        assert session.result.result == "Both written."
        assert (work / "one.txt").read_text() == "1"
        assert (work / "two.txt").read_text() == "2"
        # The CLI sends a text-plus-two-calls reply back as one assistant message.
        last = server.requests[-1]
        assert last.turn_index == 1
        assert len(last.view.tool_results()) == 2

    async def test_reply_computed_from_tool_result(
        self, server: ScriptedModelServer, tmp_path: Path
    ) -> None:
        def echo_output(view: RequestView) -> Turn:
            (result,) = view.tool_results()
            return text(f"bash said {result.content.strip()} to {view.model}")

        server.add_script(
            Script(
                name="echo",
                match="ECHO-MARKER",
                turns=[tool_use("Bash", {"command": "echo hello-from-bash"}), echo_output],
            )
        )

        session = await run_session(server, "ECHO-MARKER", tmp_path / "repo")

        assert session.result.result == f"bash said hello-from-bash to {MODEL}"

    async def test_unmatched_prompt_gets_default_reply(
        self, server: ScriptedModelServer, tmp_path: Path
    ) -> None:
        server.add_script(Script(name="other", match="SOMETHING-ELSE", turns=[text("no")]))

        session = await run_session(server, "a prompt no script knows", tmp_path / "repo")

        assert session.result.result == "Nothing to do."
        (record,) = server.requests
        assert record.script is None
        assert not record.matched
        assert record.headers["x-api-key"] == "[redacted]"
        assert record.view.prompt == "a prompt no script knows"

    async def test_usage_override_blows_the_budget(
        self, server: ScriptedModelServer, tmp_path: Path
    ) -> None:
        server.add_script(
            Script(
                name="expensive",
                match="EXPENSIVE-MARKER",
                turns=[
                    tool_use("Bash", {"command": "true"}, usage={"output_tokens": 500_000}),
                    text("never reached"),
                ],
            )
        )

        session = await run_session(
            server, "EXPENSIVE-MARKER", tmp_path / "repo", max_budget_usd=1.0
        )

        # 500k output tokens at Sonnet's $15/M list price.
        assert session.result.subtype == "error_max_budget_usd"
        assert session.result.total_cost_usd is not None
        assert session.result.total_cost_usd >= 7.5


class TestStructuredOutput:
    """structured() feeds ResultMessage.structured_output through the StructuredOutput tool."""

    async def test_structured_output(self, server: ScriptedModelServer, tmp_path: Path) -> None:
        schema = {
            "type": "object",
            "properties": {"files": {"type": "array", "items": {"type": "string"}}},
            "required": ["files"],
        }
        server.add_script(
            Script(
                name="plan",
                match="PLAN-MARKER",
                turns=[structured({"files": ["a.py", "b.py"]})],
            )
        )

        session = await run_session(
            server,
            "PLAN-MARKER",
            tmp_path / "repo",
            output_format={"type": "json_schema", "schema": schema},
        )

        assert session.error is None
        assert session.result.structured_output == {"files": ["a.py", "b.py"]}
        first = server.requests[0]
        assert "StructuredOutput" in first.view.tool_names


class TestApiErrors:
    """Scripted 429s and 529s exercise the CLI's own retry loop and fallback model."""

    async def test_429_twice_then_success(
        self, server: ScriptedModelServer, tmp_path: Path
    ) -> None:
        work = tmp_path / "repo"
        server.add_script(
            Script(
                name="limited",
                match="LIMITED-MARKER",
                turns=[
                    api_error(429, times=2),
                    tool_use("Write", {"file_path": str(work / "ok.txt"), "content": "ok"}),
                    text("Done."),
                ],
            )
        )

        started = time.monotonic()
        session = await run_session(server, "LIMITED-MARKER", work, max_retries=3)
        elapsed = time.monotonic() - started

        assert session.error is None
        assert session.result.subtype == "success"
        assert (work / "ok.txt").read_text() == "ok"
        assert [r.status for r in server.requests] == [429, 429, 200, 200]
        assert [r.turn_index for r in server.requests] == [0, 0, 0, 1]
        assert [(r["attempt"], r["error_status"]) for r in session.retries] == [(1, 429), (2, 429)]
        # The CLI backs off ~0.5 s then ~1 s (plus jitter) when retry-after is 0.
        gaps = [b.started_at - (a.ended_at or 0) for a, b in pairwise(server.requests)]
        assert 0.4 < gaps[0] < 1.0
        assert 0.9 < gaps[1] < 1.6
        assert elapsed < 10

    async def test_retries_run_out(self, server: ScriptedModelServer, tmp_path: Path) -> None:
        server.add_script(
            Script(name="down", match="DOWN-MARKER", turns=[api_error(429, times=5), text("x")])
        )

        session = await run_session(server, "DOWN-MARKER", tmp_path / "repo", max_retries=1)

        assert session.result.is_error
        assert session.result.api_error_status == 429
        assert session.error is not None  # query() raises after an error result
        assert [r.status for r in server.requests] == [429, 429]

    async def test_529_switches_to_fallback_model(
        self, server: ScriptedModelServer, tmp_path: Path
    ) -> None:
        work = tmp_path / "repo"
        server.add_script(
            Script(
                name="overloaded",
                match="OVERLOADED-MARKER",
                turns=[
                    api_error(529, times=3),
                    tool_use("Write", {"file_path": str(work / "f.txt"), "content": "f"}),
                    text("Done."),
                ],
            )
        )

        session = await run_session(
            server, "OVERLOADED-MARKER", work, max_retries=5, fallback_model=FALLBACK
        )

        assert session.error is None
        assert (work / "f.txt").read_text() == "f"
        (summary,) = server.sessions().values()
        assert summary.statuses == (529, 529, 529, 200, 200)
        # Three 529s on the primary model, then the fallback for the rest of the session.
        assert summary.models == (MODEL, MODEL, MODEL, FALLBACK, FALLBACK)


class TestParallelSessions:
    """Concurrent sessions each get their own script."""

    async def test_eight_sessions_at_once(
        self, server: ScriptedModelServer, tmp_path: Path
    ) -> None:
        count = 8
        for i in range(count):
            server.add_script(
                Script(
                    name=f"worker-{i}",
                    match=re.compile(rf"\bWORKER-{i}\b"),
                    turns=[
                        tool_use(
                            "Write",
                            {"file_path": str(tmp_path / f"w{i}" / "out.txt"), "content": f"{i}"},
                        ),
                        tool_use("Bash", {"command": f"echo {i} > bash.txt"}),
                        text(f"worker {i} done"),
                    ],
                )
            )
        sessions: dict[int, Session] = {}

        async def one(i: int) -> None:
            sessions[i] = await run_session(server, f"WORKER-{i} go", tmp_path / f"w{i}")

        started = time.monotonic()
        async with anyio.create_task_group() as group:
            for i in range(count):
                group.start_soon(one, i)
        elapsed = time.monotonic() - started

        for i in range(count):
            assert sessions[i].result.result == f"worker {i} done"
            assert (tmp_path / f"w{i}" / "out.txt").read_text() == f"{i}"
            assert (tmp_path / f"w{i}" / "bash.txt").read_text() == f"{i}\n"
        summaries = server.sessions()
        assert sorted(s.script or "" for s in summaries.values()) == [
            f"worker-{i}" for i in range(count)
        ]
        assert all(s.turns_served == 3 for s in summaries.values())
        # They overlapped: the sessions' spans intersect rather than run one after another.
        assert max(s.first_started_at for s in summaries.values()) < min(
            s.last_ended_at or 0 for s in summaries.values()
        )
        assert elapsed < 60


class TestHttpSurface:
    """Plain HTTP: non-streaming replies, count_tokens, health and unknown paths."""

    def _post(self, server: ScriptedModelServer, path: str, body: Any) -> tuple[int, Any]:
        request = urllib.request.Request(
            server.base_url + path,
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json", "x-api-key": "secret"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def test_non_streaming_reply(self, server: ScriptedModelServer) -> None:
        server.add_script(
            Script(name="plain", match="PLAIN", turns=[tool_use("Bash", {"command": "ls"})])
        )
        body = {
            "model": MODEL,
            "max_tokens": 100,
            "stream": False,
            "messages": [{"role": "user", "content": "PLAIN please"}],
        }

        status, message = self._post(server, "/v1/messages", body)

        assert status == 200
        assert message["type"] == "message"
        assert message["stop_reason"] == "tool_use"
        assert message["content"][0]["name"] == "Bash"
        assert message["content"][0]["input"] == {"command": "ls"}
        assert message["usage"]["input_tokens"] >= 1
        (record,) = server.requests
        assert (record.script, record.streamed, record.status) == ("plain", False, 200)
        assert record.headers["x-api-key"] == "[redacted]"

    def test_count_tokens_health_and_404(self, server: ScriptedModelServer) -> None:
        status, counted = self._post(server, "/v1/messages/count_tokens", {"messages": []})
        assert status == 200
        assert counted["input_tokens"] >= 1

        with urllib.request.urlopen(server.base_url + "/", timeout=5) as response:
            assert response.status == 200
        head = urllib.request.Request(server.base_url + "/", method="HEAD")
        with urllib.request.urlopen(head, timeout=5) as response:
            assert response.status == 200

        status, error = self._post(server, "/v1/complete", {})
        assert status == 404
        assert error["type"] == "error"
        assert error["error"]["type"] == "not_found_error"


class TestHang:
    """A hung reply lets the caller time out, and stopping the server is still prompt."""

    @pytest.mark.slow
    async def test_cli_session_times_out(self, tmp_path: Path) -> None:
        server = ScriptedModelServer([Script(name="stuck", match="STUCK", turns=[hang()])])
        server.start()
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError), anyio.fail_after(2):
                await run_session(server, "STUCK", tmp_path / "repo")
            # fail_after fires at 2 s; the SDK then gives the CLI 5 s before SIGTERM.
            assert time.monotonic() - started < 2 + 5 + 3
            (record,) = server.requests
            assert (record.script, record.status, record.ended_at) == ("stuck", None, None)
        finally:
            stopping = time.monotonic()
            server.stop()
            assert time.monotonic() - stopping < 1.0
        (record,) = server.requests
        assert record.ended_at is not None
        assert record.status is None
        assert record.error == "server stopped before the reply"

    def test_stop_drops_a_held_request(self) -> None:
        server = ScriptedModelServer([Script(name="stuck", match="STUCK", turns=[hang()])])
        server.start()
        outcome: list[BaseException] = []

        def call() -> None:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "STUCK"}]}
            request = urllib.request.Request(
                server.base_url + "/v1/messages", data=json.dumps(body).encode()
            )
            try:
                urllib.request.urlopen(request, timeout=30).read()
            except Exception as exc:
                outcome.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        assert server.wait_for_requests(1)
        stopping = time.monotonic()
        server.stop()
        assert time.monotonic() - stopping < 1.0
        caller.join(timeout=5)
        assert not caller.is_alive()
        assert len(outcome) == 1  # the client saw the connection close without an answer
        assert server.requests[0].status is None

    def test_finite_hang_is_a_slow_reply(self) -> None:
        with ScriptedModelServer(
            [Script(name="slow", match="SLOW", turns=[hang(0.3, then=text("late"))])]
        ) as server:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "SLOW"}]}
            request = urllib.request.Request(
                server.base_url + "/v1/messages", data=json.dumps(body).encode()
            )
            started = time.monotonic()
            with urllib.request.urlopen(request, timeout=5) as response:
                message = json.loads(response.read())
            assert time.monotonic() - started >= 0.3
            assert message["content"] == [{"type": "text", "text": "late"}]


class TestStandaloneServer:
    """``python -m claudecluster.testing.model_server`` serves JSON scripts as its own process."""

    def test_serves_scripts_until_terminated(self, tmp_path: Path) -> None:
        scripts = tmp_path / "scripts.json"
        scripts.write_text(
            json.dumps([{"name": "demo", "match": "DEMO", "turns": [{"text": "from json"}]}])
        )
        root = Path(__file__).resolve().parents[2]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        }
        command = [sys.executable, "-m", "claudecluster.testing.model_server"]
        process = subprocess.Popen(
            [*command, "--port", "0", "--script", str(scripts)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert process.stdout is not None
            banner = process.stdout.readline()
            match = re.search(r"(http://127\.0\.0\.1:\d+)", banner)
            assert match, banner
            body = {"model": MODEL, "messages": [{"role": "user", "content": "DEMO"}]}
            request = urllib.request.Request(
                match.group(1) + "/v1/messages", data=json.dumps(body).encode()
            )
            with urllib.request.urlopen(request, timeout=5) as response:
                message = json.loads(response.read())
            assert message["content"] == [{"type": "text", "text": "from json"}]
        finally:
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=10)
        assert process.returncode == 0
        assert "stopped after 1 requests" in stderr
        assert "Warning" not in stderr
