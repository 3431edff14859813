"""Running a plan's tasks: each on its pool, as soon as it can start, within the limits.

Scheduling uses Prefect's machinery: local tasks are submitted to a ``ThreadPoolTaskRunner``
whose width is ``max_parallel``, waiting for their dependencies' futures (which draws the
graph's edges in the UI); tasks on other pools are started with ``run_deployment`` and
awaited as ``PrefectFlowRunFuture``s. Either way a task travels as one
:class:`~claudecluster.models.WorkUnit`, built by :meth:`RunContext.unit_for`. The loop
reacts to the futures' completions. A task is submitted only once it can start (its
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

import contextlib
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.client.schemas.objects import FlowRunResult, State, TaskRunResult
from prefect.futures import PrefectFlowRunFuture, PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote
from prefect.utilities.urls import url_for

from claudecluster import gitops, remote
from claudecluster.artifacts import publish_task_artifacts
from claudecluster.budget import GoalBudget
from claudecluster.errors import ClaudeClusterError
from claudecluster.journal import RunJournal
from claudecluster.models import (
    Dependency,
    FailureReason,
    TaskResult,
    TaskSpec,
    TaskStatus,
    WorkerSettings,
    WorkUnit,
)
from claudecluster.places import RunSessions, open_run_sessions, session_place
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
from claudecluster.server_watch import ServerWatch
from claudecluster.session import SessionHost, SessionRunner
from claudecluster.target import open_target
from claudecluster.tasks.worker import worker_task
from claudecluster.worker import lost_attempts, result_from_branch

# A task's node in the goal's graph: its task run, or its flow run on a pool.
GraphNode = TaskRunResult | FlowRunResult


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


def dispatch_to_pool(
    deployment: str, unit: WorkUnit, *, upstream: list[GraphNode], tags: list[str]
) -> tuple[PrefectFlowRunFuture[TaskResult], GraphNode]:
    """Start a task as a flow run of a pool's worker deployment; returns at once.

    The flow run is a child of the current flow run, through a task run of its own, named
    after the task, whose inputs are ``upstream`` (the dependencies' nodes in the goal's
    graph): the graph then shows the plan's edges. ``run_deployment`` creates such a task
    run too, but cannot say what it waits for. Returns the future and the task's node: the
    graph draws a child flow run in place of its parent task run, so edges must name the
    flow run.
    """
    from prefect import Task
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.states import Pending, Scheduled

    context = FlowRunContext.get()
    assert context is not None and context.flow_run is not None
    node: Task[..., None] = Task(name=unit.spec.id, fn=_pool_task_placeholder)
    with get_client(sync_client=True) as client:
        target = client.read_deployment_by_name(deployment)
        parent = client.create_task_run(
            task=node,
            flow_run_id=context.flow_run.id,
            dynamic_key=unit.spec.id,
            name=unit.spec.id,
            task_inputs={"wait_for": list(upstream)},
            state=Pending(),
        )
        flow_run = client.create_flow_run_from_deployment(
            target.id,
            parameters={"unit": unit.model_dump(mode="json")},
            state=Scheduled(),
            name=f"{unit.run_id}-{unit.spec.id}",
            tags=tags,
            parent_task_run_id=parent.id,
            labels=_trace_labels(context.flow_run.labels),
        )
    return PrefectFlowRunFuture(flow_run_id=flow_run.id), FlowRunResult(id=flow_run.id)


def _trace_labels(flow_run_labels: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """The goal's trace context, as the label Prefect reads to make the worker flow run's span
    a child of the goal's (what ``run_deployment`` does too)."""
    from prefect.telemetry.run_telemetry import LABELS_TRACEPARENT_KEY

    traceparent = flow_run_labels.get(LABELS_TRACEPARENT_KEY)
    return {LABELS_TRACEPARENT_KEY: str(traceparent)} if traceparent else {}


