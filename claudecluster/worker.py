"""The worker: one WorkUnit, one worktree, one Claude Code session, one commit, one verify.

:func:`execute_task` is the whole job of a worker, free of Prefect so it can be tested and
reused; ``claudecluster.tasks.worker`` wraps it as a Prefect task with logging and artifacts.

The user's checkout is never touched: the task branch ``claudecluster/<run-id>/<task-id>`` is
created from the base commit (plus the work of the task's dependencies) in a separate
worktree, so a dirty working tree is neither read nor changed. Whatever the session changed
is committed, even when it then stops at a limit, so paid-for work is never lost; only a
succeeded task is offered for merging. A repository given as a URL is worked on in a local
clone, and the task branch is pushed back to it.

Every attempt is recorded in the run journal (:mod:`claudecluster.journal`) as it goes, so
a retry or a resumed run knows what earlier attempts cost, and a task whose session already
finished and committed is reused instead of paid for again: from the journal, or from the
trailers of its branch's commit when the journal is on another machine.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import git

from claudecluster import gitops, remote, telemetry
from claudecluster.errors import ClaudeClusterError, StartRefusedError
from claudecluster.journal import RunJournal
from claudecluster.models import (
    Attempt,
    FailureReason,
    TaskResult,
    TaskSpec,
    TaskStatus,
    WorkUnit,
)
from claudecluster.permissions import permissions_for
from claudecluster.redact import redact
from claudecluster.session import SessionHost, SessionOutcome, SessionRequest, Stop
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
    FailureReason.GOAL_BUDGET,
}

# Trailers of a task commit (see commit_message), read back to reuse finished work.
TASK_TRAILER = "ClaudeCluster-Task"
RUN_TRAILER = "ClaudeCluster-Run"
UNIT_TRAILER = "ClaudeCluster-Unit"
OUTCOME_TRAILER = "ClaudeCluster-Outcome"
COST_TRAILER = "ClaudeCluster-Cost-USD"
TURNS_TRAILER = "ClaudeCluster-Turns"
DURATION_TRAILER = "ClaudeCluster-Session-S"
ATTEMPT_TRAILER = "ClaudeCluster-Attempt"
STARTED_TRAILER = "ClaudeCluster-Started"
FINISHED = "finished"


def task_prompt(spec: TaskSpec, verify: str | None) -> str:
    """The prompt a worker session gets: the task's own prompt plus its frame."""
    lines = [spec.prompt.strip(), "", "---", f"Task {spec.id} ({spec.kind}): {spec.title}"]
    if spec.paths:
        lines.append("Files and folders this task is expected to touch: " + ", ".join(spec.paths))
    if verify:
        lines.append(f"When you are done, check your work with: {verify}")
    return "\n".join(lines)


