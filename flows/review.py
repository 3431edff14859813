"""The review flow: a read-only review of a pull request or a branch, posted on the forge.

``claudecluster review TARGET`` runs the same code without a flow; as a deployment it can be
started from the UI or scheduled (for example, every morning on a long-lived branch). The
review is one sticky comment on the pull request, edited in place on every run, and the
run's ``review`` artifact.
"""

from __future__ import annotations

import anyio
from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed

from claudecluster import telemetry
from claudecluster.blocks.repository import load_target, resolve_target
from claudecluster.blocks.settings import resolve_settings
from claudecluster.concurrency import session_slot
from claudecluster.errors import ClaudeClusterError
from claudecluster.models import ReviewMode, WorkerSettings
from claudecluster.naming import TAG, artifact_key, slug
from claudecluster.pr_review import PostedReview, open_subject, review_subject
from claudecluster.session import SessionHost
from claudecluster.workspace import default_worktree_root

# Before any flow run starts, so Prefect's own spans go to the collector too.
telemetry.setup()


@task(name="review", task_run_name="review", cache_policy=NONE, persist_result=False)
def review_change(
    target: str,
    repo: str | None,
    repo_block: str | None,
    base: str | None,
    review: ReviewMode,
    forge_api_url: str | None,
    settings: WorkerSettings | None,
    settings_block: str | None,
) -> PostedReview:
    logger = get_run_logger()
    resolved = resolve_settings(settings, settings_block)
    root = default_worktree_root()
    location = resolve_target(repo, repo_block, base=None, clones_root=root / "clones")
    token, block_api_url = (
        load_target(repo_block).forge_credentials() if repo_block else (None, None)
    )
    subject = open_subject(
        location.repo,
        target,
        base=base,
        token=token,
        api_url=forge_api_url or block_api_url,
    )
    host = SessionHost(slot=session_slot, env=resolved.env, log=logger.info)
    posted = anyio.run(
        lambda: review_subject(
            subject,
            settings=resolved.settings,
            worktree_root=root / "reviews",
            host=host,
            post=review is not ReviewMode.NONE,
            lines=review is ReviewMode.LINES,
        )
    )
    where = posted.comment_url or "not posted (no open pull request)"
    logger.info("reviewed %s: %s", subject.label, where)
    return posted


@flow(name="claudecluster-review", flow_run_name="review-{target}", log_prints=False)
def review_flow(
    target: str,
    repo: str | None = None,
    repo_block: str | None = None,
    base: str | None = None,
    review: ReviewMode = ReviewMode.SUMMARY,
    forge_api_url: str | None = None,
    settings: WorkerSettings | None = None,
    settings_block: str | None = None,
) -> State[PostedReview]:
    """Review a pull request or a branch with a read-only Claude Code session.

    Args:
        target: A pull request URL (https://HOST/OWNER/NAME/pull/N) or a branch name.
        repo: The git repository: a path on the machine this run runs on, or a git URL.
        repo_block: A ClaudeCluster Target Repository block to use instead of repo (it can
            hold the forge token).
        base: For a branch, what to compare it with (default: the checked-out branch).
        review: summary (one sticky comment), lines (also a review with line comments) or
            none (only the run's artifact).
        forge_api_url: The forge's API base URL when it is not github.com.
        settings: Model and per-session limits (override the settings block).
        settings_block: A ClaudeCluster Claude Code Settings block (model, limits, API key).
    """
    with tags(TAG, f"{TAG}-review:{slug(target)}"):
        try:
            posted = review_change(
                target, repo, repo_block, base, review, forge_api_url, settings, settings_block
            )
        except ClaudeClusterError as exc:
            get_run_logger().error("not reviewed: %s", exc.one_line())
            return Failed(data=exc, message=exc.one_line())
        create_markdown_artifact(
            key=artifact_key("review", slug(target, words=10)),
            markdown=posted.markdown,
            description=f"Review of {target}",
        )
        return Completed(data=posted, message=posted.comment_url or "reviewed, not posted")
