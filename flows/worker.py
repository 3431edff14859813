"""The worker flow: one WorkUnit as its own flow run, so it can run on any work pool.

The driver dispatches a task here through the pool's worker deployment (one deployment per
pool, see ``deployments/prefect.yaml``). The flow runs the worker task and returns a
persisted TaskResult the driver reads back. The run is a child of the goal's flow run in the
UI, and is cancelled with it.
"""

from __future__ import annotations

from prefect import flow
from prefect.client.schemas.objects import State

from claudecluster.models import TaskResult, WorkUnit
from claudecluster.pools import WORKER_FLOW_NAME
from claudecluster.tasks.worker import as_state, run_unit


@flow(
    name=WORKER_FLOW_NAME,
    flow_run_name="{unit.run_id}-{unit.spec.id}",
    persist_result=True,
    log_prints=False,
)
async def worker_flow(unit: WorkUnit) -> State[TaskResult]:
    """Run one task in its own worktree and branch; the run fails unless the task did its work.

    The TaskResult is the run's (persisted) data either way.

    Args:
        unit: The task and everything its worker needs (see WorkUnit).
    """
    return as_state(await run_unit(unit))
