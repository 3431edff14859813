"""The worker flow: one WorkUnit as its own flow run, so it can run on any work pool.

The driver dispatches a task here through the pool's worker deployment (one deployment per
pool, see ``deployments/prefect.yaml``). The flow runs the worker task and returns a
persisted TaskResult the driver reads back. The run is a child of the goal's flow run in the
UI, and is cancelled with it.
"""

from __future__ import annotations

import uuid

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import State
from prefect.states import Failed

from claudecluster import telemetry
from claudecluster.lost_workers import MAX_RUNS
from claudecluster.models import FailureReason, TaskResult, WorkUnit
from claudecluster.pools import WORKER_FLOW_NAME
from claudecluster.tasks.worker import as_state, run_unit

# Before any flow run starts, so Prefect's own spans go to the collector too.
telemetry.setup()


@flow(
    name=WORKER_FLOW_NAME,
    flow_run_name="{unit.run_id}-{unit.spec.id}",
    persist_result=True,
    log_prints=False,
)
async def worker_flow(unit: WorkUnit) -> State[TaskResult]:
    """Run one task in its own worktree and branch; the run fails unless the task did its work.

    The TaskResult is the run's (persisted) data either way. A result storage this worker
    cannot write is found before the session starts, so nothing is paid for a result that
    could not come back.

    Args:
        unit: The task and everything its worker needs (see WorkUnit).
    """
    from prefect.runtime import flow_run

    runs = int(flow_run.run_count or 1)
    if runs > 1:
        # Put back to Scheduled (by the lost-worker automation, or a Retry in the UI).
        get_run_logger().warning(
            "run %d of this task's flow run: an earlier run did not finish (its worker "
            "stopped sending heartbeats, or it was retried)",
            runs,
        )
    if runs > MAX_RUNS:
        message = f"its worker machine was lost {runs - 1} times; not trying again"
        get_run_logger().error("not started: %s", message)
        return Failed(message=f"{FailureReason.WORKER_LOST}: {message}")
    problem = await result_storage_problem()
    if problem is not None:
        get_run_logger().error("not started: %s", problem)
        return Failed(message=f"{FailureReason.RESULT_STORAGE}: {problem}")
    return as_state(await run_unit(unit))


async def result_storage_problem() -> str | None:
    """Why this process cannot persist results to its configured storage block, or None.

    Only a configured block is tried (``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``): a small
    file is written, read back and left (under ``claudecluster-probe/``). Without one the
    results go to the local disk, and the driver rebuilds a result it cannot read from the
    task branch.
    """
    from prefect.blocks.core import Block
    from prefect.settings import get_current_settings

    slug = get_current_settings().results.default_storage_block
    if not slug:
        return None
    probe = f"claudecluster-probe/{uuid.uuid4().hex}"
    try:
        block = await Block.aload(slug)
        await block.write_path(probe, b"ok")  # type: ignore[attr-defined]
        if await block.read_path(probe) != b"ok":  # type: ignore[attr-defined]
            return f"result storage {slug} did not give back what was written to it"
    except Exception as exc:  # any failure: what it is matters more than its class
        return (
            f"cannot persist results to {slug}: {type(exc).__name__}: {str(exc)[:300]}; "
            "install what it needs in the worker image (EXTRA_PACKAGES) or choose another "
            "block with claudecluster setup --result-storage"
        )
    return None
