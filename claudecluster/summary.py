"""The RunReport of a goal: per-task results, integration outcome, totals and verdict."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from claudecluster.integrate import IntegrationOutcome
from claudecluster.models import (
    BudgetSummary,
    FailureReason,
    RunReport,
    RunStatus,
    RunTotals,
    TaskResult,
    TaskStatus,
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
    budget_usd: float | None = None,
) -> RunReport:
    """The RunReport of a finished run."""
    ordered = [results[task.id] for task in plan.tasks if task.id in results]
    merged_files = {f.path for r in ordered if r.id in integration.merged for f in r.files}
    totals = _totals(
        ordered,
        planner,
        started,
        extra_cost_usd=integration.resolution_cost_usd,
        files_changed=len(merged_files),
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
    budget = _budget(budget_usd, totals, ordered)
    if budget is not None and budget.not_started:
        problems.append(
            "not started because the goal's budget was spent: " + ", ".join(budget.not_started)
        )
    if budget is not None and budget.stopped:
        problems.append(
            "stopped because the goal's budget was spent (work kept on their branches): "
            + ", ".join(budget.stopped)
        )
    unreachable = next(
        (
            r
            for r in ordered
            if r.failure_reason is FailureReason.API_UNREACHABLE
            and r.turns == 0
            and r.status is not TaskStatus.SKIPPED
        ),
        None,
    )
    if unreachable is not None:
        problems.insert(0, unreachable.error or "model API unreachable")
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
        budget=budget,
    )


def planning_failed_report(
    run_id: str,
    goal: str,
    repo: str,
    base: str,
    planner: TaskResult,
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
        planner=planner,
        totals=RunTotals(
            cost_usd=planner.cost_usd,
            turns=planner.turns,
            duration_s=round(time.monotonic() - started, 3),
        ),
        flow_run_id=flow_run_id,
        error=planner.error,
    )


def interrupted_report(
    *,
    run_id: str,
    goal: str,
    repo: str,
    base_commit: str,
    plan: Plan,
    results: dict[str, TaskResult],
    planner: TaskResult | None,
    started: float,
    lost_at: float | None,
    budget_usd: float | None = None,
    flow_run_id: str | None = None,
) -> RunReport:
    """The report of a run whose Prefect server stopped answering: what finished (committed,
    kept on its branch), what did not, and how to finish it."""
    ordered = [results[task.id] for task in plan.tasks if task.id in results]
    finished = [r.id for r in ordered if r.status.ok]
    when = datetime.fromtimestamp(lost_at or time.time(), UTC).strftime("%H:%M:%S UTC")
    error = (
        f"the Prefect server stopped answering at {when}; {len(finished)} of "
        f"{len(plan.tasks)} tasks finished and are kept on their branches, nothing was "
        f"merged; finish the run with: claudecluster resume {run_id}"
    )
    totals = _totals(ordered, planner, started)
    return RunReport(
        run_id=run_id,
        goal=goal,
        status=RunStatus.FAILED,
        repo=repo,
        base_commit=base_commit,
        tasks=ordered,
        planner=planner,
        totals=totals,
        flow_run_id=flow_run_id,
        error=error,
        budget=_budget(budget_usd, totals, ordered),
        interrupted=True,
    )


def _totals(
    ordered: list[TaskResult],
    planner: TaskResult | None,
    started: float,
    *,
    extra_cost_usd: float = 0.0,
    files_changed: int = 0,
) -> RunTotals:
    sessions = [*ordered, *([planner] if planner else [])]
    usage = sum((r.usage for r in sessions), TokenUsage())
    return RunTotals(
        cost_usd=round(sum(r.cost_usd for r in sessions) + extra_cost_usd, 6),
        usage=usage,
        tokens=usage.total,
        duration_s=round(time.monotonic() - started, 3),
        turns=sum(r.turns for r in sessions),
        api_retries=sum(r.api_retries for r in sessions),
        files_changed=files_changed,
        added=sum(r.added for r in ordered),
        removed=sum(r.removed for r in ordered),
    )


def _budget(
    budget_usd: float | None, totals: RunTotals, ordered: list[TaskResult]
) -> BudgetSummary | None:
    if budget_usd is None:
        return None
    over = [r for r in ordered if r.failure_reason is FailureReason.GOAL_BUDGET]
    return BudgetSummary(
        budget_usd=budget_usd,
        spent_usd=totals.cost_usd,
        stopped=[r.id for r in over if r.status is not TaskStatus.SKIPPED],
        not_started=[r.id for r in over if r.status is TaskStatus.SKIPPED],
    )


def run_table_rows(report: RunReport) -> list[dict[str, object]]:
    """One row per task for the run-level table artifact."""
    rows: list[dict[str, object]] = []
    unmerged = {u.id for u in report.unmerged}
    for result in report.tasks:
        tests = "-"
        if result.test_report is not None:
            t = result.test_report
            tests = (
                f"{t.passed} passed, {t.failed} failed"
                if t.passed is not None
                else ("ok" if t.ok else f"exit {t.exit_code}")
            )
        rows.append(
            {
                "task": result.id,
                "kind": result.kind,
                "status": str(result.status) + (" (unmerged)" if result.id in unmerged else ""),
                "files": len(result.files),
                "+lines": result.added,
                "-lines": result.removed,
                "tests": tests,
                "turns": result.turns,
                "cost_usd": round(result.cost_usd, 4),
                "duration_s": round(result.duration_s, 1),
            }
        )
    return rows
