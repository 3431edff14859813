"""A goal's budget while its sessions run: what is spent, what is being spent, what is next.

The rules, which hold at any width:

- **Before a session starts**, the budget must cover what is already spent, plus what every
  running session is expected to spend (its spend so far, or the estimate if that is more),
  plus the estimate for the new one. The estimate is what the most expensive session of
  the run has cost so far; before any session has ended, it is the per-session cap
  (``--task-budget-usd``), never more than what is left of the budget. So a budget smaller
  than a few caps runs its first session alone, until it knows what a session costs.
- **After every turn**, a running session goes on only if its next turn fits: what is
  spent, plus what running sessions have spent, plus the turns other sessions have in
  flight, plus its own next turn, must stay within the budget. A turn is expected to cost
  what the session's last one did, and a quarter more (the conversation grows). A session
  that does not fit is stopped there (its work is committed and kept), and once the budget
  is spent no session starts again.

With tasks that each cost about ``C``, the run's spend stays within ``budget + C``, and in
practice within the budget plus how far the turn estimates were off. The ledger is not
thread-safe: :class:`claudecluster.places.RunSessions` keeps it under its lock.
"""

from __future__ import annotations

from claudecluster.models import FailureReason

# Floating-point slack, so a reservation that exactly fits is admitted.
_EPSILON = 1e-9
# A turn costs at least what the session's last turn did: it resends the whole conversation.
TURN_GROWTH = 1.25


def budget_spent(budget_usd: float, spent_usd: float) -> str:
    """Why a task did not start: its goal's budget is spent."""
    return (
        f"not started: the goal's budget of ${budget_usd:.2f} was spent (${spent_usd:.4f} so far)"
    )


class GoalBudget:
    """The ledger of one goal's budget."""

    def __init__(
        self, budget_usd: float, *, spent_usd: float = 0.0, session_cap_usd: float | None = None
    ) -> None:
        self.limit = budget_usd
        self.spent = spent_usd
        self.live: dict[str, float] = {}  # running sessions' spend so far
        self.last_turn: dict[str, float] = {}  # running sessions' last turn's cost
        self.first_turns: list[float] = []  # what sessions' first turns cost
        self.most_a_session_cost: float | None = None
        # Before any session ends: its cap, but never more than what is left to spend.
        left = max(0.0, budget_usd - spent_usd)
        self.first_estimate = min(session_cap_usd, left) if session_cap_usd else left

    @property
    def estimate(self) -> float:
        """What a session is expected to cost."""
        if self.most_a_session_cost is not None:
            return self.most_a_session_cost
        return self.first_estimate

    @property
    def committed(self) -> float:
        """Spent, plus what running sessions have spent or are expected to spend."""
        estimate = self.estimate
        return self.spent + sum(max(live, estimate) for live in self.live.values())

    @property
    def exhausted(self) -> bool:
        """True once what is spent and being spent reaches the budget."""
        return self.spent + sum(self.live.values()) >= self.limit - _EPSILON

    def admits(self) -> bool:
        """True when one more session fits."""
        return not self.exhausted and self.committed + self.estimate <= self.limit + _EPSILON

    def never_admits(self) -> bool:
        """True when no session will fit again: nothing runs that could end cheaper."""
        return not self.live and not self.admits()

    def start(self, task_id: str) -> None:
        """A session of ``task_id`` starts (it was admitted)."""
        self.live[task_id] = 0.0

    def in_flight(self, task_id: str) -> float:
        """What the turn ``task_id``'s session is taking now is expected to cost."""
        if task_id in self.last_turn:
            return self.last_turn[task_id] * TURN_GROWTH
        return max(self.first_turns, default=0.0)

    def turn(self, task_id: str, cost_usd: float) -> tuple[FailureReason, str] | None:
        """A running session has spent ``cost_usd`` so far; a stop if its next turn does
        not fit (or the budget is spent)."""
        if task_id in self.live:
            step = max(0.0, cost_usd - self.live[task_id])
            if task_id not in self.last_turn:
                self.first_turns.append(step)
            self.last_turn[task_id] = step
            self.live[task_id] = max(self.live[task_id], cost_usd)
        being_spent = self.spent + sum(self.live.values())
        others = sum(self.in_flight(other) for other in self.live if other != task_id)
        if being_spent + others + self.in_flight(task_id) <= self.limit + _EPSILON:
            return None
        return (
            FailureReason.GOAL_BUDGET,
            f"stopped: the goal's budget of ${self.limit:.2f} would not cover its next turn "
            f"(${being_spent:.4f} spent or being spent)",
        )

    def finish(self, task_id: str, cost_usd: float) -> None:
        """A session of ``task_id`` ended, having cost ``cost_usd`` in all."""
        self.live.pop(task_id, None)
        self.last_turn.pop(task_id, None)
        self.spent += cost_usd
        if cost_usd > 0:
            self.most_a_session_cost = max(self.most_a_session_cost or 0.0, cost_usd)

    def drop(self, task_id: str) -> None:
        """A session of ``task_id`` ended without saying what it cost (it never ran)."""
        self.live.pop(task_id, None)
        self.last_turn.pop(task_id, None)

    def refusal(self) -> str:
        """Why a session may not start."""
        return budget_spent(self.limit, self.spent)
