"""A fake session runner: the worker, planner and resolver logic without the Claude Code CLI.

The real seam is :class:`~claudecluster.session.SessionRunner`; production runs pass
nothing and get the real CLI. Fast unit tests pass a :class:`FakeRunner` in a
:class:`~claudecluster.session.SessionHost`, and a handler plays the session: it edits the
worktree the request names and says how the session ended::

    runner = FakeRunner(lambda request: writes(request, {"a.py": "x = 1\\n"}))
    result = await execute_task(unit, host=SessionHost(runner=runner))
    runner.requests  # every SessionRequest, in order

Integration tests keep driving the real CLI against the scripted model server.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from claudecluster.models import FailureReason, TokenUsage
from claudecluster.session import Logger, SessionOutcome, SessionRequest

Handler = Callable[[SessionRequest], SessionOutcome | Awaitable[SessionOutcome | None] | None]


def finished(**fields: Any) -> SessionOutcome:
    """The outcome of a session that finished its work (override any field)."""
    values: dict[str, Any] = {
        "ok": True,
        "session_id": "fake-session",
        "subtype": "success",
        "turns": 2,
        "cost_usd": 0.01,
        "usage": TokenUsage(input_tokens=100, output_tokens=20),
    }
    return SessionOutcome(**(values | fields))


def stopped(reason: FailureReason, error: str, **fields: Any) -> SessionOutcome:
    """The outcome of a session that stopped early (a limit, an API error, a crash)."""
    return finished(ok=False, failure_reason=reason, error=error, **fields)


def writes(request: SessionRequest, files: dict[str, str], **fields: Any) -> SessionOutcome:
    """Write ``files`` (relative to the session's worktree) and finish."""
    for name, content in files.items():
        target = request.cwd / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    return finished(**fields)


class FakeRunner:
    """A :class:`~claudecluster.session.SessionRunner` whose sessions a handler plays.

    Without a handler every session finishes at once and changes nothing.
    """

    def __init__(self, handler: Handler | None = None) -> None:
        self.handler = handler
        self.requests: list[SessionRequest] = []

    async def __call__(self, request: SessionRequest, log: Logger) -> SessionOutcome:
        self.requests.append(request)
        log(f"fake session in {request.cwd}")
        outcome = self.handler(request) if self.handler else None
        if inspect.isawaitable(outcome):
            outcome = await outcome
        return outcome if isinstance(outcome, SessionOutcome) else finished()
