"""Integration: merge the succeeded task branches in dependency order, then verify.

The integration branch is created from the run's base commit in its own worktree, so the
user's checkout is untouched. A branch that conflicts is never lost: the merge is aborted,
the task branch stays as it is, and the report says which task, which files and why.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

import git
from pydantic import Field

from claudecluster import gitops, telemetry
from claudecluster.models import (
    StrictModel,
    TaskResult,
    TaskSpec,
    TaskStatus,
    TestReport,
    UnmergedTask,
)
from claudecluster.plan import Plan, topological_order
from claudecluster.resolve import Resolution, Resolver
from claudecluster.verify import run_verify

_log = logging.getLogger(__name__)


class IntegrationOutcome(StrictModel):
    """What integration merged, what it kept aside, and how the final verify went."""

    branch: str = Field(description="The integration branch.")
    head_commit: str = Field(description="Its head after all merges.")
    merged: list[str] = Field(default_factory=list, description="Task ids merged, in order.")
    unmerged: list[UnmergedTask] = Field(
        default_factory=list, description="Task branches kept but not merged, with reasons."
    )
    final_verify: TestReport | None = Field(
        default=None, description="The verify command on the integration branch."
    )
    resolved: list[str] = Field(
        default_factory=list, description="Tasks merged after a resolution session."
    )
    resolution_cost_usd: float = Field(default=0.0, description="Cost of the resolution sessions.")


def _not_merged_reason(result: TaskResult) -> str:
    detail = f": {result.error}" if result.error else ""
    return (
        f"task {result.status}"
        + (f" ({result.failure_reason})" if result.failure_reason else "")
        + detail
    )


def integrate(
    repo_path: str | Path,
    base_commit: str,
    run_id: str,
    plan: Plan,
    results: dict[str, TaskResult],
    *,
    verify: str | None,
    verify_timeout_s: float,
    worktree_root: Path,
    resolver: Resolver | None = None,
) -> IntegrationOutcome:
    """Merge every succeeded task onto ``claudecluster/<run-id>/integration`` and verify it.

    With a ``resolver``, a conflicting branch gets a resolution session (see
    :mod:`claudecluster.resolve`) before it is given up and reported.
    """
    with Integration(repo_path, base_commit, run_id, plan, worktree_root=worktree_root) as run:
        return run.finish(
            results, verify=verify, verify_timeout_s=verify_timeout_s, resolver=resolver
        )


class Integration:
    """A run's integration branch, merged onto while the run goes on.

    :meth:`offer` hands it the results so far; a thread of its own merges, in dependency
    order, every finished task whose predecessors in that order are done, so that when the
    last session ends only the last few branches are left to merge. It stops at the first
    task still running, at a branch not in this repository yet (a pool worker's, fetched at
    the end) and at a conflict: :meth:`finish` takes it from there with the resolver, in the
    same order, so the outcome is the one merging everything at the end would give.
    """

    def __init__(
        self,
        repo_path: str | Path,
        base_commit: str,
        run_id: str,
        plan: Plan,
        *,
        worktree_root: Path,
    ) -> None:
        self.repo = gitops.open_repo(repo_path)
        self.base_commit, self.run_id, self.plan = base_commit, run_id, plan
        self.branch = gitops.integration_branch(run_id)
        self.path = worktree_root / run_id / "integration"
        self.scratch_root = worktree_root / run_id
        self._order = topological_order(plan)
        self._next = 0  # the first task in dependency order not offered yet
        self._held_up = False  # a conflict or an error: the rest waits for finish()
        self._merger: _Merger | None = None
        self._lock = threading.Lock()  # one merge at a time: the thread's, or finish's
        self._offers: queue.SimpleQueue[dict[str, TaskResult] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stack = ExitStack()

    def __enter__(self) -> Integration:
        return self

    def _opened(self) -> _Merger:
        """The merger on the integration worktree, created on first use (callers hold the
        lock): not before the first session, whose start it would delay."""
        if self._merger is None:
            worktree = self._stack.enter_context(
                gitops.branch_worktree(self.repo, self.path, self.branch, self.base_commit)
            )
            self._merger = _Merger(self.repo, worktree, self.plan, {}, None, self.scratch_root)
            self._merger.outcome = IntegrationOutcome(
                branch=self.branch, head_commit=self.base_commit
            )
        return self._merger

    def __exit__(self, *exc: object) -> None:
        self._stop()
        self._stack.close()

    def offer(self, results: Mapping[str, TaskResult]) -> None:
        """Results so far (copied): merge what can be merged now, on the thread."""
        if self._thread is None:
            # The caller's context: its trace, so the merges' spans are in the goal's trace.
            context = contextvars.copy_context()
            self._thread = threading.Thread(
                target=context.run,
                args=(self._follow,),
                name=f"integrate-{self.run_id}",
                daemon=True,
            )
            self._thread.start()
        self._offers.put(dict(results))

    def finish(
        self,
        results: dict[str, TaskResult],
        *,
        verify: str | None,
        verify_timeout_s: float,
        resolver: Resolver | None = None,
    ) -> IntegrationOutcome:
        """Merge the rest (resolving conflicts with ``resolver``), then run ``verify``."""
        self._stop()
        with self._lock:
            merger = self._opened()
            merger.results, merger.resolver = results, resolver
            for spec in self._order[self._next :]:
                with telemetry.span("claudecluster.merge", {telemetry.TASK_ID: spec.id}):
                    merger.offer(spec)
            self._next = len(self._order)
            if verify:
                with telemetry.span("claudecluster.verify", {telemetry.RUN_ID: self.run_id}):
                    merger.outcome.final_verify = run_verify(
                        verify, Path(merger.integration.working_dir), verify_timeout_s
                    )
        return merger.outcome

    def _stop(self) -> None:
        if self._thread is not None:
            self._offers.put(None)
            self._thread.join()
            self._thread = None

    def _follow(self) -> None:
        while (results := self._offers.get()) is not None:
            while True:  # only the newest results matter
                try:
                    newer = self._offers.get_nowait()
                except queue.Empty:
                    break
                if newer is None:
                    self._advance(results)
                    return
                results = newer
            self._advance(results)

    def _advance(self, results: dict[str, TaskResult]) -> None:
        with self._lock:
            if self._held_up:
                return
            try:
                merger = self._opened()
                merger.results = results
                while self._next < len(self._order):
                    spec = self._order[self._next]
                    result = results.get(spec.id)
                    if result is None:
                        return  # still running: later ones wait, so the order holds
                    if result.branch and not gitops.branch_exists(self.repo, result.branch):
                        return  # a pool worker's branch, fetched at the end
                    with telemetry.span("claudecluster.merge", {telemetry.TASK_ID: spec.id}):
                        if not merger.offer(spec, resolve=False):
                            self._held_up = True  # a conflict: finish() resolves it, in order
                            return
                    self._next += 1
            except Exception:  # finish() merges what is left, and reports what fails
                _log.warning("merging while the run goes on stopped", exc_info=True)
                self._held_up = True


class _Merger:
    """Merges task branches one by one onto the integration worktree's branch."""

    outcome: IntegrationOutcome

    def __init__(
        self,
        repo: git.Repo,
        integration: git.Repo,
        plan: Plan,
        results: dict[str, TaskResult],
        resolver: Resolver | None,
        scratch_root: Path,
    ) -> None:
        self.repo, self.integration, self.plan = repo, integration, plan
        self.results, self.resolver, self.scratch_root = results, resolver, scratch_root
        self.merged: set[str] = set()

    def offer(self, spec: TaskSpec, *, resolve: bool = True) -> bool:
        """Merge ``spec``'s branch if it has one and may be merged; else say why not.

        Without ``resolve`` a conflict changes nothing and returns False (to be offered
        again with it); otherwise the task is settled and True is returned.
        """
        result = self.results.get(spec.id)
        if result is None or result.branch is None:
            return True  # skipped, no changes, or never ran: nothing to merge
        if reason := self._refusal(spec, result):
            self._keep(spec, result.branch, reason)
            return True
        try:
            self.outcome.head_commit = gitops.merge_branch(
                self.integration, result.branch, f"Merge task {spec.id}: {spec.title}"
            )
        except gitops.MergeConflictError as conflict:
            if not resolve:
                return False
            if not self._resolve(spec, result.branch, conflict):
                return True
        self.merged.add(spec.id)
        self.outcome.merged.append(spec.id)
        return True

    def _refusal(self, spec: TaskSpec, result: TaskResult) -> str | None:
        if result.status is not TaskStatus.SUCCEEDED:
            return _not_merged_reason(result)
        missing = [dep for dep in spec.depends_on if dep not in self.merged and self._has_work(dep)]
        return "depends on unmerged task(s) " + ", ".join(missing) if missing else None

    def _resolve(self, spec: TaskSpec, branch: str, conflict: gitops.MergeConflictError) -> bool:
        """Give the conflict to the resolver; True when it was merged that way."""
        others = self._touching(conflict.files)
        resolution = None
        if self.resolver is not None:
            with telemetry.span("claudecluster.resolve_conflict", {telemetry.TASK_ID: spec.id}):
                resolution = self._resolution(spec, branch, others)
            self.outcome.resolution_cost_usd += resolution.cost_usd
        if resolution is None or not resolution.ok:
            with_whom = f" with task(s) {', '.join(others)}" if others else ""
            tried = f"; {resolution.reason}" if resolution else ""
            self._keep(
                spec,
                branch,
                f"merge conflict{with_whom} in {', '.join(conflict.files)}{tried}; the branch "
                "is kept, merge it by hand or re-run the task",
                conflict.files,
            )
            return False
        self.outcome.head_commit = gitops.head_commit(self.integration)
        self.outcome.resolved.append(spec.id)
        return True

    def _resolution(self, spec: TaskSpec, branch: str, others: list[str]) -> Resolution:
        """Merge ``branch`` onto the integration head in a fresh worktree; resolve it there."""
        assert self.resolver is not None
        head = gitops.head_commit(self.integration)
        with gitops.scratch_worktree(
            self.repo, self.scratch_root, f"resolve-{spec.id}", head
        ) as scratch:
            files = gitops.start_merge(scratch, branch)
            by_id = self.plan.by_id()
            resolution = self.resolver(
                Path(scratch.working_dir),
                files,
                spec,
                [by_id[o] for o in others if o in by_id],
                spec.verify or self.plan.verify,
            )
            if resolution.ok:
                merge = gitops.finish_merge(
                    scratch, f"Merge task {spec.id}: {spec.title} (conflict resolved)"
                )
                gitops.fast_forward(self.integration, merge)
        return resolution

    def _keep(
        self, spec: TaskSpec, branch: str, reason: str, files: list[str] | None = None
    ) -> None:
        self.outcome.unmerged.append(
            UnmergedTask(id=spec.id, branch=branch, reason=reason, conflicting_files=files or [])
        )

    def _has_work(self, task_id: str) -> bool:
        result = self.results.get(task_id)
        return result is not None and result.branch is not None

    def _touching(self, files: list[str]) -> list[str]:
        """Merged tasks that changed any of ``files``."""
        wanted = set(files)
        return [
            task_id
            for task_id in sorted(self.merged)
            if wanted & {change.path for change in self.results[task_id].files}
        ]
