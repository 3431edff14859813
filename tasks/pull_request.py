"""The pull-request tasks of a goal run: review the integration branch, open or update its PR.

Both run after integration, in the goal's flow run, so they show in its graph and logs. The
forge client (and its token) is handed over in process and never becomes a parameter, a
result or a log line: the tasks cache nothing and persist nothing.
"""

from __future__ import annotations

from pathlib import Path

import anyio
from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NONE

from claudecluster.errors import ForgeAccessError
from claudecluster.models import PullRequestInfo, PullRequestMode, RunReport, WorkerSettings
from claudecluster.naming import artifact_key
from claudecluster.plan import Plan
from claudecluster.pull_request import ForgeTarget, publish_pull_request
from claudecluster.review import (
    Intent,
    Review,
    post_review,
    review_markdown,
    review_prose,
    run_review,
)
from claudecluster.session import SessionHost


@task(name="review", task_run_name="review", cache_policy=NONE, persist_result=False)
def review_integration(
    report: RunReport,
    plan: Plan,
    repo: str,
    settings: WorkerSettings,
    worktree_root: str,
    host: SessionHost,
) -> tuple[Review, str, float]:
    """A read-only review of the integration branch against the run's base, with each
    task's intent: the review, the diff it read, and what it cost."""
    logger = get_run_logger()
    assert report.head_commit is not None
    intents = [Intent(t.id, t.title, t.prompt) for t in plan.tasks]
    review, diff, outcome = anyio.run(
        lambda: run_review(
            repo,
            report.base_commit,
            report.head_commit or "",
            goal=report.goal,
            intents=intents,
            settings=settings,
            worktree_root=Path(worktree_root),
            host=host.with_log(logger.info),
        )
    )
    logger.info(
        "review: %d risks, %d notes, %d untested, $%.4f",
        len(review.risks),
        len(review.notes),
        len(review.missing_tests),
        outcome.cost_usd,
    )
    return review, diff, outcome.cost_usd


def _retry_unless_refused(task: object, task_run: object, state: object) -> bool:
    """Retry a forge's hiccups, not a refused token (it will not get better)."""
    try:
        state.result()  # type: ignore[attr-defined]
    except ForgeAccessError:
        return False
    except Exception:  # any other failure of the forge is worth a retry
        return True
    return False


@task(
    name="pull-request",
    task_run_name="pull-request",
    cache_policy=NONE,
    persist_result=False,
    retries=2,
    retry_delay_seconds=3,
    retry_condition_fn=_retry_unless_refused,
)
def open_pull_request(
    report: RunReport,
    repo_path: str,
    target: ForgeTarget,
    mode: PullRequestMode,
    review: Review | None,
    diff: str,
    review_cost_usd: float,
    scope: str,
    line_review: bool,
) -> PullRequestInfo | None:
    """Push the integration branch, open or update the pull request, post the review as
    one sticky comment (and, with ``line_review``, one batched review)."""
    from claudecluster import gitops

    logger = get_run_logger()
    repo = gitops.open_repo(repo_path)
    summary = (
        review_markdown(review, subject=f"run `{report.run_id}`", cost_usd=review_cost_usd)
        if review is not None
        else None
    )
    prose = review_prose(review) if review is not None else None
    info = publish_pull_request(repo, report, target, mode, review=prose)
    if info is None:
        logger.info("no pull request: the run has no integration branch to offer")
        return None
    verb = "opened" if info.created else ("pushed" if info.number is None else "updated")
    logger.info("%s %s (%s -> %s)", verb, info.url, info.head, info.base)
    if info.number is not None and summary is not None and review is not None:
        info.review_url, count = post_review(
            target.forge, info.number, review, summary, diff, lines=line_review
        )
        logger.info("posted the review (%d new line comments)", count)
    create_link_artifact(
        key=artifact_key(scope, "pull-request"),
        link=info.url,
        link_text=f"Pull request #{info.number}" if info.number else "Compare the branch",
        description=f"The pull request of run {report.run_id}",
    )
    return info
