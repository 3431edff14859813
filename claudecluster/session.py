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
  that moved to their own process group or session; and if the process running sessions
  dies, its reaper kills them all (:mod:`claudecluster.reaper`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import anyio
from pydantic import BaseModel, Field

from claudecluster import telemetry
from claudecluster.forges import TOKEN_VARS as FORGE_TOKEN_VARS
from claudecluster.models import DeniedTool, FailureReason, TokenUsage, WorkerSettings
from claudecluster.permissions import ToolPermissions
from claudecluster.pricing import CostMeter
from claudecluster.reaper import OWNER_VAR, SESSION_VAR, kill_marked, owner_token
from claudecluster.redact import redact, redact_obj

if TYPE_CHECKING:
    from claude_agent_sdk import ResultMessage

MARKER_VAR = SESSION_VAR
_LOG_SNIPPET = 2000  # characters of a message, tool input or tool result in the run's log

Logger = Callable[[str], None]


Stop = tuple[FailureReason, str]
"""Why a running session must stop now: the failure reason and a sentence for the result."""


class SessionWatch(Protocol):
    """Follows one running session: hears its spend after every turn, and its final cost."""

    def turn(self, cost_usd: float) -> Stop | None:
        """The session's spend so far, after a turn; a Stop ends the session now."""
        ...

    def spend(self, usd: float) -> None:
        """What the session cost in the end (told before its slot is freed)."""
        ...


SlotFactory = Callable[[], AbstractAsyncContextManager[SessionWatch | None]]
"""What a session holds while it runs; what it yields (if anything) watches the session."""


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
    # What the session is, for telemetry: run id, task id, task kind (resource attributes of
    # Claude Code's own spans, metrics and events).
    attributes: Mapping[str, str] = field(default_factory=dict)


Ready = Callable[[], Awaitable[None]]
"""Awaited by a runner once its session could start, before it sends the prompt: returns when
the session may start, raises when it must not (the runner then stops and raises it too)."""


async def start_now() -> None:
    """A :data:`Ready` that never waits."""


class SessionRunner(Protocol):
    """Runs one session to its end; a session that ran and failed is an outcome, not an error.

    ``watch`` hears the session's spend after every turn and may stop it there. ``ready`` is
    awaited before the first model request: the CLI boots while its session waits for a
    place, so a place that frees up is used at once.
    """

    async def __call__(
        self,
        request: SessionRequest,
        log: Logger,
        watch: SessionWatch | None = None,
        *,
        ready: Ready = start_now,
    ) -> SessionOutcome: ...


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
    """``value`` for the log: text keeps its lines, long text is cut with a marker."""
    if isinstance(value, list) and all(isinstance(v, dict) and "text" in v for v in value):
        value = "\n".join(str(v["text"]) for v in value)  # a tool result's text blocks
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict | list):
        text = json.dumps(value, ensure_ascii=False, default=str)
    else:
        text = repr(value)
    text = redact(text)
    if len(text) <= _LOG_SNIPPET:
        return text
    return text[:_LOG_SNIPPET] + f"\n[... {len(text) - _LOG_SNIPPET} more characters cut]"


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
        # Its owner's reaper kills everything carrying this if the owner dies (reaper.py).
        OWNER_VAR: owner_token(),
        # No auto-updater, telemetry or feedback surveys in unattended sessions.
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": os.environ.get(
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"
        ),
    }
    # A forge token in the driver's environment is for pushes and the forge's API, never
    # for a session: the CLI inherits the environment, so hide them from it.
    env.update(dict.fromkeys(FORGE_TOKEN_VARS, ""))
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
    request: SessionRequest,
    log: Logger = _log_to_module_logger,
    watch: SessionWatch | None = None,
    *,
    ready: Ready = start_now,
) -> SessionOutcome:
    """Run one Claude Code session in ``request.cwd`` and report how it went.

    The real :class:`SessionRunner`. Never raises for a session that ran and failed:
    limits, API errors and crashes all come back as an outcome with ``ok=False`` and a
    failure reason. A session that dies or is stopped reports what its usage so far cost.

    The CLI is started and initialized first; the prompt is sent once ``ready`` returns, and
    the wall-clock timeout and the session's duration count from then. If ``ready`` raises,
    the CLI is closed before it asked the model anything and the error is raised here.
    """
    from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKError, ResultError, query

    settings, permissions = request.settings, request.permissions
    marker = uuid.uuid4().hex
    started = time.monotonic()
    state = _SessionState(log, watch, marker)
    timeout = anyio.CancelScope()  # given its deadline when the prompt is sent
    refused: list[Exception] = []

    async def prompt() -> AsyncIterator[dict[str, Any]]:
        nonlocal started
        try:
            await ready()
        except Exception as exc:  # yielding nothing makes the SDK close the CLI's input
            refused.append(exc)
            return
        started = time.monotonic()
        timeout.deadline = anyio.current_time() + settings.timeout_s
        yield {
            "type": "user",
            "session_id": "",
            "message": {"role": "user", "content": request.prompt},
            "parent_tool_use_id": None,
        }

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
            output_format=request.output_format,
            env=session_env(
                Path(config_dir),
                marker,
                {**telemetry.session_env(request.attributes), **request.env},
            ),
            stderr=lambda line: log(f"cli stderr: {_snippet(line)}"),
        )
        try:
            with timeout:
                stream = cast(AsyncGenerator[object, None], query(prompt=prompt(), options=options))
                async with aclosing(stream) as messages:
                    async for message in messages:
                        if state.handle(message):
                            break  # stopped: the CLI is already killed
            if timeout.cancelled_caught:
                state.end(
                    FailureReason.TIMEOUT,
                    f"stopped at the {settings.timeout_s:g} s wall-clock timeout",
                )
        except ResultError as exc:
            if state.outcome is None:
                state.outcome = SessionOutcome(
                    ok=False,
                    subtype=exc.subtype,
                    failure_reason=_SUBTYPE_REASONS.get(exc.subtype or "")
                    or FailureReason.SESSION_ERROR,
                    error=redact(exc.result or "; ".join(exc.errors) or str(exc)),
                    session_id=exc.session_id,
                    api_error_status=exc.api_error_status,
                    cost_usd=state.meter.cost_usd,
                    usage=state.meter.usage,
                    turns=state.turns,
                )
        except ClaudeSDKError as exc:
            if state.stop is None:
                state.end(
                    FailureReason.SESSION_ERROR,
                    redact(f"Claude Code failed: {str(exc).strip()[:2000]}"),
                )
        finally:
            killed = kill_marked_processes(marker)
            if killed and state.stop is None and not refused:
                log(f"killed {killed} process(es) the session left running")
    if refused:
        raise refused[0]
    outcome = state.result()
    if outcome.ok and request.output_format is not None and outcome.structured_output is None:
        outcome.ok = False
        outcome.failure_reason = FailureReason.SESSION_ERROR
        outcome.error = "the session ended without returning the requested structured output"
    outcome.duration_s = round(time.monotonic() - started, 3)
    return outcome


