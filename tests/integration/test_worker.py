"""The worker against the real Claude Code CLI, real git and a real Prefect server."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from claudecluster.errors import StartRefusedError
from claudecluster.models import (
    FailureReason,
    TaskResult,
    TaskSpec,
    TaskStatus,
    WorkerSettings,
    WorkUnit,
)
from claudecluster.session import MARKER_VAR, SessionHost, SlotFactory
from claudecluster.testing import Script, ScriptedModelServer, api_error, hang, text, tool_use
from claudecluster.testing.model_server import RecordedRequest
from claudecluster.worker import execute_task
from tests.conftest import git, snapshot

pytestmark = pytest.mark.integration

VERIFY = "python -m pytest -q"


def run(
    repo: Path,
    spec: TaskSpec,
    worktree_root: Path,
    settings: WorkerSettings | None = None,
    verify: str | None = VERIFY,
    log: Callable[[str], None] | None = None,
    slot: SlotFactory | None = None,
) -> TaskResult:
    unit = WorkUnit(
        run_id="run-test",
        spec=spec,
        repo=str(repo),
        base_commit="HEAD",
        verify=verify,
        settings=settings or WorkerSettings(),
        worktree_root=str(worktree_root),
    )
    host = None
    if log or slot:
        host = SessionHost(**({"log": log} if log else {}), **({"slot": slot} if slot else {}))
    return asyncio.run(execute_task(unit, host=host))


def edit_two_files(marker: str) -> Script:
    return Script(
        name="edit-two",
        match=marker,
        turns=[
            tool_use("Read", {"file_path": "calc.py"}),
            tool_use(
                "Edit",
                {
                    "file_path": "calc.py",
                    "old_string": "def add(a, b):\n",
                    "new_string": 'def add(a, b):\n    """Add two numbers."""\n',
                },
            ),
            tool_use(
                "Edit",
                {
                    "file_path": "strings.py",
                    "old_string": "def shout(text):\n",
                    "new_string": 'def shout(text):\n    """Upper-case text."""\n',
                },
            ),
            tool_use("Bash", {"command": VERIFY}),
            text("Added docstrings to calc.py and strings.py."),
        ],
    )


class TestSucceeds:
    """A task that edits two files and passes its verify command."""

    def test_edits_commit_and_verify(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        model_server.add_script(edit_two_files(marker))
        lines: list[str] = []
        spec = TaskSpec(id="docstrings", title="Add docstrings", prompt=f"{marker} add docs")

        result = run(repo, spec, worktree_root, log=lines.append)

        assert result.status is TaskStatus.SUCCEEDED, result.error
        assert result.branch == "claudecluster/run-test/docstrings"
        assert sorted(f.path for f in result.files) == ["calc.py", "strings.py"]
        assert result.added == 2 and result.removed == 0
        assert '+    """Add two numbers."""' in result.diff
        assert result.test_report is not None and result.test_report.ok
        assert result.test_report.passed == 2 and result.test_report.failed == 0
        assert result.turns == 5 and result.cost_usd > 0 and result.usage.input_tokens > 0
        assert result.session_id
        # The commit is on the task branch, authored by ClaudeCluster, titled from the task.
        log = git(repo, "log", "-1", "--format=%an|%s|%b", result.branch)
        assert log.startswith("ClaudeCluster|Add docstrings|")
        assert "ClaudeCluster-Task: docstrings" in log
        assert git(repo, "rev-parse", result.branch).strip() == result.head_commit
        # The session's messages were streamed to the log: text, tool calls, results, result.
        joined = "\n".join(lines)
        assert "tool call Edit" in joined and "tool result" in joined
        assert "assistant: Added docstrings" in joined and "result: success" in joined
        # The worktree is gone (its work is committed); the branch stays.
        assert not (worktree_root / "run-test" / "docstrings").exists()


class TestVerifyFails:
    """A task whose verify command fails is 'failed' and keeps its report and branch."""

    def test_failed_verify(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        model_server.add_script(
            Script(
                name="break-add",
                match=marker,
                turns=[
                    tool_use(
                        "Edit",
                        {"file_path": "calc.py", "old_string": "a + b", "new_string": "a * b"},
                    ),
                    text("Changed add."),
                ],
            )
        )
        spec = TaskSpec(id="break", title="Break add", prompt=f"{marker} break it")

        result = run(repo, spec, worktree_root)

        assert result.status is TaskStatus.FAILED
        assert result.failure_reason is FailureReason.VERIFY_FAILED
        assert result.test_report is not None
        assert result.test_report.exit_code == 1
        assert result.test_report.failed == 1 and result.test_report.passed == 1
        assert "assert 2 == 3" in result.test_report.output_tail
        assert result.branch is not None and result.head_commit != result.base_commit


class TestNoChanges:
    """A session that changes nothing leaves no branch behind."""

    def test_no_changes(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        model_server.add_script(
            Script(
                name="look",
                match=marker,
                turns=[tool_use("Read", {"file_path": "calc.py"}), text("Nothing to change.")],
            )
        )
        spec = TaskSpec(id="look", title="Look only", prompt=f"{marker} look")

        result = run(repo, spec, worktree_root)

        assert result.status is TaskStatus.NO_CHANGES
        assert result.branch is None and result.files == [] and result.diff == ""
        assert result.head_commit == result.base_commit
        assert "claudecluster/run-test/look" not in git(repo, "branch", "--list")


class TestLimits:
    """Max turns, budget and timeout each stop the session with their own reason."""

    def test_max_turns(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        model_server.add_script(
            Script(
                name="reads-forever",
                match=marker,
                turns=[tool_use("Read", {"file_path": "calc.py"})] * 10,
            )
        )
        spec = TaskSpec(id="turns", title="Too many turns", prompt=f"{marker} loop")

        result = run(repo, spec, worktree_root, WorkerSettings(max_turns=3))

        assert result.status is TaskStatus.FAILED
        assert result.failure_reason is FailureReason.MAX_TURNS
        assert result.turns == 3 + 1 or result.turns == 3  # the CLI counts the final turn
        assert "turn limit" in (result.error or "")

    def test_budget(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        expensive = {"input_tokens": 200_000, "output_tokens": 50_000}
        model_server.add_script(
            Script(
                name="expensive",
                match=marker,
                turns=[tool_use("Read", {"file_path": "calc.py"}, usage=expensive)] * 5,
            )
        )
        spec = TaskSpec(id="budget", title="Too expensive", prompt=f"{marker} spend")

        result = run(repo, spec, worktree_root, WorkerSettings(max_budget_usd=0.5))

        assert result.status is TaskStatus.FAILED
        assert result.failure_reason is FailureReason.BUDGET
        # Checked after each turn: one turn costs ~$1.35, so it stops after the first.
        assert 0.5 <= result.cost_usd < 3.0
        assert result.turns <= 2

    def test_timeout_kills_everything(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        # The session runs a test that leaves a daemon behind (in a session of its own, so it
        # outlives the CLI and its process group), then hangs.
        seconds = f"{300 + int(marker[-6:], 16) % 1000}"
        leaky_test = (
            "import subprocess\n\n\ndef test_spawn():\n"
            f"    subprocess.Popen(['sleep', '{seconds}'], start_new_session=True)\n"
        )
        model_server.add_script(
            Script(
                name="hangs",
                match=marker,
                turns=[
                    tool_use("Write", {"file_path": "test_leak.py", "content": leaky_test}),
                    tool_use("Bash", {"command": "python -m pytest -q test_leak.py"}),
                    hang(),
                ],
            )
        )
        spec = TaskSpec(id="hang", title="Hangs", prompt=f"{marker} hang")
        settings = WorkerSettings(timeout_s=8)
        started = time.monotonic()
        lines: list[str] = []

        result = run(repo, spec, worktree_root, settings, log=lines.append)

        assert time.monotonic() - started < 30
        # The sleeper really ran and outlived the CLI; the cleanup is what removed it.
        assert any(line.startswith("killed ") for line in lines), lines
        assert result.status is TaskStatus.FAILED
        assert result.failure_reason is FailureReason.TIMEOUT
        assert "timeout" in (result.error or "")
        assert _processes_with(f"sleep\0{seconds}") == []
        assert _processes_with(MARKER_VAR) == []


class TestBootsWhileWaiting:
    """The CLI boots while its session waits for a slot, and asks the model nothing before."""

    def test_no_request_before_the_slot_is_held(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        model_server.add_script(
            Script(name="waits", match=marker, turns=[text("Nothing to change.")])
        )
        seen: dict[str, float] = {}

        @asynccontextmanager
        async def slow_slot() -> AsyncIterator[None]:
            # Held only once this session's CLI is up, and two seconds later.
            seen["cli_up"] = time.time() if await _cli_is_up() else 0.0
            await anyio.sleep(2.0)
            seen["held"] = time.time()
            yield

        started = time.time()

        spec = TaskSpec(id="waits", title="Waits", prompt=f"{marker} wait for it")
        result = run(repo, spec, worktree_root, verify=None, slot=slow_slot)

        assert result.status is TaskStatus.NO_CHANGES, result.error
        assert seen["cli_up"], "no CLI was started before the slot was held"
        assert seen["held"] - seen["cli_up"] >= 2.0
        requests = _model_requests_since(model_server, started)
        assert requests and min(r.started_at for r in requests) >= seen["held"]

    def test_a_refused_slot_stops_the_booted_cli_without_a_request(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        model_server.add_script(
            Script(name="refused", match=marker, turns=[text("Should never run.")])
        )

        @asynccontextmanager
        async def refused_after_boot() -> AsyncIterator[None]:
            assert await _cli_is_up()
            await anyio.sleep(1.0)
            raise StartRefusedError("not started: budget spent", failure_reason="goal_budget")
            yield  # pragma: no cover

        started = time.time()

        spec = TaskSpec(id="refused", title="Refused", prompt=f"{marker} never")
        result = run(repo, spec, worktree_root, verify=None, slot=refused_after_boot)

        assert result.status is TaskStatus.SKIPPED
        assert result.failure_reason is FailureReason.GOAL_BUDGET
        assert _model_requests_since(model_server, started) == []
        assert _processes_with(MARKER_VAR) == []  # the booted CLI is gone


async def _cli_is_up(within_s: float = 30.0) -> bool:
    """Whether a session's CLI process appears within ``within_s``."""
    deadline = time.monotonic() + within_s
    while not _processes_with(MARKER_VAR):
        if time.monotonic() > deadline:
            return False
        await anyio.sleep(0.05)
    return True


