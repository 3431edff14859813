"""The sweep flow: a prompt template over a file set, run as a goal, on a schedule.

Deployed with a cron schedule in ``deployments/prefect.yaml`` (e.g. nightly "add missing
docstrings"); ``prefect deployment run`` or ``claudecluster sweep`` runs it now.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed

from claudecluster.blocks.repository import resolve_target
from claudecluster.flows.goal import goal_flow
from claudecluster.models import RunReport, RunStatus, WorkerSettings
from claudecluster.sweep import SweepSpec, select_files, sweep_plan
from claudecluster.sweep_state import last_swept_commit, record_sweep
from claudecluster.workspace import default_worktree_root


@flow(name="claudecluster-sweep", flow_run_name="sweep-{sweep.name}", log_prints=False)
def sweep_flow(
    sweep: SweepSpec,
    repo: str | None = None,
    repo_block: str | None = None,
    base_commit: str | None = None,
    max_parallel: int = 2,
    pool: str | None = None,
    settings: WorkerSettings | None = None,
    settings_block: str | None = None,
) -> State[RunReport]:
    """Select files, batch them into tasks, and run them as a goal."""
    logger = get_run_logger()
    target = resolve_target(
        repo, repo_block, base=base_commit, clones_root=default_worktree_root() / "clones"
    )
    git_repo, base = target.repo, target.base_commit
    since = last_swept_commit(sweep.name, git_repo) if sweep.changed_since_last else None
    files = select_files(git_repo, base, sweep, since)
    logger.info(
        "sweep %s: %d files%s",
        sweep.name,
        len(files),
        f" changed since {since[:12]}" if since else "",
    )
    if not files:
        report = RunReport(
            run_id="",
            goal=f"Sweep {sweep.name}",
            status=RunStatus.SUCCEEDED,
            repo=target.location,
            base_commit=base,
            error=None,
        )
        record_sweep(sweep.name, git_repo, base)
        return Completed(data=report, message="nothing to sweep")
    state: State[RunReport] = goal_flow(  # type: ignore[assignment]
        goal=f"Sweep {sweep.name}",
        repo=repo,
        repo_block=repo_block,
        plan=sweep_plan(sweep, files),
        max_parallel=max_parallel,
        settings=settings,
        base_commit=base,
        pool=pool,
        settings_block=settings_block,
        return_state=True,
    )
    outcome = state.result(raise_on_failure=False)
    if not isinstance(outcome, RunReport):
        return Failed(message=f"the sweep's goal run ended without a report: {outcome!r}"[:500])
    if state.is_completed():
        record_sweep(sweep.name, git_repo, base)
        return Completed(data=outcome, message=state.message)
    return Failed(data=outcome, message=state.message)
