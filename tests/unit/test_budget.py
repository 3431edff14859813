"""The goal budget's ledger: admission, live spend, stops, and the bound it keeps."""

from __future__ import annotations

import random

import pytest

from claudecluster.budget import GoalBudget
from claudecluster.models import FailureReason


class TestAdmission:
    """What may start, given what is spent and what is being spent."""

    def test_before_any_session_ends_the_cap_is_the_estimate(self) -> None:
        budget = GoalBudget(5.0, session_cap_usd=2.0)
        assert budget.admits()
        budget.start("a")
        assert budget.admits()  # 2 + 2 of 5
        budget.start("b")
        assert not budget.admits()  # 2 + 2 + 2 > 5

    def test_a_budget_below_the_cap_runs_one_session_until_it_knows_the_cost(self) -> None:
        budget = GoalBudget(1.10, session_cap_usd=2.0)
        budget.start("a")
        assert not budget.admits()
        budget.finish("a", 0.36)
        assert budget.estimate == pytest.approx(0.36)
        budget.start("b")
        assert budget.admits()  # 0.36 spent + 0.36 running + 0.36 new <= 1.10
        budget.start("c")
        assert not budget.admits()

    def test_a_running_session_that_spent_more_than_the_estimate_counts_what_it_spent(
        self,
    ) -> None:
        budget = GoalBudget(2.5, session_cap_usd=1.0)
        budget.start("a")
        assert budget.admits()  # 1.0 (a, expected) + 1.0 (new) <= 2.5
        for spent in (0.3, 0.6, 0.9, 1.2, 1.5, 1.8):
            assert budget.turn("a", spent) is None  # small turns: the next one fits
        assert not budget.admits()  # 1.8 (a, spent) + 1.0 (new) > 2.5

    def test_nothing_fits_and_nothing_runs_means_never(self) -> None:
        budget = GoalBudget(1.0, session_cap_usd=0.5)
        budget.start("a")
        budget.finish("a", 0.6)
        budget.start("b")
        assert not budget.never_admits()  # b may still end cheaper than its estimate
        budget.finish("b", 0.3)
        assert budget.never_admits()  # 0.9 spent, a session costs up to 0.6

    def test_what_the_planner_spent_leaves_less_for_the_first_session(self) -> None:
        budget = GoalBudget(1.0, spent_usd=0.9, session_cap_usd=0.5)
        assert budget.estimate == pytest.approx(0.1)
        assert budget.admits()


class TestStops:
    """A running session goes on only while its next turn fits."""

    def test_a_session_whose_next_turn_does_not_fit_is_stopped(self) -> None:
        budget = GoalBudget(1.0, session_cap_usd=0.4)
        budget.start("a")
        budget.start("b")
        assert budget.turn("a", 0.2) is None  # 0.2 + b's turn in flight (0.2) + 0.25
        assert budget.turn("b", 0.2) is None  # 0.4 + a's next (0.25) + 0.25
        stop = budget.turn("a", 0.45)  # 0.65 + b's next (0.25) + a's next (0.31) > 1
        assert stop is not None and stop[0] is FailureReason.GOAL_BUDGET
        assert "$1.00" in stop[1] and "next turn" in stop[1]
        budget.finish("a", 0.45)
        assert budget.turn("b", 0.5) is not None  # 0.95 + its next (0.375) > 1
        budget.finish("b", 0.5)
        assert budget.exhausted is False and budget.never_admits()


def simulate(
    *,
    budget_usd: float,
    cost: float,
    turns: int,
    width: int,
    tasks: int,
    cap: float | None,
    seed: int,
    naive: bool = False,
    first_cost: float | None = None,
) -> float:
    """A run of ``tasks`` sessions of ``turns`` turns costing ``cost`` in all (later turns
    cost more: the conversation grows), at most ``width`` at once, their turns interleaved
    at random; Claude Code's own per-session cap stops a session after the turn that
    reaches it. Returns what the run spent. ``naive`` plays the old rule (only finished
    sessions counted, nobody stopped), as a control."""
    rng = random.Random(seed)
    weights = [i + 1 for i in range(turns)]
    per_turn = [cost * w / sum(weights) for w in weights]
    budget = GoalBudget(budget_usd, session_cap_usd=cap)
    waiting = [f"t{i}" for i in range(tasks)]
    running: dict[str, tuple[int, float]] = {}  # task -> (turns done, spent)

    def turn_cost(task: str, done: int) -> float:
        return first_cost if first_cost is not None and task == "t0" else per_turn[done]

    def turns_of(task: str) -> int:
        return 1 if first_cost is not None and task == "t0" else turns

    while waiting or running:
        admits = budget.spent < budget_usd if naive else budget.admits()
        while waiting and len(running) < width and admits:
            task = waiting.pop(0)
            budget.start(task)
            running[task] = (0, 0.0)
            admits = budget.spent < budget_usd if naive else budget.admits()
        if not running:
            break  # nothing can start again
        task = rng.choice(sorted(running))
        done, spent = running[task]
        done, spent = done + 1, spent + turn_cost(task, done)
        stopped = budget.turn(task, spent) is not None and not naive
        capped = cap is not None and spent >= cap
        if stopped or capped or done == turns_of(task):
            del running[task]
            budget.finish(task, spent)
        else:
            running[task] = (done, spent)
    return budget.spent


class TestTheBound:
    """With tasks that each cost C, spend stays within budget + C, at any width."""

    @pytest.mark.parametrize("width", [1, 2, 4, 8, 16])
    @pytest.mark.parametrize(("budget_usd", "cost"), [(1.10, 0.36), (0.5, 0.2), (3.3, 1.0)])
    @pytest.mark.parametrize("turns", [1, 3, 8])
    @pytest.mark.parametrize("cap", [None, 2.0])
    def test_spend_never_exceeds_budget_plus_one_task(
        self, width: int, budget_usd: float, cost: float, turns: int, cap: float | None
    ) -> None:
        for seed in range(20):
            spent = simulate(
                budget_usd=budget_usd,
                cost=cost,
                turns=turns,
                width=width,
                tasks=12,
                cap=cap,
                seed=seed,
            )
            assert spent <= budget_usd + cost + 1e-9, (seed, spent)

    @pytest.mark.parametrize("width", [2, 4, 8, 16])
    @pytest.mark.parametrize("turns", [3, 8])
    def test_a_cheap_first_task_does_not_open_the_flood_gates(self, width: int, turns: int) -> None:
        for seed in range(20):
            spent = simulate(
                budget_usd=1.10,
                cost=0.36,
                turns=turns,
                width=width,
                tasks=12,
                cap=2.0,
                seed=seed,
                first_cost=0.01,
            )
            assert spent <= 1.10 + 0.36, (seed, spent)

    def test_the_drill_from_the_issue(self) -> None:
        # 8 tasks at $0.36, a $1.10 budget, width 4: it used to spend $2.52.
        spent = simulate(budget_usd=1.10, cost=0.36, turns=3, width=4, tasks=8, cap=2.0, seed=1)
        assert spent <= 1.10 + 0.36

    def test_the_old_rule_breaks_the_bound(self) -> None:
        """The control: counting only finished sessions overshoots, as the issue saw."""
        spent = simulate(
            budget_usd=1.10, cost=0.36, turns=3, width=4, tasks=8, cap=2.0, seed=1, naive=True
        )
        assert spent > 1.10 + 0.36
