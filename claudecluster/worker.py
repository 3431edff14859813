"""The worker: one WorkUnit, one worktree, one Claude Code session, one commit, one verify.

:func:`execute_task` is the whole job of a worker, free of Prefect so it can be tested and
reused; ``claudecluster.tasks.worker`` wraps it as a Prefect task with logging and artifacts.

The user's checkout is never touched: the task branch ``claudecluster/<run-id>/<task-id>`` is
created from the base commit (plus the work of the task's dependencies) in a separate
worktree, so a dirty working tree is neither read nor changed. Whatever the session changed
is committed, even when it then stops at a limit, so paid-for work is never lost; only a
succeeded task is offered for merging. A repository given as a URL is worked on in a local
clone, and the task branch is pushed back to it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from claudecluster import gitops, remote
from claudecluster.errors import ClaudeClusterError, StartRefusedError
from claudecluster.models import FailureReason, TaskResult, TaskSpec, TaskStatus, WorkUnit
from claudecluster.permissions import permissions_for
from claudecluster.redact import redact
from claudecluster.session import SessionHost, SessionOutcome, SessionRequest
from claudecluster.target import Target, open_target
from claudecluster.verify import run_verify
from claudecluster.workspace import default_worktree_root

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


def status_for(reason: FailureReason | None) -> TaskStatus:
    """The status of a task that ran: succeeded, failed at a limit, or an error."""
    if reason is None:
        return TaskStatus.SUCCEEDED
    return TaskStatus.FAILED if reason in _FAILED_REASONS else TaskStatus.ERROR


async def execute_task(
    unit: WorkUnit,
    *,
    host: SessionHost | None = None,
    git_env: Mapping[str, str] | None = None,
    keep_worktree: bool = False,
) -> TaskResult:
    """Run ``unit`` and return its TaskResult.

    Raises only for bad input (a missing repository or commit); everything that goes wrong
    once the task has started is reported in the result. ``host`` runs the session (by
    default the real CLI, holding nothing); ``git_env`` reaches a repository URL's origin.
    """
    started = time.monotonic()
    root = Path(unit.worktree_root) if unit.worktree_root else default_worktree_root()
    target = open_target(
        unit.repo, base=unit.base_commit, git_env=git_env, clones_root=root / "clones"
    )
    attempt = _Attempt(unit, target, host or SessionHost(), root / unit.run_id)
    result = await attempt.run(keep_worktree=keep_worktree)
    result.duration_s = round(time.monotonic() - started, 3)
    return result


class _Attempt:
    """The steps of one worker attempt; each failure ends it with the result so far."""

    def __init__(self, unit: WorkUnit, target: Target, host: SessionHost, root: Path) -> None:
        self.unit, self.target, self.host, self.root = unit, target, host, root
        self.spec = unit.spec
        self.branch = gitops.task_branch(unit.run_id, unit.spec.id)

    async def run(self, *, keep_worktree: bool) -> TaskResult:
        spec, repo, log = self.spec, self.target.repo, self.host.log
        log(f"task {spec.id}: {spec.title}")
        try:
            start = self._starting_commit()
        except gitops.MergeConflictError as conflict:
            return TaskResult.not_done(
                spec,
                self.target.base_commit,
                status=TaskStatus.ERROR,
                reason=FailureReason.DEPENDENCY_FAILED,
                error=f"the work of its dependencies does not combine: {conflict.message}",
            )
        result = TaskResult(
            id=spec.id,
            title=spec.title,
            kind=spec.kind,
            status=TaskStatus.ERROR,
            base_commit=start,
            head_commit=start,
        )
        try:
            worktree = gitops.add_worktree(repo, self.root / spec.id, self.branch, start)
        except ClaudeClusterError as exc:
            return _failed(
                result,
                FailureReason.GIT_ERROR,
                f"could not create the task's worktree: {exc.message}",
            )
        try:
            outcome = await self.host.run(self._request(worktree.path))
        except ClaudeClusterError as exc:
            self._discard(worktree.path)
            if isinstance(exc, StartRefusedError):
                result.status = TaskStatus.SKIPPED
                result.failure_reason = FailureReason(exc.failure_reason)
                result.error = exc.message
                return result
            return _failed(
                result,
                FailureReason.SESSION_ERROR,
                f"the session could not start: {exc.one_line()}",
            )
        _record_outcome(result, outcome)
        try:
            head = gitops.commit_all(worktree.path, commit_message(spec, self.unit.run_id))
        except ClaudeClusterError as exc:
            result.worktree = str(worktree.path)  # the uncommitted work is still there
            return _failed(
                result,
                FailureReason.GIT_ERROR,
                f"could not commit the session's changes: {exc.message}",
            )
        if head is None:
            self._discard(worktree.path)
            result.status = (
                TaskStatus.NO_CHANGES if outcome.ok else status_for(outcome.failure_reason)
            )
            return result
        self._record_commit(result, start, head)
        if outcome.ok and self.unit.verify_command:
            self._verify(result, worktree.path)
        result.status = status_for(result.failure_reason)
        if keep_worktree:
            result.worktree = str(worktree.path)
        else:
            # Everything is committed on the task branch, so the worktree holds nothing unique.
            gitops.remove_worktree(repo, worktree.path)
        if self.target.url is not None:
            self._push()
        return result

    def _starting_commit(self) -> str:
        """The base commit plus the merged work of the task's dependencies."""
        branches = self.unit.dependency_branches
        start = gitops.combine_branches(
            self.target.repo,
            self.target.base_commit,
            branches,
            root=self.root,
            name=f"{self.spec.id}-base",
        )
        if start != self.target.base_commit:
            self.host.log(f"starting from {start[:12]} (base plus {', '.join(branches)})")
        return start

    def _request(self, worktree: Path) -> SessionRequest:
        settings, verify = self.unit.settings, self.unit.verify_command
        return SessionRequest(
            prompt=task_prompt(self.spec, verify),
            cwd=worktree,
            settings=settings,
            permissions=permissions_for(
                settings.permission_policy,
                verify=verify,
                extra_allowed=settings.allowed_tools,
                extra_disallowed=settings.disallowed_tools,
            ),
            system_prompt_append=WORKER_INSTRUCTIONS,
        )

    def _record_commit(self, result: TaskResult, start: str, head: str) -> None:
        repo = self.target.repo
        result.branch = self.branch
        result.head_commit = head
        result.files = gitops.diff_stats(repo, start, head)
        result.diff, result.diff_truncated = gitops.cap_text(
            gitops.diff_text(repo, start, head), DIFF_CAP_BYTES
        )

    def _verify(self, result: TaskResult, worktree: Path) -> None:
        command = self.unit.verify_command
        assert command is not None
        timeout = self.unit.settings.verify_timeout_s
        report = run_verify(command, worktree, timeout)
        result.test_report = report
        if report.timed_out:
            result.failure_reason = FailureReason.VERIFY_TIMEOUT
            result.error = f"verify command timed out after {timeout:g} s"
        elif not report.ok:
            result.failure_reason = FailureReason.VERIFY_FAILED
            result.error = f"verify command exited {report.exit_code}: {command}"

    def _discard(self, worktree: Path) -> None:
        """Remove a worktree and branch holding nothing (no session ran, or it changed nothing)."""
        gitops.remove_worktree(self.target.repo, worktree)
        gitops.delete_branch(self.target.repo, self.branch)

    def _push(self) -> None:
        """A clone's task branch goes back to the repository the URL names."""
        remote.push(self.target.repo, self.branch, env=dict(self.target.git_env))
        self.host.log(f"pushed {self.branch} to {redact(str(self.target.url))}")


def _record_outcome(result: TaskResult, outcome: SessionOutcome) -> None:
    result.session_id = outcome.session_id
    result.turns = outcome.turns
    result.cost_usd = outcome.cost_usd
    result.usage = outcome.usage
    result.permission_denials = outcome.permission_denials
    result.api_retries = outcome.api_retries
    result.model_fallbacks = outcome.model_fallbacks
    result.failure_reason = outcome.failure_reason
    result.error = outcome.error


def _failed(result: TaskResult, reason: FailureReason, error: str) -> TaskResult:
    result.status = TaskStatus.ERROR
    result.failure_reason = reason
    result.error = error
    return result
