"""A local run's session places: width, plan order, budget, early stop (no server needed)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext

import pytest

from claudecluster import places
from claudecluster.budget import GoalBudget
from claudecluster.errors import StartRefusedError
from claudecluster.places import RunSessions, StartPermits


class CountingPermits:
    """Stands in for the server-backed reserve: counts starts, can be told to fail."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.taken = 0
        self.fail = fail

    def take(self) -> None:
        if self.fail is not None:
            raise self.fail
        self.taken += 1

    def forgo(self, starts: int = 1) -> None:
        pass


class FakeReserve(CountingPermits):
    closed = False

    def close(self) -> None:
        self.closed = True


def sessions_with(
    width: int,
    budget_usd: float | None = None,
    spent_usd: float = 0.0,
    session_cap_usd: float | None = None,
) -> tuple[RunSessions, CountingPermits]:
    """Sessions whose slots and first permits are taken (what ``acquire`` does on a server)."""
    permits = CountingPermits()
    budget = (
        GoalBudget(budget_usd, spent_usd=spent_usd, session_cap_usd=session_cap_usd)
        if budget_usd is not None
        else None
    )
    sessions = RunSessions(width, starts=10, start_burst=16, budget=budget)
    sessions.permits = permits  # type: ignore[assignment]
    return sessions, permits


