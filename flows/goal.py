"""The goal flow (the Driver): plan, run workers in parallel, integrate, verify, report.

One goal is one Prefect flow run; the planner, every worker and the integration step are its
task runs (or, on work pools, its child flow runs), so the graph, logs and artifacts show in
the Prefect UI. The flow only orchestrates: scheduling is in :mod:`claudecluster.dispatch`,
the work in the tasks, the verdict in :mod:`claudecluster.summary`.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import FlowRun, State
from prefect.context import FlowRunContext
from prefect.states import Completed, Failed

from claudecluster import gitops, remote
from claudecluster.artifacts import artifact_key, plan_markdown, publish_run_artifacts
from claudecluster.blocks.repository import load_target
from claudecluster.blocks.settings import load_settings_block, resolve_settings
from claudecluster.dispatch import RunContext, run_tasks
from claudecluster.errors import PlannerError, UsageError
from claudecluster.models import (
    RunReport,
    RunStatus,
    TaskResult,
    WorkerSettings,
)
from claudecluster.plan import (
    Plan,
    pools_in,
    validate_plan,
)
from claudecluster.pools import check_reachable, worker_deployments
from claudecluster.progress import RunProgress
from claudecluster.session import preload_sdk
from claudecluster.summary import build_report, planning_failed_report
from claudecluster.tasks.integrate import integrate_branches
from claudecluster.tasks.plan import plan_goal
from claudecluster.worker import default_worktree_root, new_run_id

DEFAULT_MAX_TASKS = 12
# A plan file is the user's own decision; this only stops an accidental runaway.
PLAN_FILE_MAX_TASKS = 1000


def publish_branches(repo: Any, report: RunReport, *, env: dict[str, str]) -> None:
    """Push the run's task branches and its integration branch to a remote repository."""
    branches = [r.branch for r in report.tasks if r.branch]
    if report.integration_branch:
        branches.append(report.integration_branch)
    for branch in branches:
        remote.push(repo, branch, env=env)


def _goal_run_name() -> str:
    """The flow run's name is its run id: the one given, or a new one (deployment runs)."""
    from prefect.runtime import flow_run

    given = flow_run.parameters.get("run_id")
    return str(given) if given else new_run_id()


def cancel_child_runs(flow: Any, flow_run: FlowRun, state: State[Any]) -> None:
    """When a goal run is cancelled, cancel the worker flow runs it dispatched to pools."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelling

    final = [StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED]
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=final)),
            )
        )
        for child in children:
            client.set_flow_run_state(child.id, Cancelling(), force=True)


@flow(
    name="claudecluster-goal",
    flow_run_name=_goal_run_name,
    log_prints=False,
    on_cancellation=[cancel_child_runs],
)
def goal_flow(
    goal: str = "",
    repo: str | None = None,
    plan: Plan | None = None,
    verify: str | None = None,
    max_parallel: int = 2,
    max_tasks: int | None = None,
    settings: WorkerSettings | None = None,
    base_commit: str | None = None,
    run_id: str = "",
    worktree_root: str | None = None,
    pool: str | None = None,
    settings_block: str | None = None,
    repo_block: str | None = None,
    budget_usd: float | None = None,
) -> State[RunReport]:
    """Turn ``goal`` into a plan, run it, merge it and report; the run fails unless all did.

    ``repo`` (or a TargetRepository block named by ``repo_block``) is the repository;
    ``settings_block`` names a ClaudeCodeSettings block, whose values ``settings`` overrides.
    ``budget_usd`` caps the goal's spending: once reached, no further task starts.
    """
    preload_sdk()  # overlaps with the start-up below, which mostly waits on the server
    logger = get_run_logger()
    started = time.monotonic()
    settings, _ = resolve_settings(settings, settings_block)
    if budget_usd is None and settings_block:
        budget_usd = load_settings_block(settings_block).budget_usd
    context = FlowRunContext.get()
    run_id = run_id or (context.flow_run.name if context and context.flow_run else new_run_id())
    root = worktree_root or str(default_worktree_root())
    git_env: dict[str, str] = {}
    if repo_block:
        target = load_target(repo_block)
        repo, base_commit = target.location, base_commit or target.branch
        git_env = target.git_env()
    if not repo:
        raise UsageError("no repository given", hint="Pass repo or repo_block.")
    url = repo if remote.is_remote(repo) else None
    git_repo = (
        remote.cache_clone(url, Path(root) / "clones", env=git_env)
        if url
        else gitops.open_repo(repo)
    )
    repo = str(Path(git_repo.working_dir))
    base = gitops.resolve_commit(git_repo, base_commit)
    if plan is not None and not goal:
        goal = plan.goal or ""
    progress = RunProgress(run_id)
    planner_result: TaskResult | None = None
    if plan is None:
        progress.planning()
        try:
            plan, planner_result = plan_goal(
                goal,
                repo,
                base,
                settings,
                run_id,
                max_tasks or DEFAULT_MAX_TASKS,
                verify,
                root,
                settings_block=settings_block,
            )
        except PlannerError as exc:
            report = planning_failed_report(run_id, goal, url or repo, base, exc, started)
            publish_run_artifacts(report, None)
            progress.complete(f"run failed: {exc.message}")
            return Failed(data=report, message=exc.one_line())
        progress.cost_usd += planner_result.cost_usd
    else:
        plan = validate_plan(plan, Path(repo), max_tasks=max_tasks or PLAN_FILE_MAX_TASKS)
        if verify is not None:
            plan.verify = verify
    plan.goal = plan.goal or goal
    create_markdown_artifact(
        key=artifact_key(run_id, "plan"), markdown=plan_markdown(plan), description="The plan"
    )
    progress.planned(len(plan.tasks))
    logger.info("run %s: %d tasks from %s", run_id, len(plan.tasks), base[:12])

    targets = worker_deployments(pools_in(plan, pool))
    check_reachable(targets, repo_is_url=url is not None)
    with ExitStack() as stack:
        repo_url = url
        if repo_url is None and not all(t.shares_disk for t in targets.values()):
            repo_url = stack.enter_context(remote.ServedRepository(Path(repo))).url
            logger.info("serving %s to the pools' workers at %s", repo, repo_url)
        run = RunContext(
            repo=repo,
            base_commit=base,
            settings=settings,
            run_id=run_id,
            max_parallel=max_parallel,
            worktree_root=root,
            pool=pool,
            settings_block=settings_block,
            repo_block=repo_block,
            targets=targets,
            repo_url=repo_url,
            budget_usd=budget_usd,
        )
        results = run_tasks(plan, run, progress)
    if url:  # workers in containers pushed their branches to the remote
        remote.fetch(git_repo, env=git_env, pattern=f"{gitops.BRANCH_PREFIX}/{run_id}/*")
    progress.integrating()
    integration = integrate_branches(
        repo,
        base,
        run_id,
        plan,
        results,
        plan.verify,
        settings.verify_timeout_s,
        root,
        settings=settings,
        settings_block=settings_block,
    )
    report = build_report(
        run_id=run_id,
        goal=goal,
        repo=url or repo,
        base_commit=base,
        plan=plan,
        results=results,
        integration=integration,
        planner=planner_result,
        started=started,
    )
    if url:
        publish_branches(git_repo, report, env=git_env)
    publish_run_artifacts(report, plan)
    progress.complete(f"run {report.status}")
    if report.status is RunStatus.SUCCEEDED:
        return Completed(data=report, message="every task succeeded, merged and verified")
    return Failed(data=report, message=report.error or "the run failed")
