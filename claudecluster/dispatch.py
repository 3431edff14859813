"""Running a plan's tasks: each on its pool, as soon as it can start, within the limits.

Scheduling uses Prefect's machinery: local tasks are submitted to a ``ThreadPoolTaskRunner``
whose width is ``max_parallel``, waiting for their dependencies' futures (which draws the
graph's edges in the UI); tasks on other pools are started with ``run_deployment`` and
awaited as ``PrefectFlowRunFuture``s. Either way a task travels as one
:class:`~claudecluster.models.WorkUnit`, built by :meth:`RunContext.unit_for`. The loop
reacts to completions with ``as_completed``. A task is submitted only once it can start (its
dependencies are done and no running task holds a lease on overlapping paths), because a
submitted task waiting on upstream futures would occupy a thread while it waits.

Local tasks are submitted up to ``max_parallel`` ahead of a free session place: they create
their worktrees while the sessions run and start the moment one ends, so the work around a
session (worktree, commit, diff, artifacts, Prefect's task-run bookkeeping) is off the
critical path. The places, start permits and budget check live in the run's
:class:`claudecluster.places.RunSessions`, which each local task is handed (in its
:class:`~claudecluster.session.SessionHost`).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial

from prefect import get_run_logger
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.futures import PrefectFlowRunFuture, PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from claudecluster.models import (
    Dependency,
    FailureReason,
    TaskResult,
    TaskSpec,
    TaskStatus,
    WorkerSettings,
    WorkUnit,
)
from claudecluster.places import RunSessions, budget_spent, open_run_sessions, session_place
from claudecluster.plan import (
    LOCAL_POOL,
    Plan,
    ancestors,
    paths_overlap,
    pool_for,
    topological_order,
)
from claudecluster.pools import PoolTarget
from claudecluster.progress import RunProgress
from claudecluster.session import SessionHost, SessionRunner
from claudecluster.tasks.worker import worker_task


def _skipped(spec: TaskSpec, base_commit: str, failed: list[str]) -> TaskResult:
    return TaskResult.not_done(
        spec,
        base_commit,
        status=TaskStatus.SKIPPED,
        reason=FailureReason.DEPENDENCY_FAILED,
        error="skipped: dependency " + ", ".join(failed) + " did not succeed",
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


def dispatch_to_pool(deployment: str, unit: WorkUnit) -> PrefectFlowRunFuture[TaskResult]:
    """Start a task as a flow run of a pool's worker deployment; returns at once."""
    flow_run = run_deployment(
        deployment,
        parameters={"unit": unit.model_dump(mode="json")},
        timeout=0,
        as_subflow=True,
        tags=["claudecluster", f"claudecluster-run:{unit.run_id}"],
    )
    assert isinstance(flow_run, FlowRun)  # a sync flow gets the sync variant
    return PrefectFlowRunFuture(flow_run_id=flow_run.id)


@dataclass
class RunContext:
    """Everything the dispatcher needs to know about one run besides its plan."""

    run_id: str
    repo: str
    base_commit: str
    settings: WorkerSettings
    max_parallel: int
    worktree_root: str
    pool: str | None = None
    settings_block: str | None = None
    repo_block: str | None = None
    targets: dict[str, PoolTarget] = field(default_factory=dict)
    repo_url: str | None = None
    budget_usd: float | None = None
    session_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    runner: SessionRunner | None = None

    def unit_for(
        self, spec: TaskSpec, plan: Plan, results: dict[str, TaskResult], *, shares_disk: bool
    ) -> WorkUnit:
        """The unit of work of ``spec``, for a worker that does or does not share our disk.

        A worker without our disk gets the repository's URL (or the run's served copy)
        and its own machine's worktree folder.
        """
        return WorkUnit(
            run_id=self.run_id,
            spec=spec,
            repo=self.repo if shares_disk else str(self.repo_url),
            base_commit=self.base_commit,
            verify=plan.verify,
            dependencies=[Dependency.of(results[dep]) for dep in spec.depends_on],
            settings=self.settings,
            settings_block=self.settings_block,
            repo_block=self.repo_block,
            worktree_root=self.worktree_root if shares_disk else None,
        )


def run_tasks(plan: Plan, run: RunContext, progress: RunProgress) -> dict[str, TaskResult]:
    """Run every task of ``plan`` on its pool; return results by task id.

    ``run.repo`` is a path on this machine; pools whose workers share no disk with it get
    ``run.repo_url`` instead (the repository's URL, or the run's served copy). Once the
    cost spent so far (``progress.cost_usd``, the planner included) reaches
    ``run.budget_usd``, no further task starts; running ones finish within their own caps.

    At most ``run.max_parallel`` sessions run at once. Local tasks are submitted up to that
    many again ahead of a free place: they set up their worktrees while the sessions run
    and start the moment one ends (see :class:`claudecluster.places.RunSessions`).
    """
    local_ids = {
        t.id
        for t in plan.tasks
        if pool_for(t, run_pool=run.pool, plan_pool=plan.pool) == LOCAL_POOL
    }
    sessions = open_run_sessions(
        run.max_parallel, len(local_ids), budget_usd=run.budget_usd, spent_usd=progress.cost_usd
    )
    width = sessions.width if sessions else run.max_parallel
    ahead = width if sessions else 0  # local tasks set up while a place is busy
    runner: ThreadPoolTaskRunner[TaskResult]
    # The slots are released after the runner has joined its threads (exits run LIFO).
    with ExitStack() as held, ThreadPoolTaskRunner(max_workers=width + ahead) as runner:
        dispatcher = _Dispatcher(plan, run, progress, runner, sessions, local_ids)
        try:
            # Before any task starts: taken alongside the tasks' start-up writes, these
            # server writes met a locked SQLite server (a 503, 2 s of back-off) often.
            if sessions:
                sessions.acquire(held)
            return dispatcher.run(capacity=width + ahead)
        except BaseException as exc:
            if sessions:  # tasks waiting for a place must not start now
                sessions.stop(f"not started: the run stopped ({type(exc).__name__})")
            raise


