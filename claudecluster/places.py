"""The session places of one local run: how a run shares the slots it holds among its tasks.

A local run (its tasks run as task runs of the goal's flow run, in this process) holds its
``max_parallel`` slots of the cluster-wide session limit for its whole length and shares them
here as places (:class:`RunSessions`); a :class:`StartPermits` reserve acquires session
starts from the cluster-wide rate limit ahead of need, several per call, on a thread of its
own (see :mod:`claudecluster.concurrency` for why).

The dispatcher opens a run's :class:`RunSessions` with :func:`open_run_sessions` and passes
it, explicitly, to each local worker task, whose session holds a place with
:func:`session_place`. Sessions of other pools run elsewhere and take their own slot of the
cluster-wide limit; here they only claim a place (:meth:`RunSessions.claim`).
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack, asynccontextmanager

import anyio.to_thread

from claudecluster.budget import GoalBudget
from claudecluster.concurrency import acquire_starts, current_limits, run_slots
from claudecluster.errors import StartRefusedError
from claudecluster.session import Stop


class StartPermits:
    """Session starts acquired ahead of need from the start-rate limit, for one local run.

    A thread keeps up to ``reserve`` permits in hand, acquiring what is missing in one call,
    but never more than the run can still use (the starts it expects, less those it forgoes).
    :meth:`take` hands one out, waiting only when the reserve is empty, that is when
    the rate limit (or the server) is what holds the run back. Permits left over when the run
    ends are not returned; the limit's slots decay on their own.
    """

    def __init__(
        self, reserve: int, expected: int, acquire: Callable[[int], None] | None = None
    ) -> None:
        """Acquire the first permits now, then keep the reserve filled from a thread.

        The first acquisition is made by the caller, before its tasks start: made
        alongside their start-up writes, it is the one most likely to meet a locked server.
        """
        self.reserve = max(1, reserve)
        self._acquire_slots = acquire or acquire_starts
        self._held = 0
        self._expected = max(0, expected)
        self._waiting = 0
        self._error: Exception | None = None
        self._closed = False
        self._changed = threading.Condition()
        self._acquire(self._wanted())
        context = contextvars.copy_context()  # the caller's Prefect settings and run
        self._thread = threading.Thread(
            target=context.run, args=(self._fill,), name="start-permits", daemon=True
        )
        self._thread.start()

    def take(self) -> None:
        """One start: return at once from the reserve, or wait for the next acquisition."""
        with self._changed:
            self._waiting += 1
            self._changed.notify_all()
            try:
                while self._held == 0 and self._error is None and not self._closed:
                    self._changed.wait()
                if self._error is not None:
                    raise self._error
                if self._held == 0:
                    raise RuntimeError("the run's start permits were closed")
                self._held -= 1
                self._expected = max(0, self._expected - 1)
                self._changed.notify_all()  # the filler refills what was just taken
            finally:
                self._waiting -= 1

    def forgo(self, starts: int = 1) -> None:
        """``starts`` of the expected sessions will not start after all (skipped)."""
        with self._changed:
            self._expected = max(0, self._expected - starts)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join(10)

    def _wanted(self) -> int:
        demand = max(self._expected, self._waiting)
        return max(0, min(self.reserve, demand) - self._held)

    def _acquire(self, count: int) -> None:
        if count <= 0:
            return
        self._acquire_slots(count)
        with self._changed:
            self._held += count
            self._changed.notify_all()

    def _fill(self) -> None:
        while True:
            with self._changed:
                while not self._closed and self._wanted() == 0:
                    self._changed.wait()
                if self._closed:
                    return
                count = self._wanted()
            try:
                self._acquire(count)
            except Exception as exc:  # every waiting start must hear why it cannot start
                with self._changed:
                    self._error = exc
                    self._changed.notify_all()
                return


class RunSessions:
    """The sessions of one run: at most ``width`` at once, within the goal's budget.

    A local run holds ``width`` slots of the cluster-wide session limit for its whole length
    and shares them here, each local session with a start permit. Its dispatcher submits
    more tasks than that, so the next tasks set up their worktrees while sessions run and
    start the moment a place frees up; work before and after a session (worktree, commit,
    diff, artifacts) is then off the critical path. Tasks on other pools claim a place too
    (:meth:`claim`), so the width and the budget hold across pools.

    No local session starts before :meth:`acquire` has taken the run's slots and first
    start permits. Places go out in the order the dispatcher submitted the tasks
    (:meth:`queue`), so sessions start in plan order whatever order their set-up finishes
    in. With a :class:`~claudecluster.budget.GoalBudget`, a session also waits until the
    budget admits it, and running sessions are stopped at their next turn once it is spent.
    """

    def __init__(
        self,
        width: int,
        *,
        starts: int,
        start_burst: int,
        budget: GoalBudget | None = None,
    ) -> None:
        self.width = width
        self.permits: StartPermits | None = None
        self.budget = budget
        self._starts, self._start_burst, self._forgone = starts, start_burst, 0
        self._holding: set[str] = set()  # tasks holding a place now
        self._queue: list[str] = []  # tasks submitted and not yet given a place, in order
        self._refusal: str | None = None
        self._refusal_reason = ""
        self._changed = threading.Condition()
        with self._changed:
            self._check_budget()

    def acquire(self, held: ExitStack) -> None:
        """Take the run's session slots (held until ``held`` closes) and its first start
        permits; then local sessions may start."""
        if self._starts <= 0:
            return  # no local sessions: every session takes its own slot on its pool
        held.enter_context(run_slots(self.width))
        with self._changed:
            expected = self._starts - self._forgone
        # Two rounds of starts in hand: a refill that meets a busy server waits 2-6 s for
        # Prefect's retries, about two rounds of sessions ending at this width.
        permits = StartPermits(min(2 * self.width, self._start_burst), expected)
        held.callback(permits.close)
        with self._changed:
            self.permits = permits
            self._changed.notify_all()

    def forgo(self) -> None:
        """One expected session will not start after all (its task was skipped)."""
        with self._changed:
            if self.permits is None:
                self._forgone += 1
            else:
                self.permits.forgo()

    def queue(self, task_id: str) -> None:
        """``task_id`` was submitted: it gets a place after the tasks queued before it."""
        with self._changed:
            self._queue.append(task_id)

    def withdraw(self, task_id: str) -> None:
        """``task_id`` ended without asking for a place (cached, or failed before its session)."""
        with self._changed:
            if task_id in self._queue:
                self._queue.remove(task_id)
                self._changed.notify_all()

    def enter(self, task_id: str) -> None:
        """Wait for ``task_id``'s turn, a free place and the budget, then take a start permit.

        Raises StartRefusedError once the run has stopped starting sessions. A task asking
        again (a retry) joins the back of the queue.
        """
        with self._changed:
            if task_id not in self._queue:
                self._queue.append(task_id)
            while self._refusal is None and not (
                self.permits is not None
                and self._queue[0] == task_id
                and self._free_place_for_budget()
            ):
                self._changed.wait()
            self._queue.remove(task_id)
            self._changed.notify_all()
            if self._refusal is not None:
                raise StartRefusedError(self._refusal, failure_reason=self._refusal_reason)
            self._take_place(task_id)
            permits = self.permits
        try:
            assert permits is not None
            permits.take()
        except BaseException:
            self.leave(task_id)
            raise

    def claim(self, task_id: str) -> bool:
        """Take a place now if one is free and the budget admits it, without a permit (for a
        session on another pool, which takes its own start slot there)."""
        with self._changed:
            if self._refusal is not None or not self._free_place_for_budget():
                return False
            self._take_place(task_id)
            return True

    def turn(self, task_id: str, cost_usd: float) -> Stop | None:
        """A running session's spend so far; a stop once the goal's budget is spent."""
        with self._changed:
            if self.budget is None:
                return None
            stop = self.budget.turn(task_id, cost_usd)
            if stop is not None:
                self._refuse(self.budget.refusal(), "goal_budget")
            return stop

    def spend(self, task_id: str, usd: float) -> None:
        """``task_id``'s session ended, having cost ``usd``.

        Sessions report their cost as they end, before giving their place up, so a task
        waiting for the place never starts on a budget that is already gone.
        """
        with self._changed:
            if self.budget is not None:
                self.budget.finish(task_id, usd)
            self._check_budget()
            self._changed.notify_all()

    def leave(self, task_id: str) -> None:
        """``task_id`` gives its place up."""
        with self._changed:
            self._holding.discard(task_id)
            if self.budget is not None:
                self.budget.drop(task_id)  # if it ended before it could say its cost
            self._check_budget()
            self._changed.notify_all()

    def stop(self, message: str, failure_reason: str = "run_stopped") -> None:
        """Start no further session (the run is ending early); running ones carry on."""
        with self._changed:
            self._refuse(message, failure_reason)

    @property
    def refusal(self) -> tuple[str, str] | None:
        """Why no session starts any more (message, failure reason), or None."""
        with self._changed:
            return (self._refusal, self._refusal_reason) if self._refusal else None

    def holds_place(self, task_id: str) -> bool:
        """True while ``task_id`` holds a place (its session is starting or running)."""
        with self._changed:
            return task_id in self._holding

    def account(self, usd: float) -> None:
        """Spend paid outside this run's sessions (work reused from an earlier attempt)."""
        with self._changed:
            if self.budget is not None:
                self.budget.spent += usd
            self._check_budget()

    def _free_place_for_budget(self) -> bool:
        return len(self._holding) < self.width and (self.budget is None or self.budget.admits())

    def _take_place(self, task_id: str) -> None:
        self._holding.add(task_id)
        if self.budget is not None:
            self.budget.start(task_id)

    def _check_budget(self) -> None:
        if self.budget is not None and (self.budget.exhausted or self.budget.never_admits()):
            self._refuse(self.budget.refusal(), "goal_budget")

    def _refuse(self, message: str, failure_reason: str) -> None:
        if self._refusal is None:
            self._refusal, self._refusal_reason = message, failure_reason
        self._changed.notify_all()


