"""A flow that runs one worker: ``claudecluster task`` uses it to try a single session."""

from __future__ import annotations

from prefect import flow

from claudecluster.models import TaskResult, TaskSpec, WorkerSettings
from claudecluster.tasks.worker import run_worker


@flow(name="claudecluster-task", flow_run_name="task-{run_id}", log_prints=False)
async def single_task_flow(
    repo: str,
    base_commit: str,
    spec: TaskSpec,
    settings: WorkerSettings,
    run_id: str,
    verify: str | None = None,
    worktree_root: str | None = None,
) -> TaskResult:
    """Run one TaskSpec as a worker task and return its result."""
    return await run_worker(
        repo, base_commit, spec, settings, run_id, verify=verify, worktree_root=worktree_root
    )
