"""Publish what a run produced as Prefect artifacts, visible in the Prefect UI.

Per task: a markdown artifact with the diff and its stats, and a table artifact with the
test report. Per run: the plan, a table of the tasks and a summary. Keys are stable across
runs of the same goal or deployment (:func:`claudecluster.naming.artifact_scope`):
``<scope>-<task-id>-diff``, ``<scope>-<task-id>-tests``, ``<scope>-plan``, ``<scope>-tasks``,
``<scope>-summary`` and ``<scope>-progress``, so Prefect keeps each key's history; every
artifact also belongs to its run, so a run's page shows its own.
"""

from __future__ import annotations

from prefect.artifacts import (
    create_markdown_artifact,
    create_table_artifact,
)

from claudecluster.gitops import cap_text
from claudecluster.models import RunReport, TaskResult
from claudecluster.naming import REPORT_ARTIFACT_TYPE, artifact_key
from claudecluster.plan import Plan
from claudecluster.redact import redact
from claudecluster.summary import run_table_rows

ARTIFACT_DIFF_CAP_BYTES = 60_000


def task_markdown(result: TaskResult) -> str:
    """A task's artifact: its status, files, test report and diff, in one markdown body."""
    lines = [
        f"# {result.title or result.id}",
        "",
        f"**Task** `{result.id}` ({result.kind}) — **status** `{result.status}`"
        + (f" ({result.failure_reason})" if result.failure_reason else ""),
        "",
        f"**Branch** `{result.branch or '-'}` · base `{result.base_commit[:12]}` · "
        f"head `{(result.head_commit or result.base_commit)[:12]}`",
        "",
    ]
    if result.error:
        lines += [f"> {result.error}", ""]
    if result.files:
        lines += ["| file | change | + | - |", "|---|---|---:|---:|"]
        lines += [f"| `{f.path}` | {f.change} | {f.added} | {f.removed} |" for f in result.files]
        lines += [f"| **total** | | **{result.added}** | **{result.removed}** |", ""]
    else:
        lines += ["No files changed.", ""]
    lines += _test_report_lines(result)
    if result.diff:
        body, cut = cap_text(result.diff, ARTIFACT_DIFF_CAP_BYTES)
        if result.diff_truncated and not cut:
            body += "\n[... diff was capped by the worker ...]\n"
        lines += ["## Diff", "", "```diff", body.rstrip("\n"), "```"]
    return redact("\n".join(lines))


def _test_report_lines(result: TaskResult) -> list[str]:
    """The test-report section of a task's artifact: the verify command's outcome."""
    report = result.test_report
    lines = ["## Test report", ""]
    if report is None:
        return [*lines, "No verify command ran.", ""]
    outcome = "passed" if report.ok else ("timed out" if report.timed_out else "failed")
    exit_code = "killed" if report.exit_code is None else report.exit_code

    def count(value: int | None) -> str:
        return "-" if value is None else str(value)

    lines += [
        "| command | exit code | result | passed | failed | skipped | duration s |",
        "|---|---:|---|---:|---:|---:|---:|",
        f"| `{report.command}` | {exit_code} | {outcome} | {count(report.passed)} | "
        f"{count(report.failed)} | {count(report.skipped)} | {report.duration_s:.2f} |",
        "",
    ]
    if report.output_tail:
        lines += ["```text", report.output_tail[-2000:].rstrip("\n"), "```", ""]
    return lines


def publish_task_artifacts(result: TaskResult, scope: str) -> None:
    """Create the artifact of one task (diff and test report) in the current run context.

    One artifact, not one per part: each is a server write and two events.
    """
    create_markdown_artifact(
        key=artifact_key(scope, result.id, "diff"),
        markdown=task_markdown(result),
        description=f"Diff and test report of task {result.id}",
    )


def plan_markdown(plan: Plan) -> str:
    """The plan as a markdown artifact body."""
    lines = [f"# Plan: {plan.goal or '(no goal)'}", ""]
    if plan.verify:
        lines += [f"Verify: `{plan.verify}`", ""]
    lines += ["| id | kind | title | paths | depends on |", "|---|---|---|---|---|"]
    for task in plan.tasks:
        lines.append(
            f"| `{task.id}` | {task.kind} | {task.title} | {', '.join(task.paths) or '-'} | "
            f"{', '.join(task.depends_on) or '-'} |"
        )
    return redact("\n".join(lines))