def in_thread(target: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


class TestPlaces:
    def test_no_more_than_width_at_once(self) -> None:
        sessions, permits = sessions_with(2)
        for task_id in ("a", "b", "c"):
            sessions.queue(task_id)
        sessions.enter("a")
        sessions.enter("b")
        third, errors = in_thread(lambda: sessions.enter("c"))
        third.join(0.3)
        assert third.is_alive(), "a third session started while two places were taken"
        sessions.leave("a")
        third.join(5)
        assert not third.is_alive() and not errors
        assert permits.taken == 3  # one start permit per session, none for waiting

    def test_places_go_in_submission_order(self) -> None:
        sessions, _ = sessions_with(1)
        for task_id in ("first", "second", "third"):
            sessions.queue(task_id)
        sessions.enter("first")
        order: list[str] = []
        lock = threading.Lock()

        def take(task_id: str) -> None:
            sessions.enter(task_id)
            with lock:
                order.append(task_id)

        # The later task asks first; it must still wait for "second".
        late, _ = in_thread(lambda: take("third"))
        time.sleep(0.1)
        early, _ = in_thread(lambda: take("second"))
        time.sleep(0.1)
        assert order == []
        sessions.leave("first")
        wait_until(lambda: order == ["second"])
        sessions.leave("second")
        late.join(5)
        early.join(5)
        assert order == ["second", "third"]

    def test_a_withdrawn_task_does_not_hold_up_the_queue(self) -> None:
        sessions, _ = sessions_with(1)
        sessions.queue("cached")
        sessions.queue("next")
        waiter, errors = in_thread(lambda: sessions.enter("next"))
        waiter.join(0.3)
        assert waiter.is_alive(), "'next' jumped the queue"
        sessions.withdraw("cached")  # ended without a session (e.g. a cache hit)
        waiter.join(5)
        assert not waiter.is_alive() and not errors

    def test_a_retry_joins_the_back_of_the_queue(self) -> None:
        sessions, permits = sessions_with(1)
        sessions.queue("a")
        sessions.enter("a")
        sessions.leave("a")
        sessions.enter("a")  # the same task again, not queued by the dispatcher
        assert permits.taken == 2

    def test_no_session_starts_before_the_run_has_its_slots(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        taken: list[object] = []
        monkeypatch.setattr(
            places, "run_slots", lambda n: taken.append(("slots", n)) or nullcontext()
        )
        monkeypatch.setattr(
            places,
            "StartPermits",
            lambda reserve, expected: taken.append(("permits", reserve, expected)) or FakeReserve(),
        )
        sessions = RunSessions(2, starts=3, start_burst=16)
        sessions.forgo()  # a task skipped before the slots were taken
        waiter, errors = in_thread(lambda: sessions.enter("a"))
        waiter.join(0.3)
        assert waiter.is_alive(), "a session started before the run took its slots"
        with ExitStack() as held:
            sessions.acquire(held)
            waiter.join(5)
            assert not waiter.is_alive() and not errors
        assert taken == [("slots", 2), ("permits", 4, 2)]  # two rounds of starts in hand

    def test_a_failed_permit_gives_the_place_back(self) -> None:
        sessions, permits = sessions_with(1)
        permits.fail = RuntimeError("server gone")
        with pytest.raises(RuntimeError, match="server gone"):
            sessions.enter("a")
        permits.fail = None
        sessions.enter("b")  # the place was freed


class TestRefusals:
    def test_no_session_starts_once_the_budget_is_spent(self) -> None:
        sessions, permits = sessions_with(1, budget_usd=2.0, spent_usd=0.5, session_cap_usd=1.0)
        sessions.queue("a")
        sessions.queue("b")
        sessions.enter("a")
        waiter, errors = in_thread(lambda: sessions.enter("b"))
        sessions.spend("a", 1.6)  # told before the place is freed
        sessions.leave("a")
        waiter.join(5)
        assert len(errors) == 1 and isinstance(errors[0], StartRefusedError)
        assert errors[0].failure_reason == "goal_budget"
        assert "$2.00" in errors[0].message and "$2.1000" in errors[0].message
        assert permits.taken == 1

    def test_under_budget_sessions_start(self) -> None:
        sessions, _ = sessions_with(1, budget_usd=2.0)
        sessions.enter("a")
        sessions.spend("a", 1.0)
        sessions.leave("a")
        sessions.enter("b")  # 1.0 of 2.0 spent, a session costs 1.0: still allowed

    def test_a_budget_spent_before_the_run_refuses_at_once(self) -> None:
        sessions, _ = sessions_with(2, budget_usd=1.0, spent_usd=1.0)  # the planner spent it
        with pytest.raises(StartRefusedError):
            sessions.enter("a")

    def test_stop_wakes_every_waiting_task(self) -> None:
        sessions, _ = sessions_with(1)
        sessions.enter("running")
        waiters = [in_thread(lambda t=t: sessions.enter(t)) for t in ("x", "y")]
        time.sleep(0.1)
        sessions.stop("not started: the run stopped (KeyboardInterrupt)")
        for thread, errors in waiters:
            thread.join(5)
            assert len(errors) == 1 and isinstance(errors[0], StartRefusedError)
            assert errors[0].failure_reason == "run_stopped"

    def test_claims_for_other_pools_share_the_places(self) -> None:
        sessions, permits = sessions_with(1)
        assert sessions.claim("x")
        assert not sessions.claim("y")
        sessions.leave("x")
        assert sessions.claim("y")
        assert permits.taken == 0  # sessions on other pools take their own starts


class TestStartPermits:
    """What the reserve asks the rate limit for; the server side is an integration test."""

    def permits(self, reserve: int, expected: int) -> tuple[StartPermits, list[int]]:
        calls: list[int] = []
        permits = StartPermits(reserve, expected, acquire=calls.append)
        return permits, calls

    def test_the_first_fill_is_one_call_and_no_more_than_the_run_can_use(self) -> None:
        permits, calls = self.permits(reserve=4, expected=2)
        try:
            assert calls == [2]  # made by the caller, before its tasks start
            permits.take()
            permits.take()
            time.sleep(0.1)
            assert calls == [2], "acquired starts nobody will use"
        finally:
            permits.close()

    def test_the_reserve_refills_as_starts_are_taken(self) -> None:
        permits, calls = self.permits(reserve=2, expected=5)
        try:
            for _ in range(5):
                permits.take()
            wait_until(lambda: sum(calls) == 5)
            assert calls[0] == 2 and all(c <= 2 for c in calls)
        finally:
            permits.close()

    def test_concurrent_starts_behind_a_slow_rate_limit_all_get_one(self) -> None:
        # Reproduces a lost wake-up: the filler went back to sleep with a full reserve, a
        # waiting start then took the permit, and nobody told the filler to get the next.
        calls: list[int] = []

        def slow(count: int) -> None:
            time.sleep(0.2)  # the rate limit holding starts back
            calls.append(count)

        permits = StartPermits(1, 3, acquire=slow)
        try:
            takers = [in_thread(permits.take) for _ in range(3)]
            for thread, errors in takers:
                thread.join(5)
                assert not thread.is_alive(), "a start waited forever"
                assert not errors
            assert calls == [1, 1, 1]
        finally:
            permits.close()

    def test_forgone_starts_are_not_acquired(self) -> None:
        permits, calls = self.permits(reserve=1, expected=3)
        try:
            permits.forgo(2)  # two tasks were skipped
            permits.take()
            time.sleep(0.1)
            assert sum(calls) == 1
        finally:
            permits.close()

    def test_a_retry_beyond_the_plan_still_gets_a_start(self) -> None:
        permits, calls = self.permits(reserve=2, expected=1)
        try:
            permits.take()
            permits.take()  # the task's retry
            assert sum(calls) == 2
        finally:
            permits.close()

    def test_a_failed_acquisition_reaches_the_waiting_start(self) -> None:
        def broken(count: int) -> None:
            raise RuntimeError("limit missing")

        permits = StartPermits(1, 0, acquire=broken)
        try:
            with pytest.raises(RuntimeError, match="limit missing"):
                permits.take()
        finally:
            permits.close()
