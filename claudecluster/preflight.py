"""Everything a goal run checks before it pays for anything, in one place.

The CLI and the Python API call :func:`check_server_side` before they create a flow run;
the goal flow calls :func:`prepare_goal` first thing, so a deployment run started from the
Prefect UI or ``prefect deployment run`` meets the very same checks. A run that would fail
on its input fails here, with a one-line :class:`~claudecluster.errors.UsageError`, before
the planner or any worker session makes a model request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from claudecluster.blocks.repository import load_target, resolve_target
from claudecluster.blocks.settings import (
    ResolvedSettings,
    load_settings_block,
    resolve_pull_request,
    resolve_settings,
)
from claudecluster.checks import (
    PLAN_FILE_MAX_TASKS,
    check_goal,
    check_limits,
    check_model_api,
)
from claudecluster.models import (
    PullRequestMode,
    PullRequestOptions,
    ReviewMode,
    WorkerSettings,
)
from claudecluster.plan import Plan, pools_in, validate_plan
from claudecluster.pools import PoolTarget, check_reachable, worker_deployments
from claudecluster.pull_request import ForgeTarget, prepare_forge_target
from claudecluster.remote import is_remote
from claudecluster.target import Target


@dataclass(frozen=True)
class PreparedGoal:
    """A goal's inputs, checked and resolved."""

    goal: str
    target: Target
    settings: ResolvedSettings
    plan: Plan | None  # None: the planner plans
    pools: dict[str, PoolTarget]  # the work pools the run dispatches to (not local)
    pull_request: PullRequestOptions = field(default_factory=PullRequestOptions)
    forge: ForgeTarget | None = None  # where the pull request goes, when one is wanted


def prepare_goal(
    *,
    goal: str,
    repo: str | None,
    repo_block: str | None,
    plan: Plan | None,
    verify: str | None,
    max_parallel: int,
    max_tasks: int | None,
    settings: WorkerSettings | None,
    settings_block: str | None,
    budget_usd: float | None,
    base_commit: str | None,
    pool: str | None,
    worktree_root: Path,
    pr: PullRequestMode | None = None,
    review: ReviewMode | None = None,
    forge_api_url: str | None = None,
    pr_base: str | None = None,
) -> PreparedGoal:
    """Resolve and check a goal run's inputs; UsageError (one line) for anything wrong."""
    check_limits(max_parallel=max_parallel, budget_usd=budget_usd)
    resolved = resolve_settings(settings, settings_block, budget_usd=budget_usd)
    check_limits(max_parallel=None, budget_usd=resolved.budget_usd)
    target = resolve_target(
        repo, repo_block, base=base_commit, clones_root=worktree_root / "clones"
    )
    if plan is not None:
        plan = validate_plan(plan, target.root, max_tasks=max_tasks or PLAN_FILE_MAX_TASKS)
        if verify is not None:
            plan.verify = verify
    text = check_goal(goal if goal.strip() else (plan.goal if plan else None) or "")
    pools = worker_deployments(pools_in(plan, pool))
    check_reachable(pools, repo_is_url=target.url is not None)
    options = resolve_pull_request(pr, review, forge_api_url, settings_block)
    forge = None
    if options.wanted:
        token, block_api_url = (
            load_target(repo_block).forge_credentials() if repo_block else (None, None)
        )
        forge = prepare_forge_target(
            target.repo,
            location=target.url,
            base=pr_base or base_commit,
            token=token,
            api_url=options.forge_api_url or block_api_url,
            remote_name=options.remote,
        )
    check_model_api(resolved.env)
    return PreparedGoal(
        goal=text,
        target=target,
        settings=resolved,
        plan=plan,
        pools=pools,
        pull_request=options,
        forge=forge,
    )


def check_server_side(
    plan: Plan | None,
    *,
    pool: str | None,
    repo: str | Path | None,
    repo_block: str | None,
    settings_block: str | None,
) -> None:
    """What needs the server, checked before a flow run exists: the blocks and the pools."""
    location = load_target(repo_block).location if repo_block else str(repo)
    if settings_block:
        load_settings_block(settings_block)
    check_reachable(worker_deployments(pools_in(plan, pool)), repo_is_url=is_remote(location))