def commit_message(
    spec: TaskSpec,
    run_id: str,
    *,
    fingerprint: str | None = None,
    outcome: SessionOutcome | None = None,
) -> str:
    """A task commit's message: the title, then trailers naming the task, the run and, when
    known, the unit and how its session ended (so finished work can be found again)."""
    lines = [spec.title, "", f"{TASK_TRAILER}: {spec.id}", f"{RUN_TRAILER}: {run_id}"]
    if fingerprint is not None:
        lines.append(f"{UNIT_TRAILER}: {fingerprint}")
    if outcome is not None:
        ended = FINISHED if outcome.ok else f"stopped ({outcome.failure_reason})"
        lines += [
            f"{OUTCOME_TRAILER}: {ended}",
            f"{COST_TRAILER}: {outcome.cost_usd:.6f}",
            f"{TURNS_TRAILER}: {outcome.turns}",
            f"{DURATION_TRAILER}: {outcome.duration_s:.1f}",
        ]
    return "\n".join(lines) + "\n"


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
    Finished work of an earlier attempt of the same run is reused (``cached``) instead of
    run again.
    """
    started = time.monotonic()
    root = Path(unit.worktree_root) if unit.worktree_root else default_worktree_root()
    target = open_target(
        unit.repo, base=unit.base_commit, git_env=git_env, clones_root=root / "clones"
    )
    journal = RunJournal(unit.run_id)
    attempt = _Attempt(unit, target, host or SessionHost(), root / unit.run_id, journal)
    result = attempt.reused()
    if result is None:
        result = await attempt.run(keep_worktree=keep_worktree)
        result.duration_s = round(time.monotonic() - started, 3)
        attempt.finish(result)
        _record_metrics(result)
    return result


def _record_metrics(result: TaskResult) -> None:
    """The task's duration as a cluster metric (when telemetry is on); its sessions' cost and
    tokens are recorded where they ran (:class:`~claudecluster.session.SessionHost`)."""
    metrics = telemetry.instruments()
    if metrics is not None:
        kind = {"kind": str(result.kind), "status": str(result.status)}
        metrics.task_duration.record(result.duration_s, kind)


class _Attempt:
    """The steps of one worker attempt; each failure ends it with the result so far."""

    def __init__(
        self, unit: WorkUnit, target: Target, host: SessionHost, root: Path, journal: RunJournal
    ) -> None:
        self.unit, self.target, self.host, self.root = unit, target, host, root
        self.journal = journal
        self.spec = unit.spec
        self.branch = gitops.task_branch(unit.run_id, unit.spec.id)
        self.fingerprint = unit.fingerprint()
        self.earlier = self._earlier_attempts()
        self.record: Attempt | None = None
        # A clone's unfinished work goes to the origin after every turn (see checkpoint).
        self.worktree: Path | None = None
        self.checkpoint_branch: str | None = None

    def reused(self) -> TaskResult | None:
        """The result of earlier finished work on this very unit, or None."""
        found = self._reused_from_journal() or self._reused_from_branch()
        if found is not None:
            self.host.log(f"task {self.spec.id}: reusing its finished work ({found.status})")
        return found

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
            with telemetry.span("claudecluster.worktree", {telemetry.TASK_ID: spec.id}):
                worktree = gitops.add_worktree(repo, self.root / spec.id, self.branch, start)
        except ClaudeClusterError as exc:
            return _failed(
                result,
                FailureReason.GIT_ERROR,
                f"could not create the task's worktree: {exc.message}",
            )
        self._keep_earlier_work(worktree.archived)
        self.record = self.journal.begin_attempt(spec.id)
        if self.target.url is not None:
            self._prepare_checkpoints(worktree.path)
        try:
            outcome = await self.host.run(self._request(worktree.path), _JournalWatch(self))
        except ClaudeClusterError as exc:
            self._discard(worktree.path)
            if isinstance(exc, StartRefusedError):
                # It never got a session: not an attempt.
                self.journal.drop_attempt(spec.id, self.record.number)
                self.record = None
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
        self._record_session(outcome)
        message = commit_message(
            spec, self.unit.run_id, fingerprint=self.fingerprint, outcome=outcome
        )
        try:
            with telemetry.span("claudecluster.commit", {telemetry.TASK_ID: spec.id}):
                head = gitops.commit_all(worktree.path, message)
        except ClaudeClusterError as exc:
            result.worktree = str(worktree.path)  # the uncommitted work is still there
            return _failed(
                result,
                FailureReason.GIT_ERROR,
                f"could not commit the session's changes: {exc.message}",
            )
        if head is None:
            self._discard(worktree.path)
            self._drop_checkpoint()  # nothing to keep; its cost is in this result
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
            # Only now: until the task branch is on the origin, the checkpoint is the copy
            # that survives this machine.
            self._drop_checkpoint()
        return result

    def finish(self, result: TaskResult) -> None:
        """Close the attempt's record, account every attempt in ``result``, journal it."""
        if self.record is not None and self.record.outcome == "running":
            self.record.outcome = "failed"
            self.record.failure_reason = result.failure_reason
            self.journal.save_attempt(self.spec.id, self.record)
        result.attempts = [*self.earlier, *([self.record] if self.record else [])]
        result.cost_usd = round(sum(a.cost_usd for a in result.attempts), 6)
        self.journal.save_result(self.fingerprint, result)

    # -- the steps

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
            attributes={
                telemetry.RUN_ID: self.unit.run_id,
                telemetry.TASK_ID: self.spec.id,
                telemetry.TASK_KIND: str(self.spec.kind),
            },
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
        with telemetry.span("claudecluster.verify", {telemetry.TASK_ID: self.spec.id}):
            _verify_into(result, self.unit, worktree)

    def _discard(self, worktree: Path) -> None:
        """Remove a worktree and branch holding nothing (no session ran, or it changed nothing)."""
        gitops.remove_worktree(self.target.repo, worktree)
        gitops.delete_branch(self.target.repo, self.branch)

    def _push(self) -> None:
        """A clone's task branch goes back to the repository the URL names."""
        remote.push(self.target.repo, self.branch, env=dict(self.target.git_env))
        self.host.log(f"pushed {self.branch} to {redact(str(self.target.url))}")

    # -- checkpoints of a clone's work (its machine may die with it)

    def _prepare_checkpoints(self, worktree: Path) -> None:
        """Learn the attempts that died on other machines (their checkpoints on the origin,
        fetched with the clone) and take the next free checkpoint branch."""
        assert self.record is not None
        kept = gitops.attempt_branches(self.target.repo, self.branch)
        known = {a.branch for a in self.earlier}
        for lost in lost_attempts(self.target.repo, self.branch):
            if lost.branch not in known:
                self.earlier.append(lost)
                self.host.log(
                    f"attempt {lost.number} died with its machine after {lost.turns} turns "
                    f"(${lost.cost_usd:.4f}); its work is kept on {lost.branch}"
                )
        number = max([self.record.number, *(a.number + 1 for a in self.earlier)])
        if number != self.record.number:  # numbered after the attempts on other machines
            self.journal.drop_attempt(self.spec.id, self.record.number)
            self.record.number = number
            self.journal.save_attempt(self.spec.id, self.record)
        number = 1
        while gitops.attempt_branch(self.branch, number) in kept:
            number += 1
        self.checkpoint_branch = gitops.attempt_branch(self.branch, number)
        self.worktree = worktree

    def checkpoint(self) -> None:
        """Push the worktree's files as they are now to the attempt's checkpoint branch on
        the origin, with what the attempt has spent: if this machine dies, the work and its
        cost are not lost with it. Never fails the session."""
        record, worktree, branch = self.record, self.worktree, self.checkpoint_branch
        if record is None or worktree is None or branch is None:
            return
        message = "\n".join(
            [
                f"Unfinished work of attempt {record.number} of {self.spec.id}",
                "",
                f"{TASK_TRAILER}: {self.spec.id}",
                f"{RUN_TRAILER}: {self.unit.run_id}",
                f"{ATTEMPT_TRAILER}: {record.number}",
                f"{COST_TRAILER}: {record.cost_usd:.6f}",
                f"{TURNS_TRAILER}: {record.turns}",
                f"{STARTED_TRAILER}: {record.started_at.isoformat()}",
            ]
        )
        try:
            # Also when no file changed yet: the commit's trailers keep what was spent.
            commit = gitops.snapshot_commit(worktree, message, allow_empty=True)
            if commit is not None:
                remote.push_commit(self.target.repo, commit, branch, env=dict(self.target.git_env))
                record.branch = branch
        except ClaudeClusterError as exc:
            self.host.log(f"could not checkpoint the work so far: {exc.one_line()}")

    def _drop_checkpoint(self) -> None:
        """The attempt ended and commits its work: its checkpoint holds nothing more."""
        branch = self.checkpoint_branch
        if branch is None or self.record is None or self.record.branch != branch:
            return  # never pushed one
        with contextlib.suppress(ClaudeClusterError):
            remote.delete_branch(self.target.repo, branch, env=dict(self.target.git_env))
        self.record.branch = None

    # -- the journal

    def _earlier_attempts(self) -> list[Attempt]:
        """Earlier attempts of this task in this run; one still 'running' died with its
        process."""
        earlier = self.journal.attempts(self.spec.id)
        for attempt in earlier:
            if attempt.outcome == "running":
                attempt.outcome = "interrupted"
                self.journal.save_attempt(self.spec.id, attempt)
        return earlier

    def _keep_earlier_work(self, archived: str | None) -> None:
        """The branch an earlier attempt's work was moved to belongs to that attempt."""
        if archived is None or not self.earlier:
            return
        self.earlier[-1].branch = archived
        self.journal.save_attempt(self.spec.id, self.earlier[-1])
        self.host.log(f"the work of attempt {self.earlier[-1].number} is kept on {archived}")

    def _record_session(self, outcome: SessionOutcome) -> None:
        assert self.record is not None
        self.record.outcome = "finished" if outcome.ok else "stopped"
        if outcome.failure_reason in (FailureReason.SESSION_ERROR, FailureReason.API_ERROR):
            self.record.outcome = "failed"
        self.record.failure_reason = outcome.failure_reason
        self.record.turns = outcome.turns
        self.record.cost_usd = outcome.cost_usd
        self.record.session_id = outcome.session_id
        self.journal.save_attempt(self.spec.id, self.record)

    def _reused_from_journal(self) -> TaskResult | None:
        record = self.journal.result(self.spec.id)
        if record is None or record.fingerprint != self.fingerprint:
            return None
        result = record.result
        if not result.status.ok:
            return None
        if result.branch is not None and (
            gitops.branch_head(self.target.repo, result.branch) != result.head_commit
        ):
            return None  # the branch moved since: the recorded work is not what is there
        return result.model_copy(update={"cached": True})

    def _reused_from_branch(self) -> TaskResult | None:
        """A finished, verified session's commit on the task branch, when the journal does
        not know it (it ran on another machine)."""
        found = result_from_branch(self.unit, self.target, self.root)
        return found if found is not None and found.status.ok else None


