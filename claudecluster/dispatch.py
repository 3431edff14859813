"""Running a plan's tasks: each on its pool, as soon as it can start, within the limits.

Scheduling uses Prefect's machinery: local tasks are submitted to a ``ThreadPoolTaskRunner``
whose width is ``max_parallel`` and receive their dependencies' futures (which draws the
graph's edges in the UI and hands them their branches); tasks on other pools are started with
``run_deployment`` and awaited as ``PrefectFlowRunFuture``s. The loop reacts to completions
with ``as_completed``. A task is submitted only once it can start (its dependencies are done
and no running task holds a lease on overlapping paths), because a submitted task waiting on
upstream futures would occupy one of the ``max_parallel`` threads while it waits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.futures import PrefectFlowRunFuture, PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel

from claudecluster.limits import run_slots, session_cap, start_slot
from claudecluster.models import FailureReason, TaskResult, TaskSpec, TaskStatus, WorkerSettings
from claudecluster.plan import Plan, ancestors, paths_overlap, topological_order
from claudecluster.pools import LOCAL_POOL, PoolTarget, pool_for
from claudecluster.progress import RunProgress
from claudecluster.tasks.worker import with_retries


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


@dataclass
class RunContext:
    """Everything the dispatcher needs to know about one run besides its plan."""

    repo: str
    base_commit: str
    settings: WorkerSettings
    run_id: str
    max_parallel: int
    worktree_root: str
    pool: str | None = None
    settings_block: str | None = None
    repo_block: str | None = None
    targets: dict[str, PoolTarget] = field(default_factory=dict)
    repo_url: str | None = None
    budget_usd: float | None = None


def run_tasks(plan: Plan, run: RunContext, progress: RunProgress) -> dict[str, TaskResult]:
    """Run every task of ``plan`` on its pool; return results by task id.

    ``run.repo`` is a path on this machine; pools whose workers share no disk with it get
    ``run.repo_url`` instead (the repository's URL, or the run's served copy). Once the
    cost spent so far (``progress.cost_usd``, the planner included) reaches
    ``run.budget_usd``, no further task starts; running ones finish within their own caps.
    """
    logger = get_run_logger()
    pending = topological_order(plan)
    futures: dict[str, PrefectFuture[TaskResult]] = {}
    running: list[str] = []
    results: dict[str, TaskResult] = {}
    local = [
        t for t in plan.tasks if pool_for(t, run_pool=run.pool, plan_pool=plan.pool) == LOCAL_POOL
    ]
    width = min(run.max_parallel, session_cap()) if local else run.max_parallel
    runner: ThreadPoolTaskRunner[TaskResult]
    # Local sessions share this run's slots of the cluster-wide session limit, taken once for
    # the run: per-session acquisition made every task wait seconds on Prefect's Retry-After
    # under contention (see benchmarks/). Sessions on other pools take their own slots.
    with (
        run_slots(width if local else 0),
        ThreadPoolTaskRunner(max_workers=max(width, 1)) as runner,
    ):
        while pending or running:
            for spec in list(pending):
                if len(running) >= width:
                    break
                if any(dep not in results for dep in spec.depends_on):
                    continue
                failed = [d for d in spec.depends_on if not results[d].status.ok]
                if failed:
                    pending.remove(spec)
                    results[spec.id] = _skipped(spec, run.base_commit, failed)
                    logger.warning("skipping %s: %s", spec.id, results[spec.id].error)
                    progress.finished(results[spec.id])
                    continue
                if run.budget_usd is not None and progress.cost_usd >= run.budget_usd:
                    pending.remove(spec)
                    results[spec.id] = _over_budget(spec, run, progress.cost_usd)
                    logger.warning("not starting %s: %s", spec.id, results[spec.id].error)
                    progress.finished(results[spec.id])
                    continue
                if holder := _holds_lease(plan, spec, running):
                    logger.info("%s waits: its paths overlap running task %s", spec.id, holder)
                    continue
                pending.remove(spec)
                futures[spec.id] = _start(spec, plan, run, runner, futures, results)
                running.append(spec.id)
                progress.started(spec.id)
            if not running:
                break  # everything left was skipped
            finished = next(as_completed([futures[task_id] for task_id in running]))
            task_id = next(t for t in running if futures[t] is finished)
            running.remove(task_id)
            results[task_id] = _result_of(finished, plan.by_id()[task_id], run.base_commit)
            progress.finished(results[task_id])
    return results


def _start(
    spec: TaskSpec,
    plan: Plan,
    run: RunContext,
    runner: ThreadPoolTaskRunner[TaskResult],
    futures: dict[str, PrefectFuture[TaskResult]],
    results: dict[str, TaskResult],
) -> PrefectFuture[TaskResult]:
    """Start one task: a task run here, or a flow run on its pool."""
    parameters: dict[str, Any] = {
        "repo": run.repo,
        "base_commit": run.base_commit,
        "spec": spec,
        "settings": run.settings,
        "run_id": run.run_id,
        "verify": spec.verify or plan.verify,
        "settings_block": run.settings_block,
        "repo_block": run.repo_block,
    }
    task_pool = pool_for(spec, run_pool=run.pool, plan_pool=plan.pool)
    if task_pool == LOCAL_POOL:
        # Passing the futures (not their results) draws the graph's edges.
        parameters["dependencies"] = [futures[d] for d in spec.depends_on]
        parameters["worktree_root"] = run.worktree_root
        parameters["take_session_slot"] = False
        start_slot()
        return runner.submit(with_retries(run.settings), parameters)
    target = run.targets[task_pool]
    if not target.shares_disk:
        parameters["repo"] = run.repo_url
    parameters["dependencies"] = [results[d] for d in spec.depends_on]
    get_run_logger().info("%s dispatched to pool %s", spec.id, task_pool)
    return dispatch_to_pool(target.deployment, parameters, run.run_id)


def _over_budget(spec: TaskSpec, run: RunContext, spent: float) -> TaskResult:
    return TaskResult(
        id=spec.id,
        title=spec.title,
        kind=spec.kind,
        status=TaskStatus.SKIPPED,
        failure_reason=FailureReason.GOAL_BUDGET,
        error=f"not started: the goal's budget of ${run.budget_usd:.2f} was spent "
        f"(${spent:.4f} so far)",
        base_commit=run.base_commit,
    )


def _result_of(future: PrefectFuture[TaskResult], spec: TaskSpec, base: str) -> TaskResult:
    """A future's TaskResult; a crashed task run becomes an error result, not a crashed run."""
    try:
        # A failed worker run still carries its TaskResult; only a crash carries none.
        value = future.result(raise_on_failure=False)
    except Exception as exc:
        message = f"task run crashed: {type(exc).__name__}: {exc}"
    else:
        if isinstance(value, TaskResult):
            if future.state.name == "Cached":
                value = value.model_copy(update={"cached": True})
            return value
        message = f"task run ended without a TaskResult: {value!r}"
    return TaskResult(
        id=spec.id,
        title=spec.title,
        kind=spec.kind,
        status=TaskStatus.ERROR,
        failure_reason=FailureReason.SESSION_ERROR,
        error=message[:2000],
        base_commit=base,
    )
