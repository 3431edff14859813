"""Publish what a worker produced as Prefect artifacts, visible in the Prefect UI.

Per task: a markdown artifact with the diff and its stats, and a table artifact with the
test report. Keys follow Prefect's rule (lowercase letters, digits and dashes), so a run's
artifacts can be found again by key: ``<run-id>-<task-id>-diff`` and ``-tests``.
"""

from __future__ import annotations

import re

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from claudecluster.gitops import cap_text
from claudecluster.models import TaskResult
from claudecluster.redact import redact

ARTIFACT_DIFF_CAP_BYTES = 60_000


def artifact_key(*parts: str) -> str:
    """Join parts into a valid Prefect artifact key."""
    key = "-".join(parts).lower()
    key = re.sub(r"[^a-z0-9-]+", "-", key)
    return re.sub(r"-{2,}", "-", key).strip("-")


def diff_markdown(result: TaskResult) -> str:
    """The markdown body of a task's diff artifact."""
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
    if result.diff:
        body, cut = cap_text(result.diff, ARTIFACT_DIFF_CAP_BYTES)
        if result.diff_truncated and not cut:
            body += "\n[... diff was capped by the worker ...]\n"
        lines += ["```diff", body.rstrip("\n"), "```"]
    return redact("\n".join(lines))


def test_rows(result: TaskResult) -> list[dict[str, object]]:
    """Rows of a task's test-report table artifact."""
    report = result.test_report
    if report is None:
        return [{"command": "-", "exit_code": "-", "result": "no verify command ran"}]
    return [
        {
            "command": report.command,
            "exit_code": "killed" if report.exit_code is None else report.exit_code,
            "result": "passed" if report.ok else ("timed out" if report.timed_out else "failed"),
            "passed": report.passed if report.passed is not None else "-",
            "failed": report.failed if report.failed is not None else "-",
            "skipped": report.skipped if report.skipped is not None else "-",
            "duration_s": report.duration_s,
            "output_tail": redact(report.output_tail[-2000:]),
        }
    ]


def publish_task_artifacts(result: TaskResult, run_id: str) -> None:
    """Create the diff and test-report artifacts of one task in the current run context."""
    create_markdown_artifact(
        key=artifact_key(run_id, result.id, "diff"),
        markdown=diff_markdown(result),
        description=f"Diff of task {result.id}",
    )
    create_table_artifact(
        key=artifact_key(run_id, result.id, "tests"),
        table=test_rows(result),
        description=f"Test report of task {result.id}",
    )
