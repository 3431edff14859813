"""Cluster-wide limits on Claude Code sessions, kept by Prefect's global concurrency limits.

Two limits, shared by every run, flow and work pool that talks to the same Prefect server:

- ``claudecluster-sessions`` caps how many sessions run at once (default 16). Every session
  holds one slot while it runs.
- ``claudecluster-session-starts`` is a rate limit on session starts (default: bursts of 16,
  refilled at 8 per second). Every session takes one slot before it starts; slots decay, so
  starts are spread out instead of hitting the API all at once. Tune it to your API tier:
  ``claudecluster setup --starts-per-second R --start-burst B``, or
  ``prefect gcl update claudecluster-session-starts --limit B --slot-decay-per-second R``.

Both are created by ``claudecluster setup`` (and on first use with the defaults), show in the
UI under Concurrency, and are acquired with ``strict=True``: if a limit does not exist, the
session does not start (a missing limit must never mean "unlimited").

A local run takes both in bulk, off its tasks' critical path (:func:`local_sessions`): it
holds its ``max_parallel`` session slots for the whole run and shares them among its tasks
as places (:class:`RunSessions`), and a :class:`StartPermits` reserve acquires start slots
ahead of need, several per call, on a thread of its own. Each acquisition is a write to the
Prefect server; under load a SQLite server answers some of them with a 503 that Prefect's
client retries after about 2 s, and every acquisition queued behind it in the same process
waits too. Taken per session, that cost seconds on a third of the starts (benchmarks/).
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass

from claudecluster.errors import ConfigError, StartRefusedError

SESSION_LIMIT = "claudecluster-sessions"
DEFAULT_SESSION_SLOTS = 16
START_RATE_LIMIT = "claudecluster-session-starts"
# Generous enough that a run's own fan-out (up to max_parallel starts at once) is never
# refused: Prefect answers a refusal with a Retry-After that grows with every refusal it has
# counted, which cost ~3 s per task in the benchmark with a burst of 4 at 2 per second.
DEFAULT_START_BURST = 16
DEFAULT_STARTS_PER_SECOND = 8.0


@dataclass(frozen=True)
class Limits:
    """The cluster-wide limits as they stand on the server."""

    sessions: int
    start_burst: int
    starts_per_second: float


def ensure_limits(
    sessions: int | None = None,
    *,
    starts_per_second: float | None = None,
    start_burst: int | None = None,
) -> Limits:
    """Create the limits if they are missing (or set what is given); return them."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_global_concurrency_limit_by_name(SESSION_LIMIT)
        except ObjectNotFound:
            existing = None
        if existing is None or sessions is not None:
            wanted = sessions or DEFAULT_SESSION_SLOTS
            client.upsert_global_concurrency_limit_by_name(SESSION_LIMIT, wanted)
        else:
            wanted = int(existing.limit)
        try:
            rate = client.read_global_concurrency_limit_by_name(START_RATE_LIMIT)
        except ObjectNotFound:
            rate = None
        burst = start_burst or (int(rate.limit) if rate else DEFAULT_START_BURST)
        per_second = starts_per_second or (
            float(rate.slot_decay_per_second) if rate else DEFAULT_STARTS_PER_SECOND
        )
        if rate is None or starts_per_second is not None or start_burst is not None:
            client.upsert_global_concurrency_limit_by_name(
                START_RATE_LIMIT, burst, slot_decay_per_second=per_second
            )
        return Limits(sessions=wanted, start_burst=burst, starts_per_second=per_second)


@asynccontextmanager
async def session_slot() -> AsyncIterator[None]:
    """Wait for a start under the rate limit, then hold a session slot while the block runs."""
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.asyncio import concurrency

    acquired = False
    try:
        await _take_start()
        async with concurrency(SESSION_LIMIT, occupy=1, strict=True):
            acquired = True
            yield
    except ConcurrencySlotAcquisitionError as exc:
        if acquired:
            raise
        raise _missing_limits(exc) from exc


@asynccontextmanager
async def start_slot() -> AsyncIterator[None]:
    """Wait for a start under the rate limit; the caller's run already holds a session slot."""
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError

    try:
        await _take_start()
    except ConcurrencySlotAcquisitionError as exc:
        raise _missing_limits(exc) from exc
    yield


def budget_spent(budget_usd: float, spent_usd: float) -> str:
    """Why a task did not start: its goal's budget is spent."""
    return (
        f"not started: the goal's budget of ${budget_usd:.2f} was spent (${spent_usd:.4f} so far)"
    )


@asynccontextmanager
async def run_session(sessions: RunSessions, task_id: str) -> AsyncIterator[RunSessions]:
    """Hold one of a local run's session places (and a start permit) while the block runs.

    Yields the run's sessions, to be told what the session cost before the place is freed.
    """
    import anyio.to_thread

    entered = threading.Event()

    def enter() -> None:
        sessions.enter(task_id)
        entered.set()

    try:
        # Not abandoned on cancellation: the wait ends, and a place it took is given back.
        await anyio.to_thread.run_sync(enter)
        yield sessions
    finally:
        if entered.is_set():
            sessions.leave()


async def _take_start() -> None:
    from prefect.concurrency.asyncio import rate_limit

    await rate_limit(START_RATE_LIMIT, occupy=1, strict=True)


def _missing_limits(exc: Exception) -> ConfigError:
    return ConfigError(
        f"cannot take a slot of the ClaudeCluster session limits: {exc}",
        hint="Run `claudecluster setup` against this Prefect server.",
    )