def result_from_branch(unit: WorkUnit, target: Target, scratch_root: Path) -> TaskResult | None:
    """The result of what a session of ``unit`` committed on its task branch, rebuilt from
    git alone: the diff from the commit, how the session ended and what it cost from the
    commit's trailers, and the verify command run again (after a finished session).

    None when the branch holds no commit of this very unit. The driver uses it for a task
    whose worker ran elsewhere and whose result did not come back; resume uses it too.
    """
    branch = gitops.task_branch(unit.run_id, unit.spec.id)
    head = gitops.branch_head(target.repo, branch)
    if head is None:
        return None
    found = gitops.trailers(target.repo, head)
    if (
        found.get(RUN_TRAILER) != unit.run_id
        or found.get(TASK_TRAILER) != unit.spec.id
        or found.get(UNIT_TRAILER) != unit.fingerprint()
        or OUTCOME_TRAILER not in found
    ):
        return None
    outcome = found[OUTCOME_TRAILER]
    start = gitops.resolve_commit(target.repo, f"{head}^")
    result = TaskResult(
        id=unit.spec.id,
        title=unit.spec.title,
        kind=unit.spec.kind,
        status=TaskStatus.SUCCEEDED,
        base_commit=start,
        head_commit=head,
        branch=branch,
        cached=True,
        cost_usd=_number(found.get(COST_TRAILER)),
        turns=int(_number(found.get(TURNS_TRAILER))),
        duration_s=_number(found.get(DURATION_TRAILER)),
    )
    result.files = gitops.diff_stats(target.repo, start, head)
    result.diff, result.diff_truncated = gitops.cap_text(
        gitops.diff_text(target.repo, start, head), DIFF_CAP_BYTES
    )
    lost = lost_attempts(target.repo, branch)
    if lost:  # earlier attempts died with their machines: they were paid for too
        last = Attempt(
            number=lost[-1].number + 1,
            outcome="finished" if outcome == FINISHED else "stopped",
            turns=result.turns,
            cost_usd=result.cost_usd,
            started_at=target.repo.commit(head).committed_datetime,
        )
        result.attempts = [*lost, last]
        result.cost_usd = round(sum(a.cost_usd for a in result.attempts), 6)
    if outcome != FINISHED:  # "stopped (<reason>)": its work is kept, not verified
        reason = outcome.removeprefix("stopped (").rstrip(")")
        result.failure_reason = FailureReason(reason) if reason in set(FailureReason) else None
        result.failure_reason = result.failure_reason or FailureReason.SESSION_ERROR
        result.error = f"the session stopped ({result.failure_reason}); its work is on {branch}"
    elif unit.verify_command:
        with gitops.scratch_worktree(
            target.repo, scratch_root, f"{unit.spec.id}-verify", head
        ) as scratch:
            _verify_into(result, unit, Path(scratch.working_dir))
    result.status = status_for(result.failure_reason)
    return result