def _pool_task_placeholder() -> None:
    """Stands for a task that runs as a flow run on a work pool (never called)."""


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
    server_watch: ServerWatch | None = None
    # Told the results once the server is lost and the running sessions have finished:
    # the runner's threads may then wait minutes on Prefect's retries, the report need not.
    on_drained: Callable[[dict[str, TaskResult]], None] | None = None
    tags: list[str] = field(default_factory=list)  # for the runs it creates on pools
    artifact_scope: str | None = None  # see claudecluster.naming
    # Where pool workers push task branches when it is not this repository: its origin
    # (a URL), reached with this git environment.
    origin_env: Mapping[str, str] | None = field(default=None, repr=False)
    # Told the results so far each time a task finishes or is not started (returns at once).
    on_result: Callable[[Mapping[str, TaskResult]], None] | None = None

    def unit_for(
        self,
        spec: TaskSpec,
        plan: Plan,
        results: dict[str, TaskResult],
        *,
        shares_disk: bool,
        local: bool,
    ) -> WorkUnit:
        """The unit of work of ``spec``, for a worker that does or does not share our disk.

        A worker without our disk gets the repository's URL (or the run's served copy)
        and its own machine's worktree folder. A task on a work pool has its artifacts
        published by the driver, so the goal's run shows every task's.
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
            artifact_scope=self.artifact_scope,
            publish_artifacts=local,
            pool=pool_for(spec, run_pool=self.pool, plan_pool=plan.pool),
        )


def run_tasks(plan: Plan, run: RunContext, progress: RunProgress) -> dict[str, TaskResult]:
    """Run every task of ``plan`` on its pool; return results by task id.

    ``run.repo`` is a path on this machine; pools whose workers share no disk with it get
    ``run.repo_url`` instead (the repository's URL, or the run's served copy).

    At most ``run.max_parallel`` sessions run at once, within the goal's budget (see
    :mod:`claudecluster.budget`; what was spent before, the planner's session, is
    ``progress.cost_usd``). Local tasks are submitted up to that many again ahead of a free
    place: they set up their worktrees while the sessions run and start the moment one
    ends (see :class:`claudecluster.places.RunSessions`). If the Prefect server stops
    answering, nothing new starts, running sessions finish and commit, and their results
    come from the run journal.
    """
    local_ids = {
        t.id
        for t in plan.tasks
        if pool_for(t, run_pool=run.pool, plan_pool=plan.pool) == LOCAL_POOL
    }
    budget = (
        GoalBudget(
            run.budget_usd,
            spent_usd=progress.cost_usd,
            session_cap_usd=run.settings.max_budget_usd,
        )
        if run.budget_usd is not None
        else None
    )
    sessions = open_run_sessions(run.max_parallel, len(local_ids), budget=budget)
    ahead = sessions.width if local_ids else 0  # local tasks set up while a place is busy
    runner: ThreadPoolTaskRunner[TaskResult]
    # The slots are released after the runner has joined its threads (exits run LIFO).
    with ExitStack() as held, ThreadPoolTaskRunner(max_workers=sessions.width + ahead) as runner:
        dispatcher = _Dispatcher(plan, run, progress, runner, sessions, local_ids)
        if run.server_watch is not None:
            run.server_watch.on_lost(dispatcher.server_lost)
        try:
            # Before any task starts: taken alongside the tasks' start-up writes, these
            # server writes met a locked SQLite server (a 503, 2 s of back-off) often.
            sessions.acquire(held)
            return dispatcher.run(capacity=sessions.width + ahead)
        except BaseException as exc:
            # Tasks waiting for a place must not start now.
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
        sessions: RunSessions,
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
        self.done: queue.Queue[str] = queue.Queue()  # task ids whose futures completed
        self.lost = threading.Event()
        self.journal = RunJournal(run.run_id)
        self.started_at: dict[str, float] = {}
        self.nodes: dict[str, GraphNode] = {}  # each task's node in the goal's graph

    def run(self, capacity: int) -> dict[str, TaskResult]:
        while self.pending or self.running:
            self.start_ready(capacity)
            if not self.running:
                break  # everything left was skipped
            self._collect_one()
        return self.results

    def server_lost(self) -> None:
        """The Prefect server stopped answering: start nothing new (running ones finish)."""
        self.lost.set()
        self.sessions.stop(
            "not started: the Prefect server stopped answering", FailureReason.SERVER_LOST
        )

    def start_ready(self, capacity: int) -> None:
        results = self.results
        for spec in list(self.pending):
            if len(self.running) >= capacity:
                return
            if any(dep not in results for dep in spec.depends_on):
                continue
            failed = [d for d in spec.depends_on if not results[d].status.ok]
            refusal = self.sessions.refusal
            if failed or refusal:
                self._not_started(spec, failed, refusal)
                continue
            if holder := _holds_lease(self.plan, spec, self.running):
                self.logger.info("%s waits: its paths overlap running task %s", spec.id, holder)
                continue
            if spec.id not in self.local_ids:
                if not self.sessions.claim(spec.id):
                    continue
                self.claimed.add(spec.id)
            self.pending.remove(spec)
            if spec.id in self.local_ids:
                self.sessions.queue(spec.id)
            self.started_at[spec.id] = time.time()
            future = self.futures[spec.id] = self._start(spec)
            future.add_done_callback(partial(self._completed, spec.id))
            self.running.append(spec.id)
            self.progress.started(spec.id)

    def _not_started(
        self, spec: TaskSpec, failed: list[str], refusal: tuple[str, str] | None
    ) -> None:
        self.pending.remove(spec)
        if spec.id in self.local_ids:
            self.sessions.forgo()
        if failed:
            result = _skipped(spec, self.run_context.base_commit, failed)
        else:
            assert refusal is not None
            message, reason = refusal
            result = TaskResult.not_done(
                spec,
                self.run_context.base_commit,
                status=TaskStatus.SKIPPED,
                reason=FailureReason(reason),
                error=message,
            )
        self.results[spec.id] = result
        self._tell_results()
        level = logging.INFO if self.lost.is_set() else logging.WARNING
        self.logger.log(level, "not starting %s: %s", spec.id, result.error)
        self.progress.finished(result)

    def _start(self, spec: TaskSpec) -> PrefectFuture[TaskResult]:
        """Start one task: a task run here, or a flow run on its pool."""
        run, plan = self.run_context, self.plan
        task_pool = pool_for(spec, run_pool=run.pool, plan_pool=plan.pool)
        if task_pool == LOCAL_POOL:
            host = SessionHost(
                runner=run.runner,
                slot=partial(session_place, self.sessions, spec.id),
                env=run.session_env,
            )
            unit = run.unit_for(spec, plan, self.results, shares_disk=True, local=True)
            future = self.runner.submit(
                worker_task(run.settings),
                # Quoted: Prefect would take objects the unit shares with earlier results
                # (an enum member, a string) for inputs, and draw edges the plan lacks.
                {"unit": quote(unit), "host": quote(host)},
                # Waiting on the dependencies' task runs draws the plan's edges.
                wait_for=[self.futures[dep] for dep in spec.depends_on],
            )
            self.nodes[spec.id] = TaskRunResult(id=future.task_run_id)
            return future
        target = run.targets[task_pool]
        unit = run.unit_for(spec, plan, self.results, shares_disk=target.shares_disk, local=False)
        self.logger.info("%s dispatched to pool %s", spec.id, task_pool)
        pool_future, self.nodes[spec.id] = dispatch_to_pool(
            target.deployment,
            unit,
            upstream=[self.nodes[dep] for dep in spec.depends_on if dep in self.nodes],
            tags=run.tags,
        )
        return pool_future

    def _tell_results(self) -> None:
        if self.run_context.on_result is not None and not self.lost.is_set():
            self.run_context.on_result(self.results)

    def _completed(self, task_id: str, future: PrefectFuture[TaskResult]) -> None:
        self.done.put(task_id)

    def _collect_one(self) -> None:
        """Wait for one task to finish (or, once the server is lost, for them all)."""
        while not self.lost.is_set():
            try:
                task_id = self.done.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if task_id in self.running:
                self._finished(task_id, self._result_of(task_id))
                return
        self._drain()

    def _finished(self, task_id: str, result: TaskResult) -> None:
        self.running.remove(task_id)
        node = self.nodes.get(task_id)
        if node is not None and result.run_url is None:
            kind = "flow-run" if isinstance(node, FlowRunResult) else "task-run"
            result.run_url = url_for(kind, obj_id=node.id)
        self.results[task_id] = result
        self._tell_results()
        if task_id in self.local_ids:
            self.sessions.withdraw(task_id)  # if it never asked for its place
            if result.cached:
                self.sessions.account(result.cost_usd)  # paid before, by an earlier attempt
        if task_id in self.claimed:
            self.claimed.discard(task_id)
            self.sessions.spend(task_id, result.cost_usd)
            self.sessions.leave(task_id)
            if not self.lost.is_set():
                scope = self.run_context.artifact_scope or self.run_context.run_id
                publish_task_artifacts(result, scope)
        if result.failure_reason in _STOPS_THE_RUN:
            # Every other session would meet the same closed door.
            assert result.failure_reason is not None
            self.sessions.stop(f"not started: {result.error}", result.failure_reason)
        self.progress.finished(result)

    def _result_of(self, task_id: str) -> TaskResult:
        """A finished task's TaskResult; a crashed task run becomes an error result."""
        future, spec = self.futures[task_id], self.plan.by_id()[task_id]
        base = self.run_context.base_commit
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
        journaled = self._journaled(task_id)
        if journaled is not None:  # the work was done; only Prefect's record of it failed
            return journaled
        if task_id in self.claimed:  # it ran elsewhere: what its run and branch tell
            state = future.state if future.state.is_final() else None
            return recover_result(self.run_context, spec, self.plan, self.results, state)
        return TaskResult.not_done(
            spec, base, status=TaskStatus.ERROR, reason=FailureReason.SESSION_ERROR, error=message
        )

    def _drain(self) -> None:
        """The server is lost: let the sessions that hold a place finish and commit (their
        results come from the journal); what never got a place will not start."""
        self.logger.info("the Prefect server stopped answering: finishing running sessions")
        deadline = time.monotonic() + _drain_limit_s(self.run_context.settings)
        while self.running:
            for task_id in list(self.running):
                result = self._journaled(task_id) or self._unfinished(task_id, deadline)
                if result is not None:
                    self._finished(task_id, result)
            if self.running:
                time.sleep(_POLL_S)
        for spec in list(self.pending):  # nothing more starts
            self._not_started(spec, [], self.sessions.refusal)
        if self.run_context.on_drained is not None:
            self.run_context.on_drained(self.results)

    def _journaled(self, task_id: str) -> TaskResult | None:
        """The task's result from this run's journal, if the worker recorded it this run."""
        started = self.started_at.get(task_id)
        record = self.journal.result(task_id)
        if record is None or started is None:
            return None
        result = record.result
        recorded = result.attempts[-1].started_at.timestamp() if result.attempts else None
        if not result.cached and (recorded is None or recorded < started):
            return None  # an earlier attempt's, not this one's
        return result

    def _unfinished(self, task_id: str, deadline: float) -> TaskResult | None:
        """A result for a task that will not report through the journal, or None to wait."""
        spec = self.plan.by_id()[task_id]
        holds_place = self.sessions.holds_place(task_id) and task_id not in self.claimed
        if holds_place and time.monotonic() < deadline:
            return None  # its session is running: it ends, commits and journals
        where = (
            "its result is with the Prefect server (it ran on a work pool)"
            if task_id in self.claimed
            else "it had not started its session"
        )
        return TaskResult.not_done(
            spec,
            self.run_context.base_commit,
            status=TaskStatus.ERROR if task_id in self.claimed else TaskStatus.SKIPPED,
            reason=FailureReason.SERVER_LOST,
            error=f"the Prefect server stopped answering; {where}",
        )


