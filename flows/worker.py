"""The worker flow: one TaskSpec as its own flow run, so it can run on any work pool.

The driver dispatches a task here through the pool's worker deployment (one deployment per
pool, see ``deployments/prefect.yaml``). The flow runs the worker task and returns a
persisted TaskResult the driver reads back. The run is a child of the goal's flow run in the
UI, and is cancelled with it.
"""

from __future__ import annotations

from prefect import flow
from prefect.client.schemas.objects import State

from claudecluster.models import TaskResult, TaskSpec, WorkerSettings
from claudecluster.pools import WORKER_FLOW_NAME
from claudecluster.tasks.worker import as_state, result_of_state, worker_state


@flow(
    name=WORKER_FLOW_NAME,
    flow_run_name="{run_id}-{spec.id}",
    persist_result=True,
    log_prints=False,
)
async def worker_flow(
    repo: str,
    base_commit: str,
    spec: TaskSpec,
    settings: WorkerSettings,
    run_id: str,
    verify: str | None = None,
    dependencies: list[TaskResult] | None = None,
    worktree_root: str | None = None,
    settings_block: str | None = None,
    repo_block: str | None = None,
) -> State[TaskResult]:
    """Run one task in its own worktree and branch; the run fails unless the task did its work.

    The TaskResult is the run's (persisted) data either way.
    """
    state = await worker_state(
        repo=repo,
        base_commit=base_commit,
        spec=spec,
        settings=settings,
        run_id=run_id,
        verify=verify,
        dependencies=dependencies,
        worktree_root=worktree_root,
        settings_block=settings_block,
        repo_block=repo_block,
    )
    return as_state(await result_of_state(state, spec, base_commit))