class _SessionState:
    """What one running session has shown so far, and how it ended."""

    def __init__(self, log: Logger, watch: SessionWatch | None, marker: str) -> None:
        self.log, self.watch, self.marker = log, watch, marker
        self.meter = CostMeter()
        self.turns = self.retries = self.fallbacks = 0
        self.session_id: str | None = None
        self.outcome: SessionOutcome | None = None
        self.stop: Stop | None = None

    def handle(self, message: object) -> bool:
        """Log and count one message; True when the session must stop now."""
        from claude_agent_sdk import AssistantMessage, ResultMessage, SystemMessage, ToolUseBlock

        for line in describe_message(message):
            self.log(line)
        if isinstance(message, AssistantMessage):
            self.turns += 1
            self.session_id = message.session_id or self.session_id
            self.meter.add(message.message_id, message.model, message.usage)
            stop = self.watch.turn(self.meter.cost_usd) if self.watch is not None else None
            # A message that calls no tool ends the session: there is no next turn to stop.
            if stop is not None and any(isinstance(b, ToolUseBlock) for b in message.content):
                return self._stop_now(stop)
        elif isinstance(message, SystemMessage):
            self.retries += message.subtype == "api_retry"
            self.fallbacks += message.subtype == "model_fallback"
            if message.subtype == "api_retry" and (unreachable := _unreachable(message.data)):
                return self._stop_now((FailureReason.API_UNREACHABLE, unreachable))
        elif isinstance(message, ResultMessage):
            self.outcome = _outcome_from_result(message)
        return False

    def _stop_now(self, stop: Stop) -> bool:
        # Killed before the SDK closes the stream: otherwise it waits for the CLI to exit
        # on its own, which it does not do with a request in flight.
        self.stop = stop
        kill_marked_processes(self.marker)
        self.log(f"stopped the session: {stop[1]}")
        self.end(*stop)
        return True

    def end(self, reason: FailureReason, error: str) -> None:
        """The session ended without a result of its own (stopped, timed out, crashed)."""
        self.outcome = SessionOutcome(
            ok=False,
            failure_reason=reason,
            error=error,
            turns=self.turns,
            cost_usd=self.meter.cost_usd,
            usage=self.meter.usage,
            session_id=self.outcome.session_id if self.outcome else self.session_id,
        )

    def result(self) -> SessionOutcome:
        outcome = self.outcome or SessionOutcome(
            ok=False,
            failure_reason=FailureReason.SESSION_ERROR,
            error="Claude Code exited without a result",
            turns=self.turns,
            cost_usd=self.meter.cost_usd,
            usage=self.meter.usage,
        )
        outcome.api_retries = self.retries
        outcome.model_fallbacks = self.fallbacks
        return outcome


