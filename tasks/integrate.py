"""The integrate task: merge succeeded task branches in dependency order, then verify."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from claudecluster.integrate import IntegrationOutcome, integrate
from claudecluster.models import TaskResult
from claudecluster.plan import Plan


@task(name="integrate", cache_policy=NONE)
def integrate_branches(
    repo: str,
    base_commit: str,
    run_id: str,
    plan: Plan,
    results: dict[str, TaskResult],
    verify: str | None,
    verify_timeout_s: float,
    worktree_root: str,
) -> IntegrationOutcome:
    """Merge onto the integration branch and run the final verify there."""
    logger = get_run_logger()
    outcome = integrate(
        repo,
        base_commit,
        run_id,
        plan,
        results,
        verify=verify,
        verify_timeout_s=verify_timeout_s,
        worktree_root=Path(worktree_root),
    )
    logger.info("merged %s onto %s", ", ".join(outcome.merged) or "nothing", outcome.branch)
    for unmerged in outcome.unmerged:
        logger.warning("not merged: %s (%s)", unmerged.id, unmerged.reason)
    if outcome.final_verify is not None:
        verdict = "passed" if outcome.final_verify.ok else "FAILED"
        logger.info("final verify `%s` %s", outcome.final_verify.command, verdict)
    return outcome
