"""The goal flow (the Driver): plan, run workers in parallel, integrate, verify, report.

One goal is one Prefect flow run; the planner, every worker and the integration step are its
task runs (or, on work pools, its child flow runs), so the graph, logs and artifacts show in
the Prefect UI. The flow only orchestrates: its inputs are checked by
:mod:`claudecluster.preflight`, scheduling is in :mod:`claudecluster.dispatch`, the work in
the tasks, the verdict in :mod:`claudecluster.summary`.

Started from the Prefect UI or ``prefect deployment run``, it checks its inputs exactly as
the CLI does, before any model request: a bad run fails at once, saying why in one line.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import FlowRun, State
from prefect.states import Completed, Failed
from prefect.utilities.urls import url_for

from claudecluster import remote, telemetry
from claudecluster.artifacts import publish_plan_artifact, publish_run_artifacts
from claudecluster.checks import DEFAULT_MAX_TASKS
from claudecluster.concurrency import session_slot
from claudecluster.dispatch import RunContext, run_tasks
from claudecluster.errors import ClaudeClusterError, ReviewError
from claudecluster.gitops import BRANCH_PREFIX
from claudecluster.integrate import Integration
from claudecluster.journal import RunJournal
from claudecluster.models import (
    PullRequestMode,
    ReviewMode,
    RunReport,
    RunStatus,
    TaskResult,
    WorkerSettings,
)
from claudecluster.plan import Plan
from claudecluster.preflight import PreparedGoal, prepare_goal
from claudecluster.progress import RunProgress
from claudecluster.runs import (
    RunIdentity,
    current_identity,
    stable_run_name,
    tag_current_run,
    untagged_task_runs,
)
from claudecluster.server_watch import current_watch
from claudecluster.session import SessionHost, preload_sdk
from claudecluster.summary import build_report, interrupted_report, planning_failed_report
from claudecluster.tasks.integrate import integrate_branches
from claudecluster.tasks.plan import plan_goal
from claudecluster.tasks.pull_request import open_pull_request, review_integration
from claudecluster.workspace import default_worktree_root

# Before any flow run starts, so Prefect's own spans go to the collector too.
telemetry.setup()


def publish_branches(repo: Any, report: RunReport, *, env: dict[str, str]) -> None:
    """Push the run's task branches and its integration branch to a remote repository."""
    branches = [r.branch for r in report.tasks if r.branch]
    if report.integration_branch:
        branches.append(report.integration_branch)
    for branch in branches:
        remote.push(repo, branch, env=env)


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
    flow_run_name=stable_run_name,
    log_prints=False,
    on_cancellation=[cancel_child_runs],
)
def goal_flow(
    goal: str,
    repo: str | None = None,
    repo_block: str | None = None,
    base: str | None = None,
    plan: Plan | None = None,
    verify: str | None = None,
    pool: str | None = None,
    max_parallel: int = 2,
    max_tasks: int | None = None,
    budget_usd: float | None = None,
    settings: WorkerSettings | None = None,
    settings_block: str | None = None,
    pr: PullRequestMode | None = None,
    review: ReviewMode | None = None,
    forge_api_url: str | None = None,
    pr_base: str | None = None,
) -> State[RunReport]:
    """Turn a goal into a plan, run it, merge it and report; the run fails unless all did.

    Args:
        goal: What the run should achieve, in a sentence or two (for example "Add type hints
            to every module"). With a plan, its own goal is used when this is empty.
        repo: The git repository: a path on the machine this run runs on, or a git URL.
        repo_block: A ClaudeCluster Target Repository block to use instead of repo (it can
            hold credentials for a URL).
        base: The branch, tag or commit the tasks start from; HEAD (or the repository
            block's branch) when empty.
        plan: A plan to run instead of asking the planner (the plan file's format).
        verify: The shell command that checks the work, run after each task and on the
            integration branch (for example "python -m pytest -q"); overrides the plan's.
        pool: The work pool for tasks that name none; empty runs them in this flow run.
        max_parallel: How many Claude Code sessions run at once.
        max_tasks: The most tasks the planner may plan (default 12).
        budget_usd: The most the whole goal may spend, in USD; sessions stop once it is spent.
        settings: Model, permissions and per-session limits (override the settings block).
        settings_block: A ClaudeCluster Claude Code Settings block (model, limits, API key).
        pr: What to do with the integration branch on the repository's forge: off (the
            default), branch (push it), draft or ready (open or update a pull request).
        review: The review a pull request gets: summary (one comment, the default), lines
            (also a review with line comments) or none.
        forge_api_url: The forge's API base URL when the remote is not on github.com
            (https://HOST/api/v3 for GitHub Enterprise, https://HOST/api/v1 for Gitea).
        pr_base: The branch the pull request merges into; by default base when it names a
            branch, else the repository's checked-out branch.
    """
    preload_sdk()  # overlaps with the start-up below, which mostly waits on the server
    started = time.monotonic()
    identity = current_identity(goal=goal or (plan.goal if plan else None))
    tag_current_run(identity.tags)
    telemetry.set_attributes(
        {
            telemetry.RUN_ID: identity.run_id,
            telemetry.GOAL: telemetry.goal_attribute(goal or (plan.goal if plan else None) or ""),
        }
    )
    with untagged_task_runs():
        try:
            prepared = prepare_goal(
                goal=goal,
                repo=repo,
                repo_block=repo_block,
                plan=plan,
                verify=verify,
                max_parallel=max_parallel,
                max_tasks=max_tasks,
                settings=settings,
                settings_block=settings_block,
                budget_usd=budget_usd,
                base_commit=base,
                pool=pool,
                worktree_root=default_worktree_root(),
                pr=pr,
                review=review,
                forge_api_url=forge_api_url,
                pr_base=pr_base,
            )
        except ClaudeClusterError as exc:
            return _not_started(identity, exc)
        return _drive(
            identity,
            prepared,
            max_parallel=max_parallel,
            max_tasks=max_tasks,
            verify=verify,
            pool=pool,
            started=started,
            settings_block=settings_block,
            repo_block=repo_block,
        )


