"""The worker task: one WorkUnit as a Prefect task run (one Claude Code session).

Its log carries the session's messages as they happen (assistant text, tool calls, tool
results, the final result); its artifact carries the diff and the test report.

The task run ends Completed when the task succeeded (or had nothing to change) and Failed
otherwise, with the TaskResult as its data either way. That gives Prefect's machinery its
usual meaning:

- resume: a completed worker is cached (persisted result, keyed by run, task spec, settings
  and starting commits), so re-running a run re-runs only what failed or never ran, and paid
  work is not paid again;
- retries: a session that crashed or lost its API is retried (``WorkerSettings.retries``,
  ``retry_delay_s``) from a clean worktree; its earlier work stays on an attempts branch.

A local run's dispatcher passes each task a :class:`~claudecluster.session.SessionHost`
holding one of the run's session places and its credentials. Without one (a worker flow on a
work pool) the task takes its own slot of the cluster-wide session limit and loads the
credentials from the unit's settings block itself, so secrets never travel as parameters.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, cast

from prefect import Task, get_run_logger, task
from prefect.client.schemas.objects import State
from prefect.context import TaskRunContext
from prefect.states import Completed, Failed
from prefect.utilities.asyncutils import run_coro_as_sync

from claudecluster import telemetry
from claudecluster.artifacts import publish_task_artifacts
from claudecluster.blocks.repository import git_env_from_block
from claudecluster.blocks.settings import session_env_from_block
from claudecluster.concurrency import session_slot
from claudecluster.models import FailureReason, TaskResult, TaskStatus, WorkerSettings, WorkUnit
from claudecluster.session import SessionHost
from claudecluster.worker import execute_task

RETRYABLE = (FailureReason.SESSION_ERROR, FailureReason.API_ERROR)


def worker_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """A completed worker's cache key: same run, spec, settings and starting point."""
    unit: WorkUnit = parameters["unit"]
    return f"claudecluster-{unit.run_id}-{unit.spec.id}-{unit.fingerprint()}"


def crashed(task: Any, task_run: Any, state: State[Any]) -> bool:
    """Retry only sessions that crashed or lost the API; limits and failed tests are final."""
    return (state.message or "").startswith(tuple(str(r) for r in RETRYABLE))


def as_state(result: TaskResult) -> State[TaskResult]:
    """Completed for a task that did its work, Failed otherwise; the result rides along.

    The message says how the task ended and what it cost, in the run's state itself: a
    driver whose result storage is out of reach still learns it (see
    :func:`claudecluster.dispatch.recover_result`).
    """
    spent = f"(${result.cost_usd:.4f}, {result.turns} turns)"
    if result.status.ok:
        return Completed(data=result, message=f"{result.status} {spent}")
    reason = result.failure_reason or result.status
    return Failed(data=result, message=f"{reason}: {result.error or result.status} {spent}")


@task(
    name="claude-worker",
    task_run_name="{unit.spec.id}",
    cache_key_fn=worker_cache_key,
    persist_result=True,
    retry_condition_fn=crashed,
)
def run_worker(unit: WorkUnit, host: SessionHost | None = None) -> State[TaskResult]:
    """Run one task in its own worktree and branch; return its TaskResult.

    ``host`` is how the session runs (a local run's place and credentials); without one the
    session takes a cluster-wide session slot and the settings block's credentials.

    A synchronous task around the asynchronous session: Prefect then runs it with the flow's
    own client (an asynchronous task run builds a client of its own, with its TLS context and
    CSRF token, in every task run's thread), which is most of what a task run costs.
    """
    logger = get_run_logger()
    telemetry.set_attributes(
        {
            telemetry.RUN_ID: unit.run_id,
            telemetry.TASK_ID: unit.spec.id,
            telemetry.TASK_KIND: str(unit.spec.kind),
            telemetry.POOL: unit.pool,
        }
    )
    result = _run_coroutine(_execute(unit, host, logger.info))
    if unit.publish_artifacts:
        publish_task_artifacts(result, unit.artifact_scope or unit.run_id)
    logger.info(
        "task %s %s: %d files, +%d/-%d, %d turns, $%.4f%s",
        unit.spec.id,
        result.status,
        len(result.files),
        result.added,
        result.removed,
        result.turns,
        result.cost_usd,
        f" ({result.error})" if result.error else "",
    )
    return as_state(result)


async def _execute(
    unit: WorkUnit, host: SessionHost | None, log: Callable[[str], None]
) -> TaskResult:
    if host is None:
        env = await session_env_from_block(unit.settings_block) if unit.settings_block else {}
        host = SessionHost(slot=session_slot, env=env)
    git_env = await git_env_from_block(unit.repo_block) if unit.repo_block else None
    return await execute_task(unit, host=host.with_log(log), git_env=git_env)


def _run_coroutine(coroutine: Coroutine[Any, Any, TaskResult]) -> TaskResult:
    """Run ``coroutine`` to its end from this synchronous task run.

    On a task runner's thread it gets an event loop of its own. A worker flow (asynchronous)
    runs its task inline, on its own loop's thread: there the coroutine gets a thread and
    loop of its own while this one waits.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    result = run_coro_as_sync(coroutine, force_new_thread=True)
    assert result is not None  # the coroutine returns a TaskResult or raises
    return result


def worker_task(settings: WorkerSettings) -> Task[..., Any]:
    """``run_worker`` with the retry policy of ``settings``."""
    return _worker_task(settings.retries, settings.retry_delay_s)


@functools.cache
def _worker_task(retries: int, retry_delay_s: float) -> Task[..., Any]:
    # One per policy: building a Task hashes its function's source, 10 ms a task otherwise.
    return run_worker.with_options(retries=retries, retry_delay_seconds=retry_delay_s)


async def run_unit(unit: WorkUnit) -> TaskResult:
    """Run the worker task (with its retries) in the current flow; its TaskResult.

    A crashed task run becomes an error result, not an exception.
    """
    # A synchronous task called with return_state: its final State, at once.
    state = cast("State[TaskResult]", worker_task(unit.settings)(unit, return_state=True))
    value = await state.aresult(raise_on_failure=False)
    if isinstance(value, TaskResult):
        return value
    return TaskResult.not_done(
        unit.spec,
        unit.base_commit,
        status=TaskStatus.ERROR,
        reason=FailureReason.SESSION_ERROR,
        error=f"task run ended {state.name}: {value}",
    )
