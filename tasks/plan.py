"""The plan task: the goal flow's first step, a read-only planner session."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import anyio
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from claudecluster.blocks.settings import resolve_settings
from claudecluster.limits import session_slot
from claudecluster.models import TaskResult, TaskStatus, WorkerSettings
from claudecluster.plan import Plan
from claudecluster.planner import run_planner


@task(name="plan", cache_policy=NONE)
def plan_goal(
    goal: str,
    repo: str,
    base_commit: str,
    settings: WorkerSettings,
    run_id: str,
    max_tasks: int,
    verify: str | None,
    worktree_root: str,
    settings_block: str | None = None,
) -> tuple[Plan, TaskResult]:
    """Ask the planner for a plan; return it with the planner session's accounting."""
    logger = get_run_logger()
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
            log=logger.info,
            session_slot=session_slot,
            env=resolve_settings(None, settings_block)[1] if settings_block else None,
        )
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