_POLL_S = 0.5
# Failures every other task would meet too: the run starts nothing after one.
_STOPS_THE_RUN = (FailureReason.API_UNREACHABLE, FailureReason.RESULT_STORAGE)
_SPENT = re.compile(r"\(\$(?P<cost>[\d.]+), (?P<turns>\d+) turns\)$")


def recover_result(
    run: RunContext,
    spec: TaskSpec,
    plan: Plan,
    results: dict[str, TaskResult],
    state: State[Any] | None,
) -> TaskResult:
    """The result of a task that ran on a work pool and whose result did not come back
    (no result storage both sides reach, or a lost record): rebuilt from the work it
    pushed to its branch, else from what its flow run's final state says."""
    message = (state.message or "") if state is not None else ""
    spent = _SPENT.search(message)
    reason_text = message.split(":", 1)[0] if ":" in message else ""
    reason = FailureReason(reason_text) if reason_text in set(FailureReason) else None
    if reason is not FailureReason.RESULT_STORAGE:
        if run.origin_env is not None:  # the branch was pushed to the repository's URL
            repo = open_target(run.repo).repo
            branch = gitops.task_branch(run.run_id, spec.id)
            with contextlib.suppress(ClaudeClusterError):
                remote.fetch(repo, env=dict(run.origin_env), pattern=branch)
            with contextlib.suppress(ClaudeClusterError):  # attempts lost with their machines
                remote.fetch(
                    repo, env=dict(run.origin_env), pattern=f"{gitops.ATTEMPTS_PREFIX}/{branch}/*"
                )
        unit = run.unit_for(spec, plan, results, shares_disk=True, local=True)
        rebuilt = result_from_branch(
            unit, open_target(run.repo), Path(run.worktree_root) / run.run_id
        )
        if rebuilt is not None:  # done in this run, only its record was lost: not a reuse
            return rebuilt.model_copy(update={"cached": False})
    base = run.base_commit
    if (
        state is not None
        and state.is_completed()
        and message.startswith(str(TaskStatus.NO_CHANGES))
    ):
        result = TaskResult(
            id=spec.id,
            title=spec.title,
            kind=spec.kind,
            status=TaskStatus.NO_CHANGES,
            base_commit=base,
        )
    else:
        result = TaskResult.not_done(
            spec,
            base,
            status=TaskStatus.ERROR,
            reason=reason or FailureReason.SESSION_ERROR,
            error=(message or "its flow run ended without a result")
            + " (its result could not be read back)",
        )
    if spent is not None:
        result.cost_usd, result.turns = float(spent["cost"]), int(spent["turns"])
    # Attempts that died with their machines were paid for too (their checkpoints say).
    lost = lost_attempts(open_target(run.repo).repo, gitops.task_branch(run.run_id, spec.id))
    if lost:
        result.attempts = lost
        result.cost_usd = round(result.cost_usd + sum(a.cost_usd for a in lost), 6)
    return result


def _drain_limit_s(settings: WorkerSettings) -> float:
    """How long a running session may still take once the server is lost."""
    return settings.timeout_s + settings.verify_timeout_s + 60
