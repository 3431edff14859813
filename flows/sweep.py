"""The sweep flow: a prompt template over a file set, run as a goal, on a schedule.

Deployed with a cron schedule in ``deployments/prefect.yaml`` (e.g. nightly "add missing
docstrings"); ``prefect deployment run`` or ``claudecluster sweep`` runs it now. Its runs are
named after the sweep and the day (``sweep-docstrings-2026-11-27``); the goal it runs is a
child run tagged like it.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow, get_run_logger, tags
from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed

from claudecluster import telemetry
from claudecluster.blocks.repository import resolve_target
from claudecluster.errors import ClaudeClusterError
from claudecluster.flows.goal import goal_flow
from claudecluster.models import RunReport, RunStatus, WorkerSettings
from claudecluster.naming import slug
from claudecluster.runs import current_identity, tag_current_run
from claudecluster.sweep import SweepSpec, select_files, sweep_plan
from claudecluster.sweep_state import last_swept_commit, record_sweep
from claudecluster.workspace import default_worktree_root, new_run_id

# Before any flow run starts, so Prefect's own spans go to the collector too.
telemetry.setup()


def _sweep_run_name() -> str:
    """``sweep-<name>-<date>``, so a schedule's runs tell themselves apart in the runs list."""
    from prefect.runtime import flow_run

    spec = flow_run.parameters.get("sweep")
    name = spec.name if isinstance(spec, SweepSpec) else (spec or {}).get("name", "sweep")
    return f"sweep-{slug(str(name))}-{datetime.now(UTC):%Y-%m-%d-%H%M%S}"


@flow(name="claudecluster-sweep", flow_run_name=_sweep_run_name, log_prints=False)
def sweep_flow(
    sweep: SweepSpec,
    repo: str | None = None,
    repo_block: str | None = None,
    base: str | None = None,
    pool: str | None = None,
    max_parallel: int = 2,
    settings: WorkerSettings | None = None,
    settings_block: str | None = None,
) -> State[RunReport]:
    """Select files, batch them into tasks, and run them as a goal.

    Args:
        sweep: What to do to which files: the prompt template ('{files}' becomes each
            batch's list), the globs, the batch size and the cap.
        repo: The git repository: a path on the machine this run runs on, or a git URL.
        repo_block: A ClaudeCluster Target Repository block to use instead of repo.
        base: The branch, tag or commit to sweep; HEAD (or the block's branch) when empty.
        pool: The work pool for the sweep's tasks; empty runs them in this flow run.
        max_parallel: How many Claude Code sessions run at once.
        settings: Model, permissions and per-session limits (override the settings block).
        settings_block: A ClaudeCluster Claude Code Settings block (model, limits, API key).
    """
    logger = get_run_logger()
    identity = current_identity(sweep=sweep.name)
    tag_current_run(identity.tags)
    try:
        target = resolve_target(
            repo, repo_block, base=base, clones_root=default_worktree_root() / "clones"
        )
    except ClaudeClusterError as exc:
        logger.error("not started: %s", exc.one_line())
        return Failed(data=exc, message=exc.one_line())
    git_repo, base_commit = target.repo, target.base_commit
    since = last_swept_commit(sweep.name, git_repo) if sweep.changed_since_last else None
    files = select_files(git_repo, base_commit, sweep, since)
    logger.info(
        "sweep %s: %d files%s",
        sweep.name,
        len(files),
        f" changed since {since[:12]}" if since else "",
    )
    if not files:
        # Nothing matched: the last sweep's mark stays where it was, so files that change
        # later (or a fixed glob) are still found next time.
        report = RunReport(
            run_id=identity.run_id,
            goal=f"Sweep {sweep.name}",
            status=RunStatus.SUCCEEDED,
            repo=target.location,
            base_commit=base_commit,
        )
        return Completed(data=report, message="nothing to sweep")
    goal = goal_flow.with_options(flow_run_name=new_run_id())
    with tags(*identity.tags):
        state: State[RunReport] = goal(  # type: ignore[assignment]
            goal=f"Sweep {sweep.name}",
            repo=repo,
            repo_block=repo_block,
            base=base_commit,
            plan=sweep_plan(sweep, files),
            pool=pool,
            max_parallel=max_parallel,
            settings=settings,
            settings_block=settings_block,
            return_state=True,
        )
    outcome = state.result(raise_on_failure=False)
    if not isinstance(outcome, RunReport):
        return Failed(message=f"the sweep's goal run ended without a report: {outcome!r}"[:500])
    if state.is_completed():
        record_sweep(sweep.name, git_repo, base_commit)
        return Completed(data=outcome, message=state.message)
    return Failed(data=outcome, message=state.message)
