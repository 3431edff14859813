"""The plan task: the goal flow's first step, a read-only planner session."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import anyio
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from claudecluster.errors import PlannerError
from claudecluster.models import FailureReason, TaskResult, TaskStatus, WorkerSettings
from claudecluster.plan import Plan
from claudecluster.planner import run_planner
from claudecluster.session import SessionHost


@task(name="plan", task_run_name="plan", cache_policy=NONE)
def plan_goal(
    goal: str,
    repo: str,
    base_commit: str,
    settings: WorkerSettings,
    max_tasks: int,
    verify: str | None,
    worktree_root: str,
    host: SessionHost,
) -> tuple[Plan | None, TaskResult]:
    """Ask the planner for a plan; return it with the planner session's accounting.

    A planner that produced no usable plan is a failed accounting (with what the session
    cost and why, in one line) and no plan, not an exception: the run reports it.
    """
    logger = get_run_logger()
    try:
        plan, outcome = anyio.run(
            partial(
                run_planner,
                goal,
                repo,
                base_commit,
                settings,
                max_tasks=max_tasks,
                verify=verify,
                worktree_root=Path(worktree_root),
                host=host.with_log(logger.info),
            )
        )
    except PlannerError as exc:
        logger.error("the planner produced no usable plan: %s", exc.one_line())
        return None, TaskResult(
            id="plan",
            title="Planner",
            status=TaskStatus.FAILED,
            failure_reason=FailureReason.SESSION_ERROR,
            error=exc.one_line(),
            base_commit=base_commit,
            turns=exc.turns,
            cost_usd=exc.cost_usd,
        )
    accounting = TaskResult(
        id="plan",
        title="Planner",
        status=TaskStatus.SUCCEEDED,
        base_commit=base_commit,
        session_id=outcome.session_id,
        turns=outcome.turns,
        cost_usd=outcome.cost_usd,
        usage=outcome.usage,
        duration_s=outcome.duration_s,
    )
    return plan, accounting
