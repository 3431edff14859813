"""The integrate task: merge the succeeded task branches left in dependency order, then verify."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import anyio
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from claudecluster.integrate import Integration, IntegrationOutcome
from claudecluster.models import TaskResult, TaskSpec, WorkerSettings
from claudecluster.resolve import Resolution, Resolver, resolve_conflict
from claudecluster.session import SessionHost


@task(name="integrate", task_run_name="integrate", cache_policy=NONE)
def integrate_branches(
    integration: Integration,
    results: dict[str, TaskResult],
    settings: WorkerSettings,
    host: SessionHost,
) -> IntegrationOutcome:
    """Merge the rest onto the integration branch (resolving conflicts), then verify.

    Most branches were merged while the run went on (see :class:`Integration`); this merges
    what is left. ``host`` runs the resolution sessions, when ``settings.resolve_conflicts``
    allows them.
    """
    logger = get_run_logger()
    resolver = (
        _session_resolver(settings, host.with_log(logger.info))
        if settings.resolve_conflicts
        else None
    )
    outcome = integration.finish(
        results,
        verify=integration.plan.verify,
        verify_timeout_s=settings.verify_timeout_s,
        resolver=resolver,
    )
    logger.info("merged %s onto %s", ", ".join(outcome.merged) or "nothing", outcome.branch)
    for task_id in outcome.resolved:
        logger.info("resolved a merge conflict of %s with a resolution session", task_id)
    for unmerged in outcome.unmerged:
        logger.warning("not merged: %s (%s)", unmerged.id, unmerged.reason)
    if outcome.final_verify is not None:
        verdict = "passed" if outcome.final_verify.ok else "FAILED"
        logger.info("final verify `%s` %s", outcome.final_verify.command, verdict)
    return outcome


def _session_resolver(settings: WorkerSettings, host: SessionHost) -> Resolver:
    def resolver(
        worktree: Path,
        files: list[str],
        task: TaskSpec,
        others: list[TaskSpec],
        verify: str | None,
    ) -> Resolution:
        host.log(f"resolving the conflict of {task.id} in {', '.join(files)}")
        return anyio.run(
            partial(
                resolve_conflict,
                worktree,
                files,
                task,
                others,
                verify,
                settings=settings,
                host=host,
            )
        )

    return resolver
