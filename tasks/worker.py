"""The worker task: one Claude Code session on one TaskSpec, as a Prefect task run.

Its log carries the session's messages as they happen (assistant text, tool calls, tool
results, the final result); its artifacts carry the diff and the test report. Given the
results of the tasks it depends on, it starts from the base commit plus their merged work.

The task run ends Completed when the task succeeded (or had nothing to change) and Failed
otherwise, with the TaskResult as its data either way. That gives Prefect's machinery its
usual meaning:

- resume: a completed worker is cached (persisted result, keyed by run, task spec, settings
  and starting commits), so re-running a run re-runs only what failed or never ran, and paid
  work is not paid again;
- retries: a session that crashed or lost its API is retried (``WorkerSettings.retries``,
  ``retry_delay_s``) from a clean worktree; its earlier work stays on an attempts branch.
"""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.client.schemas.objects import State
from prefect.context import TaskRunContext
from prefect.states import Completed, Failed

from claudecluster import gitops, remote
from claudecluster.artifacts import publish_task_artifacts
from claudecluster.blocks.repository import git_env_from_block
from claudecluster.blocks.settings import session_env_from_block
from claudecluster.limits import run_session, session_slot, sessions_of, start_slot
from claudecluster.models import FailureReason, TaskResult, TaskSpec, TaskStatus, WorkerSettings
from claudecluster.redact import redact
from claudecluster.worker import SlotFactory, default_worktree_root, execute_task

RETRYABLE = (FailureReason.SESSION_ERROR, FailureReason.API_ERROR)


def worker_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """A completed worker's cache key: same run, spec, settings and starting point."""
    spec: TaskSpec = parameters["spec"]
    settings: WorkerSettings = parameters["settings"]
    dependencies = parameters.get("dependencies") or []
    identity = {
        "base": parameters["base_commit"],
        "dependencies": [d.head_commit for d in dependencies if isinstance(d, TaskResult)],
        "spec": spec.model_dump(mode="json"),
        "settings": settings.model_dump(mode="json", exclude={"retries", "retry_delay_s"}),
        "verify": parameters.get("verify"),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    return f"claudecluster-{parameters['run_id']}-{spec.id}-{digest}"


def crashed(task: Any, task_run: Any, state: State[Any]) -> bool:
    """Retry only sessions that crashed or lost the API; limits and failed tests are final."""
    return (state.message or "").startswith(tuple(str(r) for r in RETRYABLE))


def as_state(result: TaskResult) -> State[TaskResult]:
    """Completed for a task that did its work, Failed otherwise; the result rides along."""
    if result.status.ok:
        return Completed(data=result, message=str(result.status))
    reason = result.failure_reason or result.status
    return Failed(data=result, message=f"{reason}: {result.error or result.status}")


@task(
    name="claude-worker",
    task_run_name="{spec.id}",
    cache_key_fn=worker_cache_key,
    persist_result=True,
    retry_condition_fn=crashed,
)
async def run_worker(
    repo: str,
    base_commit: str,
    spec: TaskSpec,
    settings: WorkerSettings,
    run_id: str,
    verify: str | None = None,
    dependencies: list[TaskResult] | None = None,
    worktree_root: str | None = None,
    keep_worktree: bool = False,
    settings_block: str | None = None,
    repo_block: str | None = None,
    take_session_slot: bool = True,
) -> State[TaskResult]:
    """Run one task in its own worktree and branch; return its TaskResult.

    ``settings_block`` names a ClaudeCodeSettings block whose credentials the session gets;
    ``repo_block`` a TargetRepository block with git credentials. Both are loaded here so
    secrets never travel as (stored) parameters. When ``repo`` is a URL, the task works in a
    clone and pushes its branch back.
    """
    logger = get_run_logger()
    env = await session_env_from_block(settings_block) if settings_block else None
    git_env = await git_env_from_block(repo_block) if repo_block else None
    logger.info("task %s: %s", spec.id, spec.title)
    root = Path(worktree_root) if worktree_root else default_worktree_root()
    dep_branches = [dep.branch for dep in dependencies or [] if dep.branch]
    url = repo if remote.is_remote(repo) else None
    local = remote.cache_clone(url, root / "clones", env=git_env) if url else None
    repo = str(local.working_dir) if local else repo
    try:
        start = gitops.combine_branches(
            local or gitops.open_repo(repo),
            base_commit,
            dep_branches,
            root=root / run_id,
            name=f"{spec.id}-base",
        )
    except gitops.MergeConflictError as conflict:
        result = TaskResult.not_done(
            spec,
            base_commit,
            status=TaskStatus.ERROR,
            reason=FailureReason.DEPENDENCY_FAILED,
            error=f"the work of its dependencies does not combine: {conflict.message}",
        )
    else:
        if start != base_commit:
            logger.info("starting from %s (base plus %s)", start[:12], ", ".join(dep_branches))
        result = await execute_task(
            repo,
            start,
            spec,
            settings,
            run_id,
            verify=verify,
            worktree_root=root,
            keep_worktree=keep_worktree,
            log=logger.info,
            # A local run holds its sessions' slots for the whole run (see dispatch); each
            # session still takes its start under the cluster-wide rate limit.
            session_slot=_slot_for(run_id, spec.id, take_session_slot),
            env=env,
        )
        if local is not None and result.branch:
            remote.push(local, result.branch, env=git_env)
            logger.info("pushed %s to %s", result.branch, redact(str(url)))
    await publish_task_artifacts(result, run_id)
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
    return as_state(result)


def _slot_for(run_id: str, task_id: str, take_session_slot: bool) -> SlotFactory:
    """What a session holds while it runs: a cluster-wide session slot of its own, or (in a
    local run, which holds its slots for the whole run) a place among the run's sessions."""
    if take_session_slot:
        return session_slot
    sessions = sessions_of(run_id)
    return partial(run_session, sessions, task_id) if sessions else start_slot


def with_retries(settings: WorkerSettings) -> Any:
    """``run_worker`` with the retry policy of ``settings``."""
    return run_worker.with_options(
        retries=settings.retries, retry_delay_seconds=settings.retry_delay_s
    )


async def worker_state(**parameters: Any) -> State[TaskResult]:
    """Run the worker task (with its retries) in the current flow; its final state."""
    settings: WorkerSettings = parameters["settings"]
    state: State[TaskResult] = await with_retries(settings)(**parameters, return_state=True)
    return state


async def result_of_state(state: State[TaskResult], spec: TaskSpec, base: str) -> TaskResult:
    """The TaskResult a worker state carries; a crash becomes an error result."""
    value = await state.aresult(raise_on_failure=False)
    if isinstance(value, TaskResult):
        return value
    return TaskResult.not_done(
        spec,
        base,
        status=TaskStatus.ERROR,
        reason=FailureReason.SESSION_ERROR,
        error=f"task run ended {state.name}: {value}",
    )
