"""The RunReport of a goal: per-task results, integration outcome, totals and verdict."""

from __future__ import annotations

import time

from claudecluster.errors import PlannerError
from claudecluster.integrate import IntegrationOutcome
from claudecluster.models import (
    FailureReason,
    RunReport,
    RunStatus,
    RunTotals,
    TaskResult,
    TokenUsage,
)
from claudecluster.plan import Plan


def build_report(
    *,
    run_id: str,
    goal: str,
    repo: str,
    base_commit: str,
    plan: Plan,
    results: dict[str, TaskResult],
    integration: IntegrationOutcome,
    planner: TaskResult | None,
    started: float,
    flow_run_id: str | None = None,
) -> RunReport:
    """The RunReport of a finished run."""
    ordered = [results[task.id] for task in plan.tasks if task.id in results]
    sessions = [*ordered, *([planner] if planner else [])]
    usage = sum((r.usage for r in sessions), TokenUsage())
    merged_files = {f.path for r in ordered if r.id in integration.merged for f in r.files}
    totals = RunTotals(
        cost_usd=round(sum(r.cost_usd for r in sessions) + integration.resolution_cost_usd, 6),
        usage=usage,
        tokens=usage.total,
        duration_s=round(time.monotonic() - started, 3),
        turns=sum(r.turns for r in sessions),
        api_retries=sum(r.api_retries for r in sessions),
        files_changed=len(merged_files),
        added=sum(r.added for r in ordered),
        removed=sum(r.removed for r in ordered),
    )
    succeeded = (
        len(ordered) == len(plan.tasks)
        and all(r.status.ok for r in ordered)
        and not integration.unmerged
        and (integration.final_verify is None or integration.final_verify.ok)
    )
    problems = []
    if not all(r.status.ok for r in ordered):
        bad = [f"{r.id} {r.status}" for r in ordered if not r.status.ok]
        problems.append("tasks not succeeded: " + ", ".join(bad))
    over_budget = [r.id for r in ordered if r.failure_reason is FailureReason.GOAL_BUDGET]
    if over_budget:
        problems.append(
            "not started because the goal's budget was spent: " + ", ".join(over_budget)
        )
    if integration.unmerged:
        problems.append("not merged: " + ", ".join(u.id for u in integration.unmerged))
    if integration.final_verify is not None and not integration.final_verify.ok:
        problems.append("final verify failed")
    return RunReport(
        run_id=run_id,
        goal=goal,
        status=RunStatus.SUCCEEDED if succeeded else RunStatus.FAILED,
        repo=repo,
        base_commit=base_commit,
        integration_branch=integration.branch,
        head_commit=integration.head_commit,
        final_verify=integration.final_verify,
        tasks=ordered,
        unmerged=integration.unmerged,
        resolved=integration.resolved,
        planner=planner,
        totals=totals,
        flow_run_id=flow_run_id,
        error="; ".join(problems) or None,
    )


def planning_failed_report(
    run_id: str,
    goal: str,
    repo: str,
    base: str,
    exc: PlannerError,
    started: float,
    flow_run_id: str | None = None,
) -> RunReport:
    """The report of a run whose planner produced no usable plan (with the planner's cost)."""
    return RunReport(
        run_id=run_id,
        goal=goal,
        status=RunStatus.FAILED,
        repo=repo,
        base_commit=base,
        totals=RunTotals(
            cost_usd=exc.cost_usd,
            turns=exc.turns,
            duration_s=round(time.monotonic() - started, 3),
        ),
        flow_run_id=flow_run_id,
        error=exc.one_line(),
    )
