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
from claudecluster.session import (
    Logger,
    Ready,
    SessionOutcome,
    SessionRequest,
    SessionWatch,
    start_now,
)

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

    Without a handler every session finishes at once and changes nothing. The session's
    cost is reported to the watch turn by turn, in equal parts; a watch that stops the
    session ends it there (unless it was the last turn), as the real runner does.
    """

    def __init__(self, handler: Handler | None = None) -> None:
        self.handler = handler
        self.requests: list[SessionRequest] = []

    async def __call__(
        self,
        request: SessionRequest,
        log: Logger,
        watch: SessionWatch | None = None,
        *,
        ready: Ready = start_now,
    ) -> SessionOutcome:
        await ready()
        self.requests.append(request)
        log(f"fake session in {request.cwd}")
        played = self.handler(request) if self.handler else None
        if inspect.isawaitable(played):
            played = await played
        outcome = played if isinstance(played, SessionOutcome) else finished()
        turns = max(1, outcome.turns)
        for turn in range(1, turns + 1):
            spent = round(outcome.cost_usd * turn / turns, 6)
            stop = watch.turn(spent) if watch is not None else None
            if stop is not None and turn < turns:  # the last turn has no next to stop
                log(f"stopped the session: {stop[1]}")
                return stopped(stop[0], stop[1], turns=turn, cost_usd=spent)
        return outcome
