"""The worker: one TaskSpec, one worktree, one Claude Code session, one commit, one verify.

:func:`execute_task` is the whole job of a worker, free of Prefect so it can be tested and
reused; ``claudecluster.tasks.worker`` wraps it as a Prefect task with logging and artifacts.

The user's checkout is never touched: the task branch ``claudecluster/<run-id>/<task-id>`` is
created from the base commit in a separate worktree, so a dirty working tree is neither read
nor changed. Whatever the session changed is committed, even when it then stops at a limit,
so paid-for work is never lost; only a succeeded task is offered for merging.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from claudecluster import gitops
from claudecluster.errors import ClaudeClusterError, StartRefusedError
from claudecluster.models import (
    FailureReason,
    TaskResult,
    TaskSpec,
    TaskStatus,
    WorkerSettings,
)
from claudecluster.permissions import permissions_for
from claudecluster.session import Logger, SessionOutcome, run_session
from claudecluster.verify import run_verify

DIFF_CAP_BYTES = 200_000

WORKER_INSTRUCTIONS = """\
You are a ClaudeCluster worker: an unattended Claude Code session doing one well-scoped task
in its own git worktree (your current directory). Nobody will answer questions; decide and
act. Change only what the task needs, inside the current directory. Do not commit, push,
switch branches or create worktrees: ClaudeCluster commits your changes when you finish.
Tool calls outside your permissions are denied; do not retry a denied call, work around it
or finish with what you have."""

# Limits count as "failed" (the task did not get done); anything else is an "error".
_FAILED_REASONS = {
    FailureReason.MAX_TURNS,
    FailureReason.BUDGET,
    FailureReason.TIMEOUT,
    FailureReason.VERIFY_FAILED,
    FailureReason.VERIFY_TIMEOUT,
}


class CostSink(Protocol):
    """Told what a session cost as soon as it ends (a run's budget counts it at once)."""

    def spend(self, usd: float) -> None: ...


# What a session holds while it runs; what it yields (if anything) is told the session's cost.
SlotFactory = Callable[[], AbstractAsyncContextManager[CostSink | None]]


@asynccontextmanager
async def no_slot() -> AsyncIterator[None]:
    """A session slot that limits nothing (for use outside Prefect)."""
    yield


def new_run_id() -> str:
    """A sortable, branch- and artifact-key-safe run id, e.g. ``20261125-093012-7f3a``."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def default_worktree_root() -> Path:
    """Where worktrees live: ``<claudecluster home>/worktrees``."""
    from claudecluster.prefect_server import claudecluster_home

    return claudecluster_home() / "worktrees"


def task_prompt(spec: TaskSpec, verify: str | None) -> str:
    """The prompt a worker session gets: the task's own prompt plus its frame."""
    lines = [spec.prompt.strip(), "", "---", f"Task {spec.id} ({spec.kind}): {spec.title}"]
    if spec.paths:
        lines.append("Files and folders this task is expected to touch: " + ", ".join(spec.paths))
    if verify:
        lines.append(f"When you are done, check your work with: {verify}")
    return "\n".join(lines)


def commit_message(spec: TaskSpec, run_id: str) -> str:
    """A task commit's message: the title, then trailers naming the task and the run."""
    return f"{spec.title}\n\nClaudeCluster-Task: {spec.id}\nClaudeCluster-Run: {run_id}\n"


def _status_for(reason: FailureReason | None) -> TaskStatus:
    if reason is None:
        return TaskStatus.SUCCEEDED
    return TaskStatus.FAILED if reason in _FAILED_REASONS else TaskStatus.ERROR


async def execute_task(
    repo_path: str | Path,
    base_commit: str,
    spec: TaskSpec,
    settings: WorkerSettings,
    run_id: str,
    *,
    verify: str | None = None,
    worktree_root: Path | None = None,
    keep_worktree: bool = False,
    env: dict[str, str] | None = None,
    log: Logger | None = None,
    session_slot: SlotFactory | None = None,
) -> TaskResult:
    """Run ``spec`` from ``base_commit`` and return its TaskResult.

    Raises only for bad input (a missing repo or commit); everything that goes wrong once the
    task has started is reported in the result. ``session_slot`` is held around the session
    (ClaudeCluster passes the cluster-wide session limit there).
    """
    started = time.monotonic()
    repo = gitops.open_repo(repo_path)
    base = gitops.resolve_commit(repo, base_commit)
    verify_command = spec.verify or verify
    branch = gitops.task_branch(run_id, spec.id)
    result = TaskResult(
        id=spec.id,
        title=spec.title,
        kind=spec.kind,
        status=TaskStatus.ERROR,
        base_commit=base,
        head_commit=base,
    )
    root = worktree_root or default_worktree_root()
    worktree_path = root / run_id / spec.id
    try:
        worktree = gitops.add_worktree(repo, worktree_path, branch, base)
    except ClaudeClusterError as exc:
        result.failure_reason = FailureReason.GIT_ERROR
        result.error = f"could not create the task's worktree: {exc.message}"
        result.duration_s = round(time.monotonic() - started, 3)
        return result

    permissions = permissions_for(
        settings.permission_policy,
        verify=verify_command,
        extra_allowed=settings.allowed_tools,
        extra_disallowed=settings.disallowed_tools,
    )
    try:
        async with (session_slot or no_slot)() as place:
            outcome: SessionOutcome = await run_session(
                task_prompt(spec, verify_command),
                cwd=worktree.path,
                settings=settings,
                permissions=permissions,
                system_prompt_append=WORKER_INSTRUCTIONS,
                env=env,
                log=log,
            )
            if place is not None:
                place.spend(outcome.cost_usd)
    except ClaudeClusterError as exc:
        gitops.remove_worktree(repo, worktree.path)
        gitops.delete_branch(repo, branch)
        if isinstance(exc, StartRefusedError):
            result.status = TaskStatus.SKIPPED
            result.failure_reason = FailureReason(exc.failure_reason)
            result.error = exc.message
        else:
            result.failure_reason = FailureReason.SESSION_ERROR
            result.error = f"the session could not start: {exc.one_line()}"
        result.duration_s = round(time.monotonic() - started, 3)
        return result
    result.session_id = outcome.session_id
    result.turns = outcome.turns
    result.cost_usd = outcome.cost_usd
    result.usage = outcome.usage
    result.permission_denials = outcome.permission_denials
    result.api_retries = outcome.api_retries
    result.model_fallbacks = outcome.model_fallbacks
    result.failure_reason = outcome.failure_reason
    result.error = outcome.error

    try:
        head = gitops.commit_all(worktree.path, commit_message(spec, run_id))
    except ClaudeClusterError as exc:
        result.failure_reason = FailureReason.GIT_ERROR
        result.error = f"could not commit the session's changes: {exc.message}"
        result.status = TaskStatus.ERROR
        result.worktree = str(worktree.path)  # the uncommitted work is still there
        result.duration_s = round(time.monotonic() - started, 3)
        return result

    if head is None:
        gitops.remove_worktree(repo, worktree.path)
        gitops.delete_branch(repo, branch)
        result.status = TaskStatus.NO_CHANGES if outcome.ok else _status_for(outcome.failure_reason)
        result.duration_s = round(time.monotonic() - started, 3)
        return result

    result.branch = branch
    result.head_commit = head
    result.files = gitops.diff_stats(repo, base, head)
    result.diff, result.diff_truncated = gitops.cap_text(
        gitops.diff_text(repo, base, head), DIFF_CAP_BYTES
    )
    if outcome.ok and verify_command:
        report = run_verify(verify_command, worktree.path, settings.verify_timeout_s)
        result.test_report = report
        if report.timed_out:
            result.failure_reason = FailureReason.VERIFY_TIMEOUT
            result.error = f"verify command timed out after {settings.verify_timeout_s:g} s"
        elif not report.ok:
            result.failure_reason = FailureReason.VERIFY_FAILED
            result.error = f"verify command exited {report.exit_code}: {verify_command}"
    result.status = _status_for(result.failure_reason)
    if keep_worktree:
        result.worktree = str(worktree.path)
    else:
        # Everything is committed on the task branch, so the worktree holds nothing unique.
        gitops.remove_worktree(repo, worktree.path)
    result.duration_s = round(time.monotonic() - started, 3)
    return result
