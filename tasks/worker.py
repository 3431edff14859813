"""The worker task: one Claude Code session on one TaskSpec, as a Prefect task run.

Its log carries the session's messages as they happen (assistant text, tool calls, tool
results, the final result); its artifacts carry the diff and the test report.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from claudecluster.artifacts import publish_task_artifacts
from claudecluster.models import TaskResult, TaskSpec, WorkerSettings
from claudecluster.worker import execute_task


@task(name="claude-worker", task_run_name="{spec.id}", cache_policy=NONE)
async def run_worker(
    repo: str,
    base_commit: str,
    spec: TaskSpec,
    settings: WorkerSettings,
    run_id: str,
    verify: str | None = None,
    worktree_root: str | None = None,
    keep_worktree: bool = False,
) -> TaskResult:
    """Run one task in its own worktree and branch; return its TaskResult."""
    logger = get_run_logger()
    logger.info("task %s: %s", spec.id, spec.title)
    result = await execute_task(
        repo,
        base_commit,
        spec,
        settings,
        run_id,
        verify=verify,
        worktree_root=Path(worktree_root) if worktree_root else None,
        keep_worktree=keep_worktree,
        log=logger.info,
    )
    publish_task_artifacts(result, run_id)
    logger.info(
        "task %s %s: %d files, +%d/-%d, %d turns, $%.4f%s",
        spec.id,
        result.status,
        len(result.files),
        result.added,
        result.removed,
        result.turns,
        result.cost_usd,
        f" ({result.error})" if result.error else "",
    )
    return result
