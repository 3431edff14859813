"""Human-readable terminal output for task results and run reports."""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from claudecluster.models import ProgressEvent, RunReport, TaskResult, TaskStatus

_STATUS_STYLE = {
    TaskStatus.SUCCEEDED: "green",
    TaskStatus.NO_CHANGES: "yellow",
    TaskStatus.FAILED: "red",
    TaskStatus.ERROR: "red",
    TaskStatus.SKIPPED: "dim",
}


def _console() -> Console:
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        # Piped output has no width; 80 columns would truncate task ids in the table.
        console = Console(highlight=False, soft_wrap=True, width=120)
    return console


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


def print_run_report(report: RunReport, console: Console | None = None) -> None:
    """The final summary of a run: per-task table, branch, verify, totals, UI link."""
    out = console or _console()
    table = Table(title=f"run {report.run_id}", title_justify="left")
    for column in ("task", "kind", "status", "files", "+/-", "tests", "turns", "cost", "time"):
        table.add_column(
            column, justify="right" if column in {"files", "turns", "cost"} else "left"
        )
    unmerged = {u.id for u in report.unmerged}
    for result in report.tasks:
        style = _STATUS_STYLE.get(result.status, "")
        status = f"[{style}]{result.status}[/{style}]" + (
            " unmerged" if result.id in unmerged else ""
        )
        tests = "-"
        if result.test_report is not None:
            t = result.test_report
            tests = (
                f"{t.passed}/{(t.passed or 0) + (t.failed or 0)}"
                if t.passed is not None
                else ("ok" if t.ok else "failed")
            )
        table.add_row(
            result.id + (" (cached)" if result.cached else ""),
            result.kind,
            status,
            str(len(result.files)),
            f"+{result.added}/-{result.removed}",
            tests,
            str(result.turns),
            f"${result.cost_usd:.3f}",
            f"{result.duration_s:.0f}s",
        )
    out.print(table)
    for result in report.tasks:
        if result.error:
            out.print(f"  [bold]{result.id}[/bold]: {result.error}")
    for item in report.unmerged:
        out.print(f"  [yellow]not merged[/yellow] {item.id} ({item.branch}): {item.reason}")
    verdict = "[green]succeeded[/green]" if report.status == "succeeded" else "[red]FAILED[/red]"
    out.print(f"\nRun {report.run_id} {verdict}: {report.goal}")
    if report.error:
        out.print(f"  error:   {report.error}")
    if report.integration_branch:
        out.print(f"  branch:  {report.integration_branch} ({(report.head_commit or '')[:12]})")
    if report.final_verify is not None:
        fv = report.final_verify
        counts = f" ({fv.passed} passed, {fv.failed} failed)" if fv.passed is not None else ""
        out.print(f"  verify:  `{fv.command}` {'passed' if fv.ok else 'FAILED'}{counts}")
    if report.pull_request is not None:
        pr = report.pull_request
        what = "compare" if pr.number is None else f"#{pr.number}" + (" draft" if pr.draft else "")
        verb = "opened" if pr.created else ("pushed" if pr.number is None else "updated")
        out.print(f"  PR:      {pr.url} ({what}, {verb})", soft_wrap=True)
    totals = report.totals
    out.print(
        f"  totals:  {len(report.tasks)} tasks, ${totals.cost_usd:.4f}, {totals.tokens} tokens, "
        f"+{totals.added}/-{totals.removed} lines, {totals.duration_s:.1f} s"
        + (f", {totals.api_retries} API retries" if totals.api_retries else "")
    )
    if report.ui_url:
        out.print(f"  Prefect: {report.ui_url}")
    if report.trace_id:
        out.print(f"  trace:   {report.trace_url or report.trace_id}", soft_wrap=True)


class LiveProgress:
    """A live terminal line for a running goal: done, running, failed, cost so far."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, highlight=False)
        # Live re-renders this object four times a second, so the clock keeps ticking.
        self._live = Live(self, console=self.console, refresh_per_second=4, transient=True)
        self._event: ProgressEvent | None = None
        self._started = time.monotonic()

    def __enter__(self) -> LiveProgress:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.__exit__(None, None, None)

    def __rich__(self) -> Text:
        return self._render()

    def _render(self) -> Text:
        elapsed = time.monotonic() - self._started
        event = self._event
        if event is None:
            return Text(f"starting... {elapsed:.0f}s", style="dim")
        if event.kind == "planning":
            return Text(f"planning... {elapsed:.0f}s", style="dim")
        done_ok = len(event.done) - len(event.failed)
        line = Text()
        line.append(f"{len(event.done)}/{event.total} done", style="bold")
        line.append(f"  {done_ok} ok", style="green")
        if event.failed:
            line.append(f"  {len(event.failed)} failed", style="red")
        line.append(f"  {len(event.running)} running", style="cyan")
        line.append(f"  ${event.cost_usd:.3f}  {elapsed:.0f}s")
        if event.running:
            line.append("  [" + ", ".join(event.running[:6]) + "]", style="dim")
        if event.kind == "integrating":
            line.append("  merging...", style="yellow")
        return line

    def __call__(self, event: ProgressEvent) -> None:
        self._event = event
        if event.kind == "finished" and event.task is not None:
            task = event.task
            style = _STATUS_STYLE.get(task.status, "")
            self.console.print(
                f"  [{style}]{task.status:>10}[/{style}] {task.id}"
                + (f": {task.error}" if task.error and task.status != "succeeded" else "")
            )
