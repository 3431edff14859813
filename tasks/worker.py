"""The worker task: one Claude Code session on one TaskSpec, as a Prefect task run.

Its log carries the session's messages as they happen (assistant text, tool calls, tool
results, the final result); its artifacts carry the diff and the test report. Given the
results of the tasks it depends on, it starts from the base commit plus their merged work.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from claudecluster import gitops, remote
from claudecluster.artifacts import publish_task_artifacts
from claudecluster.blocks.repository import git_env_from_block
from claudecluster.blocks.settings import session_env_from_block
from claudecluster.limits import session_slot
from claudecluster.models import FailureReason, TaskResult, TaskSpec, TaskStatus, WorkerSettings
from claudecluster.redact import redact
from claudecluster.worker import default_worktree_root, execute_task


@task(name="claude-worker", task_run_name="{spec.id}", cache_policy=NONE)
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
) -> TaskResult:
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
        result = TaskResult(
            id=spec.id,
            title=spec.title,
            kind=spec.kind,
            status=TaskStatus.ERROR,
            failure_reason=FailureReason.DEPENDENCY_FAILED,
            error=f"the work of its dependencies does not combine: {conflict.message}",
            base_commit=base_commit,
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
            session_slot=session_slot,
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
    return result