def _unreachable(data: Mapping[str, Any]) -> str | None:
    """Why the model API cannot be reached at all, from an ``api_retry`` message, or None.

    Retries of HTTP answers (429, 529, 5xx) are Claude Code's business; a retry with no
    HTTP status at all means nothing answered (connection refused, unknown host), which
    retrying with backoff for minutes would not change.
    """
    if data.get("error_status") is not None:
        return None
    detail = str(data.get("error") or "")
    known = f" ({detail})" if detail and detail != "unknown" else ""
    return redact(
        "model API unreachable: no HTTP answer at all (connection refused, or unknown host)"
        f"{known}; check ANTHROPIC_BASE_URL and the network"
    )[:500]


def kill_marked_processes(marker: str) -> int:
    """SIGKILL every process of the session ``marker``; returns how many were killed."""
    return kill_marked(MARKER_VAR, marker)


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

    async def run(
        self, request: SessionRequest, watch: SessionWatch | None = None
    ) -> SessionOutcome:
        """Run ``request`` holding the slot; the slot's watch and ``watch`` follow it.

        Both hear the spend after every turn (either may stop the session) and its final
        cost, before the slot is freed. The CLI boots while the slot is being taken (at most
        :data:`BOOTS_AT_ONCE` in this process at a time, since booting is CPU-bound) and
        asks the model nothing until it is held. Errors taking the slot (the run stopped
        starting sessions, a missing limit) are raised before any session starts.
        """
        if self.env:
            request = dataclasses.replace(request, env={**self.env, **request.env})
        asked = time.monotonic()
        watches = _Watches([watch] if watch is not None else [])
        metrics = telemetry.instruments()
        kind = {"kind": request.attributes.get(telemetry.TASK_KIND, "session")}
        held = anyio.Event()  # the slot is held (or was refused): the session may go on
        ended = anyio.Event()  # the runner returned or raised
        refusal: list[Exception] = []  # why the slot was not given
        failure: list[Exception] = []  # what the runner raised
        outcome: list[SessionOutcome] = []

        boot = _BootPermit()

        async def ready() -> None:
            boot.release()
            await held.wait()
            if refusal:
                raise _SlotRefusedError(str(refusal[0]))

        async def session() -> None:
            try:
                await boot.take()
                if refusal:
                    return  # refused while it waited to boot: no CLI at all
                outcome.append(
                    await (self.runner or run_session)(request, self.log, watches, ready=ready)
                )
            except Exception as exc:  # raised from run() below, not from the task group
                failure.append(exc)
            finally:
                boot.release()
                ended.set()
                if not held.is_set():
                    waiting.cancel()  # it ended before it could start: stop waiting for a slot

        # The slot is asked for at once (slots go out in the order they were asked for);
        # the boot waits for its turn beside it.
        waiting = anyio.CancelScope()
        async with anyio.create_task_group() as group:
            group.start_soon(session)
            with waiting:
                try:
                    async with self.slot() as place:
                        if place is not None:
                            watches.watches.insert(0, place)
                        if metrics is not None:
                            metrics.queue_wait.record(time.monotonic() - asked, kind)
                            metrics.sessions_started.add(1, kind)
                            metrics.sessions_running.add(1, kind)
                        held.set()
                        boot.started()
                        try:
                            await ended.wait()
                        finally:
                            if metrics is not None:
                                metrics.sessions_running.add(-1, kind)
                        if outcome:
                            watches.spend(outcome[0].cost_usd)
                except Exception as exc:
                    refusal.append(exc)
                    held.set()
                    boot.started()
        if refusal:
            raise refusal[0]
        if failure:
            raise failure[0]
        if metrics is not None:
            _record_session_metrics(metrics, request, outcome[0])
        return outcome[0]