def current_limits() -> Limits:
    """The cluster-wide limits as they stand on the server."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        found = {}
        for name in (SESSION_LIMIT, START_RATE_LIMIT):
            try:
                found[name] = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                raise ConfigError(
                    f"the concurrency limit {name} is missing on the Prefect server",
                    hint="Run `claudecluster setup` against this Prefect server.",
                ) from None
    sessions, starts = found[SESSION_LIMIT], found[START_RATE_LIMIT]
    return Limits(
        sessions=int(sessions.limit),
        start_burst=int(starts.limit),
        starts_per_second=float(starts.slot_decay_per_second),
    )


@contextmanager
def run_slots(slots: int) -> Iterator[None]:
    """Hold ``slots`` of the session limit for a whole run (none when ``slots`` is 0)."""
    if slots <= 0:
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(SESSION_LIMIT, occupy=slots, strict=True):
        yield


def acquire_starts(count: int) -> None:
    """Take ``count`` session starts from the cluster-wide rate limit, waiting as needed."""
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import rate_limit

    try:
        rate_limit(START_RATE_LIMIT, occupy=count, strict=True)
    except ConcurrencySlotAcquisitionError as exc:
        raise _missing_limits(exc) from exc


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
    """The sessions of one local run: at most ``width`` at once, each with a start permit.

    The run holds ``width`` slots of the cluster-wide session limit for its whole length and
    shares them here. Its dispatcher submits more tasks than that, so the next tasks set up
    their worktrees while sessions run and start the moment a place frees up; work before
    and after a session (worktree, commit, diff, artifacts) is then off the critical path.

    No session starts before :meth:`acquire` has taken the run's slots and first start
    permits. Places go out in the order the dispatcher submitted the tasks (:meth:`queue`),
    so sessions start in plan order whatever order their set-up finishes in.
    """

    def __init__(
        self,
        width: int,
        *,
        starts: int,
        start_burst: int,
        budget_usd: float | None = None,
        spent_usd: float = 0.0,
    ) -> None:
        self.width = width
        self.permits: StartPermits | None = None
        self.budget_usd = budget_usd
        self.spent_usd = spent_usd
        self._starts, self._start_burst, self._forgone = starts, start_burst, 0
        self._active = 0
        self._queue: list[str] = []  # tasks submitted and not yet given a place, in order
        self._refusal: str | None = None
        self._refusal_reason = ""
        self._changed = threading.Condition()
        with self._changed:
            self._check_budget()

    def acquire(self, held: ExitStack) -> None:
        """Take the run's session slots (held until ``held`` closes) and its first start
        permits; then sessions may start."""
        held.enter_context(run_slots(self.width))
        with self._changed:
            expected = self._starts - self._forgone
        permits = StartPermits(min(self.width, self._start_burst), expected)
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
        """Wait for ``task_id``'s turn and a free place, then take a start permit.

        Raises StartRefusedError once the run has stopped starting sessions. A task asking
        again (a retry) joins the back of the queue.
        """
        with self._changed:
            if task_id not in self._queue:
                self._queue.append(task_id)
            while self._refusal is None and (
                self.permits is None or self._active >= self.width or self._queue[0] != task_id
            ):
                self._changed.wait()
            self._queue.remove(task_id)
            self._changed.notify_all()
            if self._refusal is not None:
                raise StartRefusedError(self._refusal, failure_reason=self._refusal_reason)
            self._active += 1
            permits = self.permits
        try:
            assert permits is not None
            permits.take()
        except BaseException:
            self.leave()
            raise

    def claim(self) -> bool:
        """Take a place now if one is free, without a permit (for a session on another pool,
        which takes its own start slot there)."""
        with self._changed:
            if self._active >= self.width or self._refusal is not None:
                return False
            self._active += 1
            return True

    def leave(self) -> None:
        with self._changed:
            self._active -= 1
            self._changed.notify_all()

    def spend(self, usd: float) -> None:
        """A session of the run cost ``usd``; once the budget is spent, none starts again.

        Sessions report their cost as they end, before giving their place up, so a task
        waiting for the place never starts on a budget that is already gone.
        """
        with self._changed:
            self.spent_usd += usd
            self._check_budget()

    def stop(self, message: str) -> None:
        """Start no further session (the run is ending early); running ones carry on."""
        with self._changed:
            self._refuse(message, "run_stopped")

    def _check_budget(self) -> None:
        if self.budget_usd is not None and self.spent_usd >= self.budget_usd:
            self._refuse(budget_spent(self.budget_usd, self.spent_usd), "goal_budget")

    def _refuse(self, message: str, failure_reason: str) -> None:
        if self._refusal is None:
            self._refusal, self._refusal_reason = message, failure_reason
        self._changed.notify_all()


_RUNS: dict[str, RunSessions] = {}


@contextmanager
def local_sessions(
    run_id: str,
    width: int,
    starts: int,
    *,
    budget_usd: float | None = None,
    spent_usd: float = 0.0,
) -> Iterator[RunSessions | None]:
    """The session places of a local run's ``starts`` sessions (None when it has none).

    While the block runs, the run's worker tasks in this process find them with
    :func:`sessions_of`. The cluster-wide slots and start permits are taken by
    :meth:`RunSessions.acquire`.
    """
    if starts <= 0:
        yield None
        return
    limits = current_limits()
    sessions = RunSessions(
        min(width, limits.sessions),
        starts=starts,
        start_burst=limits.start_burst,
        budget_usd=budget_usd,
        spent_usd=spent_usd,
    )
    _RUNS[run_id] = sessions
    try:
        yield sessions
    finally:
        _RUNS.pop(run_id, None)


def sessions_of(run_id: str) -> RunSessions | None:
    """The session places of ``run_id`` if its dispatcher runs in this process."""
    return _RUNS.get(run_id)