def _not_started(identity: RunIdentity, exc: ClaudeClusterError) -> State[RunReport]:
    """Bad input: a failed run that says why in one line, before any model request."""
    from prefect.artifacts import create_markdown_artifact

    from claudecluster.naming import artifact_key

    get_run_logger().error("not started: %s", exc.one_line())
    create_markdown_artifact(
        key=artifact_key(identity.scope, "summary"),
        markdown=f"# ClaudeCluster run {identity.run_id}: NOT STARTED\n\n> {exc.one_line()}\n",
        description=f"Summary of run {identity.run_id}",
    )
    return Failed(data=exc, message=exc.one_line())


def _drive(
    identity: RunIdentity,
    prepared: PreparedGoal,
    *,
    max_parallel: int,
    max_tasks: int | None,
    verify: str | None,
    pool: str | None,
    started: float,
    settings_block: str | None,
    repo_block: str | None,
) -> State[RunReport]:
    logger = get_run_logger()
    run_id, scope = identity.run_id, identity.scope
    goal, target, resolved = prepared.goal, prepared.target, prepared.settings
    root = default_worktree_root()
    host = SessionHost(slot=session_slot, env=resolved.env)
    progress = RunProgress(
        run_id, scope=scope, flow_run_id=identity.flow_run_id, tags=identity.tags
    )
    planner_result: TaskResult | None = None
    plan = prepared.plan
    if plan is None:
        progress.planning()
        plan, planner_result = plan_goal(
            goal,
            str(target.root),
            target.base_commit,
            resolved.settings,
            max_tasks or DEFAULT_MAX_TASKS,
            verify,
            str(root),
            host,
        )
        if plan is None:
            report = planning_failed_report(
                run_id,
                goal,
                target.location,
                target.base_commit,
                planner_result,
                started,
                identity.flow_run_id,
            )
            RunJournal(run_id).save_report(report)
            publish_run_artifacts(report, None, scope)
            progress.complete(f"run failed: {planner_result.error}")
            return Failed(data=report, message=planner_result.error or "the planner failed")
        progress.cost_usd += planner_result.cost_usd
    plan.goal = plan.goal or goal
    publish_plan_artifact(plan, scope)
    progress.planned([task.id for task in plan.tasks])
    logger.info("run %s: %d tasks from %s", run_id, len(plan.tasks), target.base_commit[:12])

    watch = current_watch()

    def report_interrupted(results: dict[str, TaskResult]) -> None:
        """The server is gone and the running sessions finished: report from here."""
        report = interrupted_report(
            run_id=run_id,
            goal=goal,
            repo=target.location,
            base_commit=target.base_commit,
            plan=plan,
            results=results,
            planner=planner_result,
            started=started,
            lost_at=watch.lost_at if watch else None,
            budget_usd=resolved.budget_usd,
            flow_run_id=identity.flow_run_id,
        )
        RunJournal(run_id).save_report(report)

    with ExitStack() as stack:
        integration = stack.enter_context(
            Integration(str(target.root), target.base_commit, run_id, plan, worktree_root=root)
        )
        repo_url = target.url
        if repo_url is None and not all(t.shares_disk for t in prepared.pools.values()):
            repo_url = stack.enter_context(remote.ServedRepository(target.root)).url
            logger.info("serving %s to the pools' workers at %s", target.root, repo_url)
        run = RunContext(
            run_id=run_id,
            repo=str(target.root),
            base_commit=target.base_commit,
            settings=resolved.settings,
            max_parallel=max_parallel,
            worktree_root=str(root),
            pool=pool,
            settings_block=settings_block,
            repo_block=repo_block,
            targets=prepared.pools,
            repo_url=repo_url,
            budget_usd=resolved.budget_usd,
            session_env=resolved.env,
            server_watch=watch,
            on_drained=report_interrupted,
            tags=identity.tags,
            artifact_scope=scope,
            origin_env=target.git_env if target.url else None,
            # Branches are merged as tasks finish, unless they come from a remote at the end.
            on_result=None if target.url else integration.offer,
        )
        results = run_tasks(plan, run, progress)
        if watch is not None and watch.lost.is_set():
            # Nothing more can be recorded on the server; the report is in the run journal.
            lost_report = RunJournal(run_id).report()
            message = lost_report.error if lost_report else "the Prefect server was lost"
            return Failed(data=lost_report, message=message or "the Prefect server was lost")
        if target.url:  # workers in containers pushed their branches to the remote
            remote.fetch(
                target.repo, env=dict(target.git_env), pattern=f"{BRANCH_PREFIX}/{run_id}/*"
            )
        progress.integrating()
        outcome = integrate_branches(integration, results, resolved.settings, host)
    report = build_report(
        run_id=run_id,
        goal=goal,
        repo=target.location,
        base_commit=target.base_commit,
        plan=plan,
        results=results,
        integration=outcome,
        planner=planner_result,
        started=started,
        flow_run_id=identity.flow_run_id,
        budget_usd=resolved.budget_usd,
    )
    report.ui_url = report.ui_url or url_for("flow-run", obj_id=identity.flow_run_id)
    report.trace_id = telemetry.current_trace_id()
    report.trace_url = telemetry.trace_url(report.trace_id)
    _record_run_metrics(report, outcome.resolved, resolved.budget_usd)
    RunJournal(run_id).save_report(report)
    if target.url:
        publish_branches(target.repo, report, env=dict(target.git_env))
    if prepared.forge is not None:
        _pull_request(report, plan, prepared, host, str(root), scope)
        RunJournal(run_id).save_report(report)
    publish_run_artifacts(report, plan, scope)
    progress.complete(f"run {report.status}")
    telemetry.flush()
    if report.status is RunStatus.SUCCEEDED:
        return Completed(data=report, message="every task succeeded, merged and verified")
    return Failed(data=report, message=report.error or "the run failed")


