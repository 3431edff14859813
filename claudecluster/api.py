"""The Python API: ``run_goal`` runs a goal end to end and returns its RunReport.

The CLI is a thin layer over this module. Everything a user can get wrong is checked before
anything starts (the repository, the plan, the limits, the credentials), so bad input raises
a :class:`~claudecluster.errors.UsageError` and changes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from claudecluster import gitops, prefect_server
from claudecluster.checks import (
    check_goal,
    check_limits,
    check_model_api,
    check_parameter_size,
    default_parallelism,
    prepare_plan,
    require_credentials,
)
from claudecluster.errors import UsageError
from claudecluster.models import PullRequestMode, ReviewMode, RunReport, WorkerSettings
from claudecluster.plan import Plan, load_plan_file
from claudecluster.prefect_server import ServerInfo
from claudecluster.remote import is_remote
from claudecluster.sweep import SweepSpec
from claudecluster.target import open_target
from claudecluster.workspace import worktrees_in


@contextmanager
def hosted_here() -> Iterator[None]:
    """Prefect settings for a flow run that this process hosts (not a worker's).

    Flow-run heartbeats are off unless ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` is set: they
    exist to let an automation mark runs whose infrastructure died as crashed, the host here
    is the caller's own process, and a sync flow waits up to a second for the heartbeat
    thread at the end of every run.
    """
    if "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" in os.environ:
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def run_goal(
    goal: str | None,
    repo: str | Path | None = None,
    *,
    plan: Plan | None = None,
    plan_file: str | Path | None = None,
    verify: str | None = None,
    max_parallel: int | None = None,
    max_tasks: int | None = None,
    settings: WorkerSettings | None = None,
    base: str | None = None,
    run_id: str | None = None,
    ephemeral: bool = False,
    worktree_root: str | Path | None = None,
    pool: str | None = None,
    settings_block: str | None = None,
    repo_block: str | None = None,
    budget_usd: float | None = None,
    pr: PullRequestMode | str | None = None,
    review: ReviewMode | str | None = None,
    forge_api_url: str | None = None,
    pr_base: str | None = None,
    announce: Callable[[str], None] | None = None,
    on_interrupted: Callable[[RunReport], None] | None = None,
) -> RunReport:
    """Run a goal end to end (plan, workers, merge, verify, report) and return its report.

    ``goal`` may be None when the plan (file) states it. With neither ``plan`` nor
    ``plan_file`` the LLM planner plans. ``pool`` runs tasks that name no pool on that work
    pool (default: in-process). ``budget_usd`` caps the goal's spending (no task starts once
    it is spent). ``pr`` pushes the integration branch and opens or updates its pull request
    (``branch``, ``draft`` or ``ready``; see :mod:`claudecluster.pull_request`), with the
    ``review`` it asks for. ``settings_block`` and ``repo_block`` name Prefect blocks;
    explicitly set fields of ``settings`` override the settings block. The run uses
    ``PREFECT_API_URL`` when set, else the local ClaudeCluster Prefect server (started on
    first use), or Prefect's throwaway backend with ``ephemeral=True``; ``announce`` is told
    when that server has to be started (it takes a few seconds).

    If the Prefect server stops answering, the run starts nothing new, lets running sessions
    commit and stops; ``on_interrupted`` is then called (from another thread) with the
    report as soon as it is written, without waiting for Prefect's client to give up. The
    report (``interrupted``) says how to finish the run with ``claudecluster resume``.

    Bad input raises a UsageError before anything is started or changed.
    """
    from claudecluster.workspace import new_run_id

    check_limits(max_parallel=max_parallel, budget_usd=budget_usd)
    if repo is None and repo_block is None:
        raise UsageError("no repository given", hint="Pass --repo PATH or --repo-block NAME.")
    # Everything that can be checked here is, before any server starts; the goal flow then
    # checks what needs the server (blocks, pools) and resolves URLs, with the same code.
    if plan_file is not None:
        plan = load_plan_file(plan_file)
    if repo is not None and not is_remote(repo):
        target = open_target(repo, base=base)
        # The pull request merges into the branch the user named as the base, if they did.
        if pr_base is None and base is not None and gitops.branch_exists(target.repo, base):
            pr_base = base
        repo, base = str(target.root), target.base_commit
        plan = prepare_plan(target.root, plan=plan, plan_file=None, max_tasks=max_tasks)
        if pr and PullRequestMode(pr) is not PullRequestMode.OFF and repo_block is None:
            from claudecluster.pull_request import prepare_forge_target

            # The goal flow checks it again; here a wrong token fails before a server starts.
            prepare_forge_target(
                target.repo, location=None, base=pr_base, token=None, api_url=forge_api_url
            )
    goal_text = goal if goal and goal.strip() else (plan.goal if plan else None)
    goal_text = check_goal(goal_text or "")
    check_parameter_size(
        "this goal",
        {"goal": goal_text, "plan": plan.model_dump(mode="json") if plan else None},
    )
    if settings_block is None:  # else the block has the credentials and the endpoint
        require_credentials()
        check_model_api()
    server = connect(ephemeral=ephemeral, announce=announce)
    from claudecluster.preflight import check_server_side

    check_server_side(
        plan, pool=pool, repo=repo, repo_block=repo_block, settings_block=settings_block
    )
    run_id = run_id or new_run_id()
    parameters: dict[str, Any] = {
        "goal": goal_text,
        "repo": str(repo) if repo is not None else None,
        "repo_block": repo_block,
        "base": base,
        "plan": plan,
        "verify": verify,
        "pool": pool,
        "max_parallel": max_parallel or default_parallelism(),
        "max_tasks": max_tasks,
        "budget_usd": budget_usd,
        "settings": settings,
        "settings_block": settings_block,
        "pr": PullRequestMode(pr) if pr else None,
        "review": ReviewMode(review) if review else None,
        "forge_api_url": forge_api_url,
        "pr_base": pr_base,
    }
    with worktrees_in(Path(worktree_root) if worktree_root else None):
        return host_goal(run_id, parameters, server, on_interrupted)


def host_goal(
    run_id: str,
    parameters: dict[str, Any],
    server: ServerInfo | None,
    on_interrupted: Callable[[RunReport], None] | None,
) -> RunReport:
    """Run the goal flow in this process as the run ``run_id``; its report.

    The flow run is named after the run id, tagged like the runs it creates, and watched
    for a lost server (see :func:`interruptions`).
    """
    from prefect import tags

    from claudecluster.flows.goal import goal_flow
    from claudecluster.naming import run_tags

    named = goal_flow.with_options(flow_run_name=run_id)
    goal = parameters.get("goal") or None
    with (
        hosted_here(),
        tags(*run_tags(run_id, goal=goal)),
        interruptions(run_id, on_interrupted) as interrupted,
    ):
        state = named(**parameters, return_state=True)
    return interrupted.report or _report_of(state, server)


class _Interruption:
    """The report of a run whose server was lost, once the flow has written it."""

    report: RunReport | None = None


@contextmanager
def interruptions(
    run_id: str, on_interrupted: Callable[[RunReport], None] | None
) -> Iterator[_Interruption]:
    """Watch the run's Prefect server while the block runs; when it is lost, wait for the
    run's report in its journal and hand it to ``on_interrupted``.

    Inside the block, a flow call that fails because the server is gone is not an error:
    the block ends normally and the interruption carries the journal's report.
    """
    import threading
    import time

    from claudecluster.journal import RunJournal
    from claudecluster.server_watch import current_watch

    started = time.time()
    interruption = _Interruption()
    watch = current_watch()
    if watch is None:
        yield interruption
        return
    finished = threading.Event()

    def wait_for_report() -> None:
        journal = RunJournal(run_id)
        while not finished.wait(0.25):
            if (report := journal.report(newer_than=started)) is not None:
                interruption.report = report
                if on_interrupted is not None:
                    on_interrupted(report)
                return

    def lost() -> None:
        quiet_prefect_console()
        threading.Thread(target=wait_for_report, daemon=True).start()

    watch.on_lost(lost)
    try:
        yield interruption
    except Exception:
        if not watch.lost.is_set():
            raise
        interruption.report = RunJournal(run_id).report(newer_than=started)
        if interruption.report is None:
            raise
    finally:
        finished.set()


def quiet_prefect_console() -> None:
    """Stop Prefect's console logging: with its server gone it has only failures to say."""
    import logging

    # Prefect's API log worker writes its failures to stderr unless this is off.
    logging.raiseExceptions = False
    for name in [None, *logging.root.manager.loggerDict]:
        if name is None or name.startswith("prefect"):
            for handler in logging.getLogger(name).handlers:
                handler.setLevel(logging.CRITICAL + 1)


def run_sweep(
    sweep: SweepSpec,
    repo: str | Path,
    *,
    max_parallel: int | None = None,
    settings: WorkerSettings | None = None,
    pool: str | None = None,
    settings_block: str | None = None,
    ephemeral: bool = False,
    announce: Callable[[str], None] | None = None,
) -> RunReport:
    """Run a sweep now: select and batch its files, run the tasks, merge, verify, report."""
    target = open_target(repo)
    if settings_block is None:
        require_credentials()
    server = connect(ephemeral=ephemeral, announce=announce)
    from claudecluster.pools import worker_deployments

    worker_deployments({pool} if pool else set())
    from claudecluster.flows.sweep import sweep_flow

    with hosted_here():
        state = sweep_flow(
            sweep=sweep,
            repo=str(target.root),
            max_parallel=max_parallel or default_parallelism(),
            pool=pool,
            settings=settings,
            settings_block=settings_block,
            return_state=True,
        )
    return _report_of(state, server)


def _report_of(state: Any, server: ServerInfo | None) -> RunReport:
    """The RunReport a goal or sweep flow run's final state carries, with its UI link.

    The run's logs are on the server before this returns: Prefect ships them in batches
    every two seconds, and the report's link should show the whole run when it is opened.
    """
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    report = state.result(raise_on_failure=False)
    if isinstance(report, BaseException):
        raise report
    if not isinstance(report, RunReport):
        raise RuntimeError(f"the flow returned {type(report).__name__}, not a RunReport")
    if server is not None and report.flow_run_id:
        report.ui_url = prefect_server.flow_run_url(server, report.flow_run_id)
    return report


def connect(
    *, ephemeral: bool = False, announce: Callable[[str], None] | None = None
) -> ServerInfo | None:
    """Point this process at a Prefect backend; return the server when it has a UI."""
    from prefect.context import FlowRunContext

    from claudecluster.concurrency import ensure_limits

    if FlowRunContext.get() is not None:
        return None  # already inside a flow run (e.g. a deployment): keep its backend
    keep_results_at_home()
    if ephemeral:
        prefect_server.use_ephemeral()
        ensure_limits()
        return None
    if announce and not os.environ.get("PREFECT_API_URL") and not prefect_server.server_status():
        announce("Starting the local Prefect server (first use only)...")
    info = prefect_server.ensure_server()
    prefect_server.use_server(info)
    ensure_limits()
    return info


RESULT_STORAGE_VARS = (
    "PREFECT_LOCAL_STORAGE_PATH",
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH",
    "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK",
    "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK",
)


def keep_results_at_home() -> None:
    """Persist Prefect results under the ClaudeCluster home, unless the user chose where.

    Set before the process's Prefect settings are (re)built, which connecting does.
    """
    if not any(os.environ.get(name) for name in RESULT_STORAGE_VARS):
        from claudecluster.workspace import results_root

        os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(results_root())


def resume_run(
    run_id: str,
    *,
    ephemeral: bool = False,
    announce: Callable[[str], None] | None = None,
    on_interrupted: Callable[[RunReport], None] | None = None,
) -> RunReport:
    """Run ``run_id`` again with the same parameters: only what failed or never ran re-runs.

    Work that already finished is reused, not run or paid for again, whatever the Prefect
    server recorded: from Prefect's cache (persisted results), from the run journal on this
    machine, or from the trailers of the task branches' commits; such results are marked
    ``cached``. A run left RUNNING by a driver that died is marked Crashed first.
    """
    server = connect(ephemeral=ephemeral, announce=announce)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterName,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["claudecluster-goal"])),
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_id])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=1,
        )
        if not runs:
            raise UsageError(
                f"no goal run named {run_id!r} on this Prefect server",
                hint="Check the run id (it is the integration branch's middle part).",
            )
        crashed = mark_abandoned_crashed(client, runs[0])
    if crashed and announce:
        announce(f"marked {crashed} run(s) of {run_id} that a dead driver left running as Crashed")
    return host_goal(run_id, _current_parameters(dict(runs[0].parameters)), server, on_interrupted)


# Goal-flow parameters earlier versions had, and what became of them.
_RENAMED_PARAMETERS = {"base_commit": "base"}
_DROPPED_PARAMETERS = ("run_id", "worktree_root")


def _current_parameters(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored goal run's parameters as the goal flow takes them today."""
    for old, new in _RENAMED_PARAMETERS.items():
        if old in stored:
            stored.setdefault(new, stored.pop(old))
    for name in _DROPPED_PARAMETERS:
        stored.pop(name, None)
    stored.setdefault("goal", "")
    return stored


def mark_abandoned_crashed(client: Any, flow_run: Any) -> int:
    """Mark a goal run that is not final, and its task runs that are not, as Crashed.

    Only its driver moves a goal run on; a resume means that driver is gone (killed, or
    cut off from the server), so whatever it left running never will end by itself.
    Returns how many runs were marked.
    """
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    if flow_run.state is None or flow_run.state.is_final():
        return 0
    message = "its driver died; found and marked by `claudecluster resume`"
    not_final = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED]
    task_runs = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
        task_run_filter=TaskRunFilter(
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=not_final))
        ),
    )
    for task_run in task_runs:
        client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
    client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
    return 1 + len(task_runs)
