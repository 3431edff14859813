"""Answering a pull request's review: ``claudecluster respond PR_URL``.

The pull request's unresolved review threads (those a person opened and ClaudeCluster has
not answered) become a plan with one task per file (:func:`~claudecluster.pr_review.
respond_plan`). It runs as an ordinary goal whose base is the pull request's head, fetched
into ``refs/claudecluster/review/<n>/head``; the integration branch is then pushed onto the
pull request's branch (a fast-forward: if someone pushed meanwhile, the push is refused and
the work stays on the integration branch), and each answered thread gets a reply naming the
commit, and is resolved where the forge's API allows it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from claudecluster import api, gitops, remote
from claudecluster.errors import ClaudeClusterError
from claudecluster.models import RunReport, RunStatus, WorkerSettings
from claudecluster.pr_review import REPLY_MARKER, answerable, open_subject, respond_plan


@dataclass
class RespondOutcome:
    """What ``respond`` did: the run's report (None when there was nothing to answer), and
    one line per thread or push for the user."""

    report: RunReport | None
    lines: list[str] = field(default_factory=list)
    ok: bool = True


def respond(
    pull_url: str,
    repo_path: str | Path,
    *,
    verify: str | None = None,
    max_parallel: int | None = None,
    settings: WorkerSettings | None = None,
    settings_block: str | None = None,
    forge_api_url: str | None = None,
    worktree_root: str | Path | None = None,
    announce: Callable[[str], None] | None = None,
) -> RespondOutcome:
    """Answer the unresolved review threads of the pull request at ``pull_url``."""
    repo = gitops.open_repo(repo_path)
    subject = open_subject(repo, pull_url, api_url=forge_api_url, need_forge=True)
    assert subject.forge is not None and subject.pull is not None and subject.git_url
    pull, forge = subject.pull, subject.forge
    threads = answerable(forge.open_threads(pull.number))
    if not threads:
        return RespondOutcome(report=None)
    plan, by_task = respond_plan(threads, number=pull.number, verify=verify)
    report = api.run_goal(
        plan.goal,
        repo_path,
        plan=plan,
        base=subject.head,
        max_parallel=max_parallel,
        settings=settings,
        settings_block=settings_block,
        worktree_root=worktree_root,
        announce=announce,
    )
    outcome = RespondOutcome(report=report, ok=report.status is RunStatus.SUCCEEDED)
    merged = {r.id for r in report.tasks if r.status.ok} - {u.id for u in report.unmerged}
    if not merged or report.head_commit is None or report.integration_branch is None:
        outcome.lines.append("nothing was merged: no push, no replies")
        outcome.ok = False
        return outcome
    try:
        remote.push_to(
            repo, subject.git_url, report.integration_branch, env=subject.git_env, to=pull.head
        )
    except ClaudeClusterError as exc:
        outcome.lines.append(
            f"could not push to {pull.head} ({exc.one_line()}); the work is on "
            f"{report.integration_branch}"
        )
        outcome.ok = False
        return outcome
    commit = report.head_commit
    outcome.lines.append(f"pushed {commit[:12]} to {pull.head}")
    for result in report.tasks:
        for thread in by_task.get(result.id, []):
            if result.id not in merged:
                outcome.lines.append(f"not answered: {thread.path}:{thread.line} ({result.status})")
                continue
            forge.reply(
                pull.number,
                thread,
                f"Done in {commit[:12]}: {result.title} (+{result.added}/-{result.removed} "
                f"lines).\n\n{REPLY_MARKER}",
            )
            resolved = forge.resolve(thread)
            outcome.lines.append(
                f"answered {thread.path}:{thread.line}" + (" and resolved it" if resolved else "")
            )
    return outcome