def _pull_request(
    report: RunReport,
    plan: Plan,
    prepared: PreparedGoal,
    host: SessionHost,
    worktree_root: str,
    scope: str,
) -> None:
    """Review the integration branch and open or update its pull request, into ``report``.

    A review that fails leaves the pull request without one; a pull request that cannot be
    opened fails the run, with the work kept on its integration branch.
    """
    logger = get_run_logger()
    options, forge = prepared.pull_request, prepared.forge
    assert forge is not None
    if report.integration_branch is None or report.head_commit is None:
        logger.warning("no pull request: nothing was merged onto an integration branch")
        return
    review, diff, review_cost = None, "", 0.0
    wants_review = options.review is not ReviewMode.NONE and options.mode in (
        PullRequestMode.DRAFT,
        PullRequestMode.READY,
    )
    budget = prepared.settings.budget_usd
    if wants_review and budget is not None and report.totals.cost_usd >= budget:
        logger.warning("no review: the goal's budget of $%.2f is spent", budget)
        wants_review = False
    if wants_review:
        try:
            review, diff, review_cost = review_integration(
                report,
                plan,
                str(prepared.target.root),
                prepared.settings.settings,
                worktree_root,
                host,
            )
        except ReviewError as exc:
            logger.warning("no review: %s", exc.one_line())
            review_cost = exc.cost_usd
        report.totals.cost_usd += review_cost
    try:
        report.pull_request = open_pull_request(
            report,
            str(prepared.target.root),
            forge,
            options.mode,
            review,
            diff,
            review_cost,
            scope,
            options.review is ReviewMode.LINES,
        )
    except ClaudeClusterError as exc:
        report.status = RunStatus.FAILED
        report.error = (
            f"the pull request step failed: {exc.one_line()} "
            f"The work is kept on {report.integration_branch}."
        )
        logger.error("%s", report.error)


def _record_run_metrics(report: RunReport, resolved: list[str], budget_usd: float | None) -> None:
    """Merges, conflicts and the budget's use, as cluster metrics (when telemetry is on)."""
    metrics = telemetry.instruments()
    if metrics is None:
        return
    merged = [r for r in report.tasks if r.status.ok and r.branch]
    unmerged = {u.id for u in report.unmerged}
    metrics.merges.add(len([r for r in merged if r.id not in unmerged]), {"outcome": "merged"})
    metrics.merges.add(len(resolved), {"outcome": "conflict_resolved"})
    metrics.merges.add(len(unmerged), {"outcome": "not_merged"})
    if budget_usd:
        metrics.budget_spent.record(report.totals.cost_usd / budget_usd)
