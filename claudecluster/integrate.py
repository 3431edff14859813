"""Integration: merge the succeeded task branches in dependency order, then verify.

The integration branch is created from the run's base commit in its own worktree, so the
user's checkout is untouched. A branch that conflicts is never lost: the merge is aborted,
the task branch stays as it is, and the report says which task, which files and why.
"""

from __future__ import annotations

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
    repo = gitops.open_repo(repo_path)
    branch = gitops.integration_branch(run_id)
    path = worktree_root / run_id / "integration"
    with gitops.branch_worktree(repo, path, branch, base_commit) as integration:
        merger = _Merger(repo, integration, plan, results, resolver, worktree_root / run_id)
        merger.outcome = IntegrationOutcome(branch=branch, head_commit=base_commit)
        for spec in topological_order(plan):
            with telemetry.span("claudecluster.merge", {telemetry.TASK_ID: spec.id}):
                merger.offer(spec)
        if verify:
            with telemetry.span("claudecluster.verify", {telemetry.RUN_ID: run_id}):
                merger.outcome.final_verify = run_verify(
                    verify, Path(integration.working_dir), verify_timeout_s
                )
    return merger.outcome


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

    def offer(self, spec: TaskSpec) -> None:
        """Merge ``spec``'s branch if it has one and may be merged; else say why not."""
        result = self.results.get(spec.id)
        if result is None or result.branch is None:
            return  # skipped, no changes, or never ran: nothing to merge
        if reason := self._refusal(spec, result):
            self._keep(spec, result.branch, reason)
            return
        try:
            self.outcome.head_commit = gitops.merge_branch(
                self.integration, result.branch, f"Merge task {spec.id}: {spec.title}"
            )
        except gitops.MergeConflictError as conflict:
            if not self._resolve(spec, result.branch, conflict):
                return
        self.merged.add(spec.id)
        self.outcome.merged.append(spec.id)

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
