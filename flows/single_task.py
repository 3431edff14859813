"""A flow that runs one worker: ``claudecluster task`` uses it to try a single session."""

from __future__ import annotations

from prefect import flow

from claudecluster.models import TaskResult, TaskSpec, WorkerSettings
from claudecluster.tasks.worker import result_of_state, worker_state


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
    state = await worker_state(
        repo=repo,
        base_commit=base_commit,
        spec=spec,
        settings=settings,
        run_id=run_id,
        verify=verify,
        worktree_root=worktree_root,
    )
    return await result_of_state(state, spec, base_commit)
