"""A flow that runs one worker: ``claudecluster task`` uses it to try a single session."""

from __future__ import annotations

from prefect import flow

from claudecluster.models import TaskResult, WorkUnit
from claudecluster.tasks.worker import run_unit


@flow(name="claudecluster-task", flow_run_name="task-{unit.run_id}", log_prints=False)
async def single_task_flow(unit: WorkUnit) -> TaskResult:
    """Run one task as a worker task and return its result."""
    return await run_unit(unit)
