"""One unattended Claude Code session: the seam every session goes through.

The worker, the planner and the conflict resolver describe the session they want as a
:class:`SessionRequest` and run it through a :class:`SessionHost`: the host holds what a
session holds while it runs (a session slot, a place among the run's sessions), adds the
credentials, and hands the request to its :class:`SessionRunner`. Tests replace the runner
with a fake one; everything else runs the real CLI through :func:`run_session`.

:func:`run_session` starts the bundled Claude Code CLI with the SDK's ``query()``, streams
every message it produces to a logger as it happens, and returns a :class:`SessionOutcome`.
It guarantees three things the CLI alone does not:

- isolation: each session gets its own ``CLAUDE_CONFIG_DIR`` (sessions sharing one corrupt
  each other's ``~/.claude.json``) and loads no settings files unless asked to;
- limits: it stops at max turns, at the budget, or at the wall-clock timeout, and reports each
  as its own :class:`~claudecluster.models.FailureReason`;
- cleanup: afterwards no process the session started is left running. Every process the CLI
  spawns inherits a marker variable, and anything still carrying it is killed, even children
  that moved to their own process group or session.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from pydantic import BaseModel, Field

from claudecluster.models import DeniedTool, FailureReason, TokenUsage, WorkerSettings
from claudecluster.permissions import ToolPermissions
from claudecluster.redact import redact, redact_obj

if TYPE_CHECKING:
    from claude_agent_sdk import ResultMessage

MARKER_VAR = "CLAUDECLUSTER_SESSION_MARKER"
_LOG_SNIPPET = 400

Logger = Callable[[str], None]


class CostSink(Protocol):
    """Told what a session cost as soon as it ends (a run's budget counts it at once)."""

    def spend(self, usd: float) -> None: ...


SlotFactory = Callable[[], AbstractAsyncContextManager[CostSink | None]]
"""What a session holds while it runs; what it yields (if anything) is told the cost."""


@asynccontextmanager
async def no_slot() -> AsyncIterator[None]:
    """A session slot that limits nothing (for use outside Prefect)."""
    yield


@dataclass(frozen=True)
class SessionRequest:
    """One session to run: what to ask, where, with which tools, and what stops it."""

    prompt: str
    cwd: Path
    settings: WorkerSettings
    permissions: ToolPermissions
    system_prompt_append: str | None = None
    output_format: dict[str, Any] | None = None
    env: Mapping[str, str] = field(default_factory=dict, repr=False)


class SessionRunner(Protocol):
    """Runs one session to its end; a session that ran and failed is an outcome, not an error."""

    async def __call__(self, request: SessionRequest, log: Logger) -> SessionOutcome: ...


def _log_to_module_logger(line: str) -> None:
    logging.getLogger("claudecluster.session").info(line)


class SessionOutcome(BaseModel):
    """What one Claude Code session did and why it ended."""

    session_id: str | None = Field(default=None, description="Claude Code session id.")
    ok: bool = Field(description="True when the session finished its work without error.")
    subtype: str | None = Field(default=None, description="The CLI's result subtype.")
    failure_reason: FailureReason | None = Field(
        default=None, description="Why the session stopped early, when it did."
    )
    error: str | None = Field(default=None, description="A readable account of the failure.")
    turns: int = Field(default=0, description="Conversation turns taken.")
    cost_usd: float = Field(default=0.0, description="Cost reported by Claude Code.")
    usage: TokenUsage = Field(default_factory=TokenUsage, description="Tokens used.")
    duration_s: float = Field(default=0.0, description="Wall-clock time of the session.")
    result_text: str | None = Field(default=None, description="The session's final text.")
    structured_output: Any = Field(
        default=None, description="Output validated against the requested JSON schema, if any."
    )
    permission_denials: list[DeniedTool] = Field(
        default_factory=list, description="Tool calls the permission policy refused."
    )
    api_error_status: int | None = Field(
        default=None, description="HTTP status of a failing API call that ended the session."
    )
    api_retries: int = Field(
        default=0, description="API calls Claude Code retried (429 rate limits, 529 overloads)."
    )
    model_fallbacks: int = Field(
        default=0, description="Times Claude Code switched to the fallback model."
    )


_SUBTYPE_REASONS = {
    "error_max_turns": FailureReason.MAX_TURNS,
    "error_max_budget_usd": FailureReason.BUDGET,
}


def _snippet(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = redact(text).replace("\n", "\\n")
    return text if len(text) <= _LOG_SNIPPET else text[:_LOG_SNIPPET] + "..."


def preload_sdk() -> None:
    """Start importing claude-agent-sdk on a thread, so the first session need not wait.

    The SDK and the MCP package it loads take about half a second to import; a run that
    starts this early overlaps it with its own start-up, which mostly waits on the server.
    """
    if "claude_agent_sdk" not in sys.modules:
        threading.Thread(
            target=importlib.import_module, args=("claude_agent_sdk",), daemon=True
        ).start()


def describe_message(message: object) -> list[str]:
    """Log lines for one SDK message: text, tool calls, tool results, the final result."""
    from claude_agent_sdk import (
        AssistantMessage,
        ResultMessage,
        SystemMessage,
        TextBlock,
        ThinkingBlock,
        ToolResultBlock,
        ToolUseBlock,
        UserMessage,
    )

    lines: list[str] = []
    if isinstance(message, AssistantMessage):
        for block in message.content:
            if isinstance(block, TextBlock) and block.text.strip():
                lines.append(f"assistant: {_snippet(block.text)}")
            elif isinstance(block, ToolUseBlock):
                lines.append(f"tool call {block.name}: {_snippet(block.input)}")
            elif isinstance(block, ThinkingBlock):
                lines.append(f"thinking: {_snippet(block.thinking)}")
    elif isinstance(message, UserMessage) and isinstance(message.content, list):
        for block in message.content:
            if isinstance(block, ToolResultBlock):
                label = "tool error" if block.is_error else "tool result"
                lines.append(f"{label}: {_snippet(block.content)}")
    elif isinstance(message, SystemMessage) and message.subtype == "api_retry":
        data = message.data
        lines.append(
            f"api retry {data.get('attempt')}/{data.get('max_retries')} after HTTP "
            f"{data.get('error_status')}, waiting {data.get('retry_delay_ms')} ms"
        )
    elif isinstance(message, SystemMessage) and message.subtype == "model_fallback":
        lines.append(f"switched to the fallback model: {_snippet(message.data)}")
    elif isinstance(message, SystemMessage) and message.subtype == "init":
        data = message.data
        lines.append(
            f"session {data.get('session_id')} started: model={data.get('model')} "
            f"permission_mode={data.get('permissionMode')} tools={data.get('tools')}"
        )
    elif isinstance(message, ResultMessage):
        lines.append(
            f"result: {message.subtype} after {message.num_turns} turns, "
            f"cost ${message.total_cost_usd or 0:.4f}"
            + (f": {_snippet(message.result)}" if message.result else "")
        )
    return lines


def session_env(config_dir: Path, marker: str, extra: dict[str, str] | None) -> dict[str, str]:
    """Variables added to the inherited environment of one CLI process."""
    env = {
        "CLAUDE_CONFIG_DIR": str(config_dir),
        MARKER_VAR: marker,
        # No auto-updater, telemetry or feedback surveys in unattended sessions.
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": os.environ.get(
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"
        ),
    }
    env.update(extra or {})
    return env


def _outcome_from_result(message: ResultMessage) -> SessionOutcome:
    usage = message.usage or {}
    denials = [
        DeniedTool(
            tool_name=str(d.get("tool_name", "?")),
            tool_input=dict(redact_obj(d.get("tool_input") or {})),  # type: ignore[call-overload]
        )
        for d in (message.permission_denials or [])
        if isinstance(d, dict)
    ]
    reason = _SUBTYPE_REASONS.get(message.subtype)
    api_status = getattr(message, "api_error_status", None)
    if message.is_error and reason is None:
        reason = FailureReason.API_ERROR if api_status else FailureReason.SESSION_ERROR
    error = None
    if reason is FailureReason.MAX_TURNS:
        error = f"stopped at the turn limit after {message.num_turns} turns"
    elif reason is FailureReason.BUDGET:
        error = f"stopped at the budget after spending ${message.total_cost_usd or 0:.4f}"
    elif reason is not None:
        error = redact(message.result or f"session ended with {message.subtype}")
    return SessionOutcome(
        session_id=message.session_id,
        ok=not message.is_error,
        subtype=message.subtype,
        failure_reason=reason,
        error=error,
        turns=message.num_turns,
        cost_usd=float(message.total_cost_usd or 0.0),
        usage=TokenUsage(
            input_tokens=int(usage.get("input_tokens") or 0),
            output_tokens=int(usage.get("output_tokens") or 0),
            cache_creation_input_tokens=int(usage.get("cache_creation_input_tokens") or 0),
            cache_read_input_tokens=int(usage.get("cache_read_input_tokens") or 0),
        ),
        result_text=redact(message.result) if message.result else None,
        structured_output=message.structured_output,
        permission_denials=denials,
        api_error_status=api_status if isinstance(api_status, int) else None,
    )


async def run_session(
    request: SessionRequest, log: Logger = _log_to_module_logger
) -> SessionOutcome:
    """Run one Claude Code session in ``request.cwd`` and report how it went.

    The real :class:`SessionRunner`. Never raises for a session that ran and failed:
    limits, API errors and crashes all come back as an outcome with ``ok=False`` and a
    failure reason.
    """
    from claude_agent_sdk import (
        AssistantMessage,
        ClaudeAgentOptions,
        ClaudeSDKError,
        ResultError,
        ResultMessage,
        SystemMessage,
        query,
    )

    emit = log
    settings, permissions = request.settings, request.permissions
    output_format = request.output_format
    marker = uuid.uuid4().hex
    started = time.monotonic()
    outcome: SessionOutcome | None = None
    assistant_turns = 0
    retries = fallbacks = 0
    with tempfile.TemporaryDirectory(prefix="claudecluster-config-") as config_dir:
        options = ClaudeAgentOptions(
            cwd=str(request.cwd),
            tools=permissions.tools,
            allowed_tools=permissions.allowed,
            disallowed_tools=[*permissions.disallowed],
            permission_mode=permissions.mode,
            max_turns=settings.max_turns,
            max_budget_usd=settings.max_budget_usd,
            model=settings.model,
            fallback_model=settings.fallback_model,
            setting_sources=list(settings.setting_sources),
            system_prompt=(
                {"type": "preset", "preset": "claude_code", "append": request.system_prompt_append}
                if request.system_prompt_append
                else {"type": "preset", "preset": "claude_code"}
            ),
            output_format=output_format,
            env=session_env(Path(config_dir), marker, dict(request.env)),
            stderr=lambda line: emit(f"cli stderr: {_snippet(line)}"),
        )
        try:
            with anyio.fail_after(settings.timeout_s):
                async for message in query(prompt=request.prompt, options=options):
                    for line in describe_message(message):
                        emit(line)
                    if isinstance(message, AssistantMessage):
                        assistant_turns += 1
                    elif isinstance(message, SystemMessage):
                        retries += message.subtype == "api_retry"
                        fallbacks += message.subtype == "model_fallback"
                    elif isinstance(message, ResultMessage):
                        outcome = _outcome_from_result(message)
        except TimeoutError:
            outcome = SessionOutcome(
                ok=False,
                failure_reason=FailureReason.TIMEOUT,
                error=f"stopped at the {settings.timeout_s:g} s wall-clock timeout",
                turns=assistant_turns,
                session_id=outcome.session_id if outcome else None,
            )
        except ResultError as exc:
            if outcome is None:
                outcome = SessionOutcome(
                    ok=False,
                    subtype=exc.subtype,
                    failure_reason=_SUBTYPE_REASONS.get(exc.subtype or "")
                    or FailureReason.SESSION_ERROR,
                    error=redact(exc.result or "; ".join(exc.errors) or str(exc)),
                    session_id=exc.session_id,
                    api_error_status=exc.api_error_status,
                )
        except ClaudeSDKError as exc:
            outcome = SessionOutcome(
                ok=False,
                failure_reason=FailureReason.SESSION_ERROR,
                error=redact(f"Claude Code failed: {str(exc).strip()[:2000]}"),
                turns=assistant_turns,
            )
        finally:
            killed = kill_marked_processes(marker)
            if killed:
                emit(f"killed {killed} process(es) the session left running")
    if outcome is None:
        outcome = SessionOutcome(
            ok=False,
            failure_reason=FailureReason.SESSION_ERROR,
            error="Claude Code exited without a result",
            turns=assistant_turns,
        )
    if outcome.ok and output_format is not None and outcome.structured_output is None:
        outcome.ok = False
        outcome.failure_reason = FailureReason.SESSION_ERROR
        outcome.error = "the session ended without returning the requested structured output"
    outcome.duration_s = round(time.monotonic() - started, 3)
    outcome.api_retries = retries
    outcome.model_fallbacks = fallbacks
    return outcome


def marked_pids(marker: str) -> list[int]:
    """Pids of live processes whose environment carries ``marker``."""
    needle = f"{MARKER_VAR}={marker}".encode()
    pids: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return pids
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def kill_marked_processes(marker: str) -> int:
    """SIGKILL every process carrying ``marker``; returns how many were killed."""
    killed = 0
    for _ in range(3):  # a dying parent may fork once more; a few passes catch stragglers
        pids = [pid for pid in marked_pids(marker) if pid != os.getpid()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)
    return killed


@dataclass(frozen=True)
class SessionHost:
    """How this process runs a session: with which runner, holding what, with which
    credentials, logging where.

    ``slot`` is held around the session (the cluster-wide session limit, or a place among
    a local run's sessions) and told its cost before it is let go; ``env`` (credentials,
    endpoint) is added to every request's environment and never logged.
    """

    runner: SessionRunner | None = None  # None: the real Claude Code CLI (run_session)
    slot: SlotFactory = no_slot
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    log: Logger = _log_to_module_logger

    def with_log(self, log: Logger) -> SessionHost:
        """This host, logging to ``log``."""
        return dataclasses.replace(self, log=log)

    async def run(self, request: SessionRequest) -> SessionOutcome:
        """Run ``request`` holding the slot; the slot hears the cost before it is freed.

        Errors taking the slot (the run stopped starting sessions, a missing limit) are
        raised before any session starts.
        """
        if self.env:
            request = dataclasses.replace(request, env={**self.env, **request.env})
        async with self.slot() as place:
            outcome = await (self.runner or run_session)(request, self.log)
            if place is not None:
                place.spend(outcome.cost_usd)
        return outcome