def _model_requests_since(server: ScriptedModelServer, started: float) -> list[RecordedRequest]:
    return [r for r in server.requests if r.path == "/v1/messages" and r.started_at >= started]


def _processes_with(needle: str) -> list[int]:
    """Pids of live processes whose command line or environment mentions ``needle``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            data = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle.encode() in data:
            found.append(int(entry.name))
    return found


class TestPermissions:
    """The default policy denies what it does not allow, and records it."""

    def test_denied_tools_are_recorded(
        self,
        repo: Path,
        tmp_path: Path,
        worktree_root: Path,
        model_server: ScriptedModelServer,
        marker: str,
    ) -> None:
        outside = tmp_path / "outside.txt"
        model_server.add_script(
            Script(
                name="overreach",
                match=marker,
                turns=[
                    tool_use("Bash", {"command": "curl http://127.0.0.1:9/exfiltrate"}),
                    tool_use("Write", {"file_path": str(outside), "content": "escaped"}),
                    tool_use("Write", {"file_path": "inside.txt", "content": "fine\n"}),
                    text("Done."),
                ],
            )
        )
        spec = TaskSpec(id="deny", title="Overreach", prompt=f"{marker} try")

        result = run(repo, spec, worktree_root, verify=None)

        denied = {(d.tool_name, str(d.tool_input)) for d in result.permission_denials}
        assert ("Bash", str({"command": "curl http://127.0.0.1:9/exfiltrate"})) in denied
        assert any(name == "Write" and str(outside) in value for name, value in denied)
        assert not outside.exists()
        assert result.status is TaskStatus.SUCCEEDED
        assert [f.path for f in result.files] == ["inside.txt"]


class TestUserCheckout:
    """A dirty working tree is neither read nor changed."""

    def test_dirty_tree_untouched(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        (repo / "calc.py").write_text("USER'S UNCOMMITTED EDIT\n")
        (repo / "scratch.txt").write_text("untracked\n")
        git(repo, "add", "scratch.txt")  # staged, too
        before = snapshot(repo)
        model_server.add_script(edit_two_files(marker))
        spec = TaskSpec(id="dirty", title="Add docstrings", prompt=f"{marker} docs")

        result = run(repo, spec, worktree_root)

        assert result.status is TaskStatus.SUCCEEDED, result.error
        assert snapshot(repo) == before
        # The task started from the commit, not from the dirty file.
        assert "USER'S UNCOMMITTED EDIT" not in result.diff
        assert "scratch.txt" not in [f.path for f in result.files]


class TestFaults:
    """API errors are retried and counted; a hung verify command is killed at its timeout."""

    def test_rate_limit_burst_is_retried_and_counted(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        model_server.add_script(
            Script(
                name="rate-limited",
                match=marker,
                turns=[
                    api_error(429, times=2),
                    tool_use("Write", {"file_path": "note.txt", "content": "ok\n"}),
                    api_error(529, times=1),
                    text("Done."),
                ],
            )
        )
        spec = TaskSpec(id="burst", title="Survives a burst", prompt=f"{marker} write")

        result = run(repo, spec, worktree_root, verify=None)

        assert result.status is TaskStatus.SUCCEEDED, result.error
        assert result.api_retries == 3
        statuses = [
            s.statuses for s in model_server.sessions().values() if s.script == "rate-limited"
        ]
        assert statuses == [(429, 429, 200, 529, 200)]

    def test_hung_verify_is_killed_at_its_timeout(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        model_server.add_script(
            Script(
                name="then-hang",
                match=marker,
                turns=[tool_use("Write", {"file_path": "x.txt", "content": "x\n"}), text("ok")],
            )
        )
        spec = TaskSpec(id="hung", title="Hung verify", prompt=f"{marker} write")
        started = time.monotonic()

        result = run(
            repo,
            spec,
            worktree_root,
            WorkerSettings(verify_timeout_s=2),
            verify=f"sleep 600 # {marker}",
        )

        assert time.monotonic() - started < 60
        assert result.status is TaskStatus.FAILED
        assert result.failure_reason is FailureReason.VERIFY_TIMEOUT
        assert result.test_report is not None
        assert result.test_report.timed_out
        assert result.test_report.exit_code is None
        assert _processes_with(marker) == []
