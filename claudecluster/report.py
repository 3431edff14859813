"""Human-readable terminal output for task results and run reports."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from claudecluster.models import TaskResult, TaskStatus

_STATUS_STYLE = {
    TaskStatus.SUCCEEDED: "green",
    TaskStatus.NO_CHANGES: "yellow",
    TaskStatus.FAILED: "red",
    TaskStatus.ERROR: "red",
    TaskStatus.SKIPPED: "dim",
}


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def print_task_result(result: TaskResult, console: Console | None = None) -> None:
    """A short, readable summary of one TaskResult."""
    out = console or _console()
    style = _STATUS_STYLE.get(result.status, "")
    out.print(f"[bold]{result.title or result.id}[/bold]  [{style}]{result.status}[/{style}]")
    if result.error:
        out.print(f"  reason: {result.failure_reason}: {result.error}")
    if result.branch:
        out.print(f"  branch: {result.branch} ({(result.head_commit or '')[:12]})")
    if result.files:
        table = Table(box=None, show_header=False, padding=(0, 1))
        for change in result.files:
            table.add_row(
                f"  {change.path}", f"[green]+{change.added}[/]", f"[red]-{change.removed}[/]"
            )
        out.print(table)
    if result.test_report:
        report = result.test_report
        counts = ""
        if report.passed is not None:
            counts = f" ({report.passed} passed, {report.failed} failed, {report.skipped} skipped)"
        verdict = "passed" if report.ok else "FAILED"
        out.print(f"  verify: `{report.command}` {verdict}{counts}")
    for denial in result.permission_denials:
        out.print(f"  denied: {denial.tool_name} {denial.tool_input}")
    out.print(
        f"  session {result.session_id or '-'}: {result.turns} turns, ${result.cost_usd:.4f}, "
        f"{result.usage.total} tokens, {result.duration_s:.1f} s"
    )