class _SlotRefusedError(Exception):
    """Raised to a runner waiting to start when its slot was refused (the host raises why)."""


BOOTS_AT_ONCE = max(1, os.cpu_count() or 1)
"""CLIs this process boots at once ahead of their slot: a boot is CPU-bound, and one that
has booted waits for its slot without using any. A session whose slot is held boots at once
(it is what a run waits for); one still waiting for its slot boots only below this count."""


class _BootGate:
    """How many CLIs are booting in this process, and who may start booting next."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._booting = 0
        self._changed = threading.Condition()

    def enter(self, slot_held: threading.Event) -> None:
        """Wait (in a thread) until this boot may start; it counts until :meth:`leave`."""
        with self._changed:
            while not slot_held.is_set() and self._booting >= self.limit:
                self._changed.wait()
            self._booting += 1

    def leave(self) -> None:
        with self._changed:
            self._booting -= 1
            self._changed.notify_all()

    def nudge(self) -> None:
        """A waiting boot's slot is now held: it need not wait any longer."""
        with self._changed:
            self._changed.notify_all()


_boots = _BootGate(BOOTS_AT_ONCE)


class _BootPermit:
    """One session's place among the CLIs booting in this process, until it has booted."""

    def __init__(self) -> None:
        self.slot_held = threading.Event()
        self._held = False
        self._lock = threading.Lock()

    async def take(self) -> None:
        def enter() -> None:
            _boots.enter(self.slot_held)
            with self._lock:
                self._held = True

        try:
            await anyio.to_thread.run_sync(enter)
        except BaseException:
            self.release()
            raise

    def started(self) -> None:
        """Its slot is held: the boot goes ahead whatever the count."""
        self.slot_held.set()
        _boots.nudge()

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, False
        if held:
            _boots.leave()


def _record_session_metrics(
    metrics: telemetry.Instruments, request: SessionRequest, outcome: SessionOutcome
) -> None:
    """What a session cost and used, by model (every session: worker, planner, resolver,
    reviewer), so the exported cost sums to the runs' totals."""
    model = {"model": request.settings.model or "default"}
    metrics.cost.add(outcome.cost_usd, model)
    metrics.api_retries.add(outcome.api_retries, model)
    usage = outcome.usage
    for token_type, count in (
        ("input", usage.input_tokens),
        ("output", usage.output_tokens),
        ("cache_read", usage.cache_read_input_tokens),
        ("cache_creation", usage.cache_creation_input_tokens),
    ):
        metrics.tokens.add(count, {**model, "type": token_type})


class _Watches:
    """Several watches as one: every one hears every turn; the first Stop wins."""

    def __init__(self, watches: list[SessionWatch]) -> None:
        self.watches = watches

    def turn(self, cost_usd: float) -> Stop | None:
        stops = [watch.turn(cost_usd) for watch in self.watches]
        return next((stop for stop in stops if stop is not None), None)

    def spend(self, usd: float) -> None:
        for watch in self.watches:
            watch.spend(usd)