class _Dispatcher:
    """The scheduling loop of one run: start what can start, then wait for a completion."""

    def __init__(
        self,
        plan: Plan,
        run: RunContext,
        progress: RunProgress,
        runner: ThreadPoolTaskRunner[TaskResult],
        sessions: RunSessions | None,
        local_ids: set[str],
    ) -> None:
        self.plan, self.run_context, self.progress = plan, run, progress
        self.runner, self.sessions, self.local_ids = runner, sessions, local_ids
        self.logger = get_run_logger()
        self.pending = topological_order(plan)
        self.futures: dict[str, PrefectFuture[TaskResult]] = {}
        self.running: list[str] = []
        self.results: dict[str, TaskResult] = {}
        self.claimed: set[str] = set()  # tasks on other pools holding one of the places

    def run(self, capacity: int) -> dict[str, TaskResult]:
        while self.pending or self.running:
            self.start_ready(capacity)
            if not self.running:
                break  # everything left was skipped
            self._collect_one()
        return self.results

    def start_ready(self, capacity: int) -> None:
        run, results = self.run_context, self.results
        for spec in list(self.pending):
            if len(self.running) >= capacity:
                return
            if any(dep not in results for dep in spec.depends_on):
                continue
            failed = [d for d in spec.depends_on if not results[d].status.ok]
            spent = self.progress.cost_usd
            if failed or (run.budget_usd is not None and spent >= run.budget_usd):
                self.pending.remove(spec)
                if self.sessions and spec.id in self.local_ids:
                    self.sessions.forgo()
                results[spec.id] = (
                    _skipped(spec, run.base_commit, failed)
                    if failed
                    else _over_budget(spec, run, spent)
                )
                self.logger.warning("not starting %s: %s", spec.id, results[spec.id].error)
                self.progress.finished(results[spec.id])
                continue
            if holder := _holds_lease(self.plan, spec, self.running):
                self.logger.info("%s waits: its paths overlap running task %s", spec.id, holder)
                continue
            if spec.id not in self.local_ids and self.sessions:
                if not self.sessions.claim():
                    continue
                self.claimed.add(spec.id)
            self.pending.remove(spec)
            if self.sessions and spec.id in self.local_ids:
                self.sessions.queue(spec.id)
            self.futures[spec.id] = self._start(spec)
            self.running.append(spec.id)
            self.progress.started(spec.id)

    def _start(self, spec: TaskSpec) -> PrefectFuture[TaskResult]:
        """Start one task: a task run here, or a flow run on its pool."""
        run, plan = self.run_context, self.plan
        task_pool = pool_for(spec, run_pool=run.pool, plan_pool=plan.pool)
        if task_pool == LOCAL_POOL:
            assert self.sessions is not None
            host = SessionHost(
                runner=run.runner,
                slot=partial(session_place, self.sessions, spec.id),
                env=run.session_env,
            )
            unit = run.unit_for(spec, plan, self.results, shares_disk=True)
            return self.runner.submit(
                worker_task(run.settings),
                {"unit": unit, "host": host},
                # Waiting on the dependencies' futures draws the graph's edges.
                wait_for=[self.futures[dep] for dep in spec.depends_on],
            )
        target = run.targets[task_pool]
        unit = run.unit_for(spec, plan, self.results, shares_disk=target.shares_disk)
        self.logger.info("%s dispatched to pool %s", spec.id, task_pool)
        return dispatch_to_pool(target.deployment, unit)

    def _collect_one(self) -> None:
        futures = self.futures
        finished = next(as_completed([futures[task_id] for task_id in self.running]))
        task_id = next(t for t in self.running if futures[t] is finished)
        self.running.remove(task_id)
        result = _result_of(finished, self.plan.by_id()[task_id], self.run_context.base_commit)
        self.results[task_id] = result
        if self.sessions and task_id in self.local_ids:
            self.sessions.withdraw(task_id)  # if it never asked for its place
        if task_id in self.claimed and self.sessions:
            self.claimed.discard(task_id)
            self.sessions.spend(result.cost_usd)
            self.sessions.leave()
        self.progress.finished(result)


def _over_budget(spec: TaskSpec, run: RunContext, spent: float) -> TaskResult:
    return TaskResult.not_done(
        spec,
        run.base_commit,
        status=TaskStatus.SKIPPED,
        reason=FailureReason.GOAL_BUDGET,
        error=budget_spent(run.budget_usd or 0.0, spent),
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
    return TaskResult.not_done(
        spec, base, status=TaskStatus.ERROR, reason=FailureReason.SESSION_ERROR, error=message
    )
