"""Integration: merge the succeeded task branches in dependency order, then verify.

The integration branch is created from the run's base commit in its own worktree, so the
user's checkout is untouched. A branch that conflicts is never lost: the merge is aborted,
the task branch stays as it is, and the report says which task, which files and why.
"""

from __future__ import annotations

from pathlib import Path

import git
from pydantic import Field

from claudecluster import gitops
from claudecluster.models import (
    TaskResult,
    TaskSpec,
    TaskStatus,
    TestReport,
    UnmergedTask,
    _Model,
)
from claudecluster.plan import Plan
from claudecluster.resolve import Resolution, Resolver
from claudecluster.verify import run_verify


class IntegrationOutcome(_Model):
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
    from claudecluster.plan import topological_order

    repo = gitops.open_repo(repo_path)
    branch = gitops.integration_branch(run_id)
    path = worktree_root / run_id / "integration"
    worktree = gitops.add_worktree(repo, path, branch, base_commit)
    outcome = IntegrationOutcome(branch=branch, head_commit=base_commit)
    merged: set[str] = set()
    scratch = git.Repo(worktree.path)
    try:
        for spec in topological_order(plan):
            result = results.get(spec.id)
            if result is None or result.branch is None:
                continue  # skipped, no changes, or never ran: nothing to merge
            if result.status is not TaskStatus.SUCCEEDED:
                outcome.unmerged.append(
                    UnmergedTask(
                        id=spec.id, branch=result.branch, reason=_not_merged_reason(result)
                    )
                )
                continue
            missing = [
                dep for dep in spec.depends_on if dep not in merged and _has_work(results, dep)
            ]
            if missing:
                outcome.unmerged.append(
                    UnmergedTask(
                        id=spec.id,
                        branch=result.branch,
                        reason="depends on unmerged task(s) " + ", ".join(missing),
                    )
                )
                continue
            try:
                outcome.head_commit = gitops.merge_branch(
                    scratch, result.branch, f"Merge task {spec.id}: {spec.title}"
                )
            except gitops.MergeConflictError as conflict:
                others = _touching(results, merged, conflict.files)
                resolution = None
                if resolver is not None:
                    resolution = _resolve(
                        repo,
                        scratch,
                        spec,
                        result.branch,
                        plan,
                        others,
                        resolver,
                        worktree_root / run_id,
                    )
                    outcome.resolution_cost_usd += resolution.cost_usd
                if resolution is None or not resolution.ok:
                    with_whom = f" with task(s) {', '.join(others)}" if others else ""
                    tried = f"; {resolution.reason}" if resolution else ""
                    outcome.unmerged.append(
                        UnmergedTask(
                            id=spec.id,
                            branch=result.branch,
                            reason=f"merge conflict{with_whom} in {', '.join(conflict.files)}"
                            f"{tried}; the branch is kept, merge it by hand or re-run the task",
                            conflicting_files=conflict.files,
                        )
                    )
                    continue
                outcome.head_commit = str(scratch.head.commit.hexsha)
                outcome.resolved.append(spec.id)
            merged.add(spec.id)
            outcome.merged.append(spec.id)
        if verify:
            outcome.final_verify = run_verify(verify, worktree.path, verify_timeout_s)
    finally:
        scratch.close()
        gitops.remove_worktree(repo, worktree.path)
    return outcome


def _resolve(
    repo: git.Repo,
    integration: git.Repo,
    spec: TaskSpec,
    branch: str,
    plan: Plan,
    others: list[str],
    resolver: Resolver,
    root: Path,
) -> Resolution:
    """Merge ``branch`` onto the integration head in a fresh worktree and resolve it there."""
    head = str(integration.head.commit.hexsha)
    with gitops.scratch_worktree(repo, root, f"resolve-{spec.id}", head) as scratch:
        files = gitops.start_merge(scratch, branch)
        by_id = plan.by_id()
        resolution = resolver(
            Path(scratch.working_dir),
            files,
            spec,
            [by_id[o] for o in others if o in by_id],
            spec.verify or plan.verify,
        )
        if resolution.ok:
            merge = gitops.finish_merge(
                scratch, f"Merge task {spec.id}: {spec.title} (conflict resolved)"
            )
            gitops.fast_forward(integration, merge)
    return resolution


def _has_work(results: dict[str, TaskResult], task_id: str) -> bool:
    result = results.get(task_id)
    return result is not None and result.branch is not None


def _touching(results: dict[str, TaskResult], merged: set[str], files: list[str]) -> list[str]:
    wanted = set(files)
    return [
        task_id
        for task_id in sorted(merged)
        if wanted & {change.path for change in results[task_id].files}
    ]