def run_summary_markdown(report: RunReport, plan: Plan | None) -> str:
    """The run's markdown summary: goal, plan, branch, final verify, totals."""
    verdict = "succeeded" if report.status == "succeeded" else "FAILED"
    lines = [
        f"# ClaudeCluster run {report.run_id}: {verdict}",
        "",
        f"**Goal:** {report.goal}",
        "",
        f"**Repository:** `{report.repo}` · base `{report.base_commit[:12]}`",
        "",
        f"**Integration branch:** `{report.integration_branch or '-'}` · head "
        f"`{(report.head_commit or '-')[:12]}`",
        "",
    ]
    if report.error:
        lines += [f"> {report.error}", ""]
    if report.pull_request is not None:
        pr = report.pull_request
        what = f"#{pr.number}" + (" (draft)" if pr.draft else "") if pr.number else "compare"
        lines += [f"**Pull request:** [{what}]({pr.url}) · `{pr.head}` → `{pr.base}`", ""]
    if report.trace_id:
        trace = (
            f"[`{report.trace_id}`]({report.trace_url})"
            if report.trace_url
            else (f"`{report.trace_id}`")
        )
        lines += [f"**Trace:** {trace}", ""]
    if report.final_verify is not None:
        fv = report.final_verify
        counts = f" ({fv.passed} passed, {fv.failed} failed)" if fv.passed is not None else ""
        lines += [
            f"**Final verify:** `{fv.command}` {'passed' if fv.ok else 'FAILED'}{counts}",
            "",
        ]
    if plan is not None:
        lines += ["## Plan", ""]
        for task in plan.tasks:
            after = f" (after {', '.join(task.depends_on)})" if task.depends_on else ""
            lines.append(f"- `{task.id}` {task.kind}: {task.title}{after}")
        lines.append("")
    if report.tasks:
        lines += [
            "## Tasks",
            "",
            "| task | kind | status | files | + | - | tests | turns | cost |",
            "|---|---|---|---:|---:|---:|---|---:|---:|",
        ]
        for row in run_table_rows(report):
            lines.append(
                f"| `{row['task']}` | {row['kind']} | {row['status']} | {row['files']} | "
                f"{row['+lines']} | {row['-lines']} | {row['tests']} | {row['turns']} | "
                f"${row['cost_usd']} |"
            )
        lines.append("")
    if report.unmerged:
        lines += ["## Not merged", ""]
        lines += [f"- `{u.id}` ({u.branch or 'no branch'}): {u.reason}" for u in report.unmerged]
        lines.append("")
    totals = report.totals
    lines += [
        "## Totals",
        "",
        f"- tasks: {len(report.tasks)}, cost ${totals.cost_usd:.4f}, tokens {totals.tokens}, "
        f"turns {totals.turns}",
        f"- lines +{totals.added} / -{totals.removed}, duration {totals.duration_s:.1f} s",
        f"- API calls retried after 429/529: {totals.api_retries}",
    ]
    return redact("\n".join(lines))


def publish_run_artifacts(report: RunReport, plan: Plan | None, scope: str) -> None:
    """Create the run-level table, summary and report artifacts in the current run context."""
    publish_report_artifact(report, scope)
    create_table_artifact(
        key=artifact_key(scope, "tasks"),
        table=run_table_rows(report) or [{"task": "-", "status": "no tasks ran"}],
        description=f"Tasks of run {report.run_id}",
    )
    create_markdown_artifact(
        key=artifact_key(scope, "summary"),
        markdown=run_summary_markdown(report, plan),
        description=f"Summary of run {report.run_id}",
    )


def publish_plan_artifact(plan: Plan, scope: str) -> None:
    """Create the plan's artifact in the current run context."""
    create_markdown_artifact(
        key=artifact_key(scope, "plan"), markdown=plan_markdown(plan), description="The plan"
    )


def publish_report_artifact(report: RunReport, scope: str) -> None:
    """The RunReport itself, as JSON, where anything that reads Prefect's API finds it.

    An artifact of type :data:`REPORT_ARTIFACT_TYPE` on the goal's flow run whose ``data``
    is the report (what ``claudecluster run --json`` prints): how the TypeScript SDK's
    ``report()`` reads a run's outcome without any file of the host that ran it.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    flow_run = context.flow_run if context else None
    with get_client(sync_client=True) as client:
        client.create_artifact(
            artifact=ArtifactCreate(
                key=artifact_key(scope, "report"),
                type=REPORT_ARTIFACT_TYPE,
                description=f"RunReport of run {report.run_id} (JSON)",
                data=report.model_dump(mode="json"),
                flow_run_id=flow_run.id if flow_run else None,
            )
        )