class _Place:
    """One session's place in a run: passes its spend to the run's budget."""

    def __init__(self, sessions: RunSessions, task_id: str) -> None:
        self.sessions, self.task_id = sessions, task_id

    def turn(self, cost_usd: float) -> Stop | None:
        return self.sessions.turn(self.task_id, cost_usd)

    def spend(self, usd: float) -> None:
        self.sessions.spend(self.task_id, usd)


@asynccontextmanager
async def session_place(sessions: RunSessions, task_id: str) -> AsyncIterator[_Place]:
    """Hold one of a run's session places (and a start permit) while the block runs.

    Yields the session's place, to be told its spend after every turn and its cost before
    the place is freed.
    """
    entered = threading.Event()

    def enter() -> None:
        sessions.enter(task_id)
        entered.set()

    try:
        # Not abandoned on cancellation: the wait ends, and a place it took is given back.
        await anyio.to_thread.run_sync(enter)
        yield _Place(sessions, task_id)
    finally:
        if entered.is_set():
            sessions.leave(task_id)


def open_run_sessions(width: int, starts: int, *, budget: GoalBudget | None = None) -> RunSessions:
    """The session places of a run with ``starts`` local sessions (and any on other pools).

    The width is capped by the cluster-wide session limit. The cluster-wide slots and the
    first start permits are taken by :meth:`RunSessions.acquire`.
    """
    limits = current_limits()
    return RunSessions(
        min(width, limits.sessions), starts=starts, start_burst=limits.start_burst, budget=budget
    )
