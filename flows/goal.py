"""The goal flow (the Driver): plan, run workers in parallel, integrate, verify, report.

One goal is one Prefect flow run; the planner, every worker and the integration step are its
task runs, so the graph, logs and artifacts show in the Prefect UI.

Scheduling uses Prefect's machinery: workers are submitted to a ``ThreadPoolTaskRunner``
whose width is ``max_parallel``, each receives its dependencies' futures (which draws the
graph's edges and hands it their branches), and the flow reacts to completions with
``as_completed``. A task is submitted only once it can start (its dependencies succeeded
and no running task holds a lease on overlapping paths), because a submitted task waiting
on upstream futures would occupy one of the ``max_parallel`` threads while it waits.
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
from prefect.deployments import run_deployment
from prefect.futures import PrefectFlowRunFuture, PrefectFuture, as_completed
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel

from claudecluster import gitops, remote
from claudecluster.artifacts import artifact_key, plan_markdown, publish_run_artifacts
from claudecluster.blocks.repository import load_target
from claudecluster.blocks.settings import resolve_settings
from claudecluster.errors import PlannerError, UsageError
from claudecluster.integrate import IntegrationOutcome
from claudecluster.models import (
    FailureReason,
    RunReport,
    RunStatus,
    RunTotals,
    TaskResult,
    TaskSpec,
    TaskStatus,
    TokenUsage,
    WorkerSettings,
)
from claudecluster.plan import (
    Plan,
    ancestors,
    paths_overlap,
    pools_in,
    topological_order,
    validate_plan,
)
from claudecluster.pools import LOCAL_POOL, PoolTarget, pool_for, worker_deployments
from claudecluster.progress import RunProgress
from claudecluster.tasks.integrate import integrate_branches
from claudecluster.tasks.plan import plan_goal
from claudecluster.tasks.worker import run_worker
from claudecluster.worker import default_worktree_root, new_run_id

DEFAULT_MAX_TASKS = 12
# A plan file is the user's own decision; this only stops an accidental runaway.
PLAN_FILE_MAX_TASKS = 1000


def _skipped(spec: TaskSpec, base_commit: str, failed: list[str]) -> TaskResult:
    return TaskResult(
        id=spec.id,
        title=spec.title,
        kind=spec.kind,
        status=TaskStatus.SKIPPED,
        failure_reason=FailureReason.DEPENDENCY_FAILED,
        error="skipped: dependency " + ", ".join(failed) + " did not succeed",
        base_commit=base_commit,
    )


def _holds_lease(plan: Plan, candidate: TaskSpec, running: list[str]) -> str | None:
    """The running task whose paths overlap ``candidate``'s, unless they are related."""
    by_id = plan.by_id()
    for other_id in running:
        other = by_id[other_id]
        related = other_id in ancestors(plan, candidate.id) or candidate.id in ancestors(
            plan, other_id
        )
        if not related and paths_overlap(candidate.paths, other.paths):
            return other_id
    return None


def dispatch_to_pool(
    deployment: str, parameters: dict[str, Any], run_id: str
) -> PrefectFlowRunFuture[TaskResult]:
    """Start a task as a flow run of a pool's worker deployment; returns at once."""
    json_parameters = {
        key: (
            value.model_dump(mode="json")
            if isinstance(value, BaseModel)
            else [v.model_dump(mode="json") for v in value]
            if isinstance(value, list)
            else value
        )
        for key, value in parameters.items()
    }
    flow_run = run_deployment(
        deployment,
        parameters=json_parameters,
        timeout=0,
        as_subflow=True,
        tags=["claudecluster", f"claudecluster-run:{run_id}"],
    )
    assert isinstance(flow_run, FlowRun)  # a sync flow gets the sync variant
    return PrefectFlowRunFuture(flow_run_id=flow_run.id)