class _JournalWatch:
    """Rewrites the attempt's journal record after every turn, so a killed attempt still
    says what it spent."""

    def __init__(self, attempt: _Attempt) -> None:
        self.attempt = attempt

    def turn(self, cost_usd: float) -> Stop | None:
        record = self.attempt.record
        if record is not None:
            record.turns += 1
            record.cost_usd = cost_usd
            self.attempt.journal.save_attempt(self.attempt.spec.id, record)
            self.attempt.checkpoint()
        return None

    def spend(self, usd: float) -> None:
        """The final cost is recorded with the outcome."""


def lost_attempts(repo: git.Repo, branch: str) -> list[Attempt]:
    """Attempts at ``branch``'s task that died on their machines, from their checkpoint
    branches (as fetched from the origin), in order."""
    found = []
    for kept in gitops.attempt_branches(repo, branch):
        trailers = gitops.trailers(repo, kept)
        if ATTEMPT_TRAILER not in trailers:
            continue  # an attempt's work archived on this machine (the journal knows it)
        with contextlib.suppress(KeyError, ValueError):
            found.append(
                Attempt(
                    number=int(trailers[ATTEMPT_TRAILER]),
                    outcome="interrupted",
                    turns=int(trailers.get(TURNS_TRAILER, "0")),
                    cost_usd=_number(trailers.get(COST_TRAILER)),
                    branch=kept,
                    started_at=datetime.fromisoformat(trailers[STARTED_TRAILER]),
                )
            )
    return sorted(found, key=lambda a: a.number)


def _verify_into(result: TaskResult, unit: WorkUnit, worktree: Path) -> None:
    """Run ``unit``'s verify command in ``worktree``; record the report and any failure."""
    command = unit.verify_command
    assert command is not None
    timeout = unit.settings.verify_timeout_s
    report = run_verify(command, worktree, timeout)
    result.test_report = report
    if report.timed_out:
        result.failure_reason = FailureReason.VERIFY_TIMEOUT
        result.error = f"verify command timed out after {timeout:g} s"
    elif not report.ok:
        result.failure_reason = FailureReason.VERIFY_FAILED
        result.error = f"verify command exited {report.exit_code}: {command}"


def _number(text: str | None) -> float:
    try:
        return float(text or 0)
    except ValueError:
        return 0.0


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