def run_tasks(
    plan: Plan,
    *,
    repo: str,
    base_commit: str,
    settings: WorkerSettings,
    run_id: str,
    max_parallel: int,
    worktree_root: str,
    progress: RunProgress,
    pool: str | None = None,
    settings_block: str | None = None,
    repo_block: str | None = None,
    targets: dict[str, PoolTarget] | None = None,
    repo_url: str | None = None,
) -> dict[str, TaskResult]:
    """Run every task of ``plan`` on its pool; return results by task id.

    ``repo`` is a path on this machine; pools whose workers share no disk with it get
    ``repo_url`` instead (the repository's URL, or the run's served copy).
    """
    logger = get_run_logger()
    targets = targets or {}
    pending = topological_order(plan)
    futures: dict[str, PrefectFuture[TaskResult]] = {}
    running: list[str] = []
    results: dict[str, TaskResult] = {}
    runner: ThreadPoolTaskRunner[TaskResult]
    with ThreadPoolTaskRunner(max_workers=max_parallel) as runner:
        while pending or running:
            for spec in list(pending):
                if len(running) >= max_parallel:
                    break
                if any(dep not in results for dep in spec.depends_on):
                    continue
                failed = [d for d in spec.depends_on if not results[d].status.ok]
                if failed:
                    pending.remove(spec)
                    results[spec.id] = _skipped(spec, base_commit, failed)
                    logger.warning("skipping %s: %s", spec.id, results[spec.id].error)
                    progress.finished(results[spec.id])
                    continue
                if holder := _holds_lease(plan, spec, running):
                    logger.info("%s waits: its paths overlap running task %s", spec.id, holder)
                    continue
                pending.remove(spec)
                parameters: dict[str, Any] = {
                    "repo": repo,
                    "base_commit": base_commit,
                    "spec": spec,
                    "settings": settings,
                    "run_id": run_id,
                    "verify": spec.verify or plan.verify,
                    "settings_block": settings_block,
                    "repo_block": repo_block,
                }
                task_pool = pool_for(spec, run_pool=pool, plan_pool=plan.pool)
                if task_pool == LOCAL_POOL:
                    # Passing the futures (not their results) draws the graph's edges.
                    parameters["dependencies"] = [futures[d] for d in spec.depends_on]
                    parameters["worktree_root"] = worktree_root
                    futures[spec.id] = runner.submit(run_worker, parameters)  # type: ignore[arg-type]
                else:
                    target = targets[task_pool]
                    if not target.shares_disk:
                        parameters["repo"] = repo_url
                    parameters["dependencies"] = [results[d] for d in spec.depends_on]
                    futures[spec.id] = dispatch_to_pool(target.deployment, parameters, run_id)
                    logger.info("%s dispatched to pool %s", spec.id, task_pool)
                running.append(spec.id)
                progress.started(spec.id)
            if not running:
                break  # everything left was skipped
            finished = next(as_completed([futures[task_id] for task_id in running]))
            task_id = next(t for t in running if futures[t] is finished)
            running.remove(task_id)
            results[task_id] = _result_of(finished, plan.by_id()[task_id], base_commit)
            progress.finished(results[task_id])
    return results


def _result_of(future: PrefectFuture[TaskResult], spec: TaskSpec, base: str) -> TaskResult:
    """A future's TaskResult; a crashed task run becomes an error result, not a crashed run."""
    try:
        value = future.result(raise_on_failure=True)
    except Exception as exc:
        message = f"task run crashed: {type(exc).__name__}: {exc}"
    else:
        if isinstance(value, TaskResult):
            return value
        message = f"task run returned {type(value).__name__}, not a TaskResult"
    return TaskResult(
        id=spec.id,
        title=spec.title,
        kind=spec.kind,
        status=TaskStatus.ERROR,
        failure_reason=FailureReason.SESSION_ERROR,
        error=message[:2000],
        base_commit=base,
    )


def build_report(
    *,
    run_id: str,
    goal: str,
    repo: str,
    base_commit: str,
    plan: Plan,
    results: dict[str, TaskResult],
    integration: IntegrationOutcome,
    planner: TaskResult | None,
    started: float,
) -> RunReport:
    """The RunReport of a finished run."""
    ordered = [results[task.id] for task in plan.tasks if task.id in results]
    sessions = [*ordered, *([planner] if planner else [])]
    usage = sum((r.usage for r in sessions), TokenUsage())
    merged_files = {f.path for r in ordered if r.id in integration.merged for f in r.files}
    totals = RunTotals(
        cost_usd=round(sum(r.cost_usd for r in sessions), 6),
        usage=usage,
        tokens=usage.total,
        duration_s=round(time.monotonic() - started, 3),
        turns=sum(r.turns for r in sessions),
        files_changed=len(merged_files),
        added=sum(r.added for r in ordered),
        removed=sum(r.removed for r in ordered),
    )
    succeeded = (
        len(ordered) == len(plan.tasks)
        and all(r.status.ok for r in ordered)
        and not integration.unmerged
        and (integration.final_verify is None or integration.final_verify.ok)
    )
    problems = []
    if not all(r.status.ok for r in ordered):
        bad = [f"{r.id} {r.status}" for r in ordered if not r.status.ok]
        problems.append("tasks not succeeded: " + ", ".join(bad))
    if integration.unmerged:
        problems.append("not merged: " + ", ".join(u.id for u in integration.unmerged))
    if integration.final_verify is not None and not integration.final_verify.ok:
        problems.append("final verify failed")
    flow_run = FlowRunContext.get()
    return RunReport(
        run_id=run_id,
        goal=goal,
        status=RunStatus.SUCCEEDED if succeeded else RunStatus.FAILED,
        repo=repo,
        base_commit=base_commit,
        integration_branch=integration.branch,
        head_commit=integration.head_commit,
        final_verify=integration.final_verify,
        tasks=ordered,
        unmerged=integration.unmerged,
        planner=planner,
        totals=totals,
        flow_run_id=str(flow_run.flow_run.id) if flow_run and flow_run.flow_run else None,
        error="; ".join(problems) or None,
    )


def _planning_failed(
    run_id: str, goal: str, repo: str, base: str, exc: PlannerError, started: float
) -> RunReport:
    flow_run = FlowRunContext.get()
    return RunReport(
        run_id=run_id,
        goal=goal,
        status=RunStatus.FAILED,
        repo=repo,
        base_commit=base,
        totals=RunTotals(
            cost_usd=exc.cost_usd,
            turns=exc.turns,
            duration_s=round(time.monotonic() - started, 3),
        ),
        flow_run_id=str(flow_run.flow_run.id) if flow_run and flow_run.flow_run else None,
        error=exc.one_line(),
    )


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
) -> State[RunReport]:
    """Turn ``goal`` into a plan, run it, merge it and report; the run fails unless all did.

    ``repo`` (or a TargetRepository block named by ``repo_block``) is the repository;
    ``settings_block`` names a ClaudeCodeSettings block, whose values ``settings`` overrides.
    """
    logger = get_run_logger()
    started = time.monotonic()
    settings, _ = resolve_settings(settings, settings_block)
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
            report = _planning_failed(run_id, goal, repo, base, exc, started)
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
    with ExitStack() as stack:
        repo_url = url
        if repo_url is None and not all(t.shares_disk for t in targets.values()):
            repo_url = stack.enter_context(remote.ServedRepository(Path(repo))).url
            logger.info("serving %s to the pools' workers at %s", repo, repo_url)
        results = run_tasks(
            plan,
            repo=repo,
            base_commit=base,
            settings=settings,
            run_id=run_id,
            max_parallel=max_parallel,
            worktree_root=root,
            progress=progress,
            pool=pool,
            settings_block=settings_block,
            repo_block=repo_block,
            targets=targets,
            repo_url=repo_url,
        )
    if url:  # workers in containers pushed their branches to the remote
        remote.fetch(git_repo, env=git_env, pattern=f"{gitops.BRANCH_PREFIX}/{run_id}/*")
    progress.integrating()
    integration = integrate_branches(
        repo, base, run_id, plan, results, plan.verify, settings.verify_timeout_s, root
    )
    report = build_report(
        run_id=run_id,
        goal=goal,
        repo=repo,
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
