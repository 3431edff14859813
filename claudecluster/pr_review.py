"""Reviewing and answering any pull request or branch: ``claudecluster review`` and ``respond``.

:func:`open_subject` turns a pull request URL (``https://HOST/OWNER/NAME/pull/N``, or
``/pulls/N`` on Gitea) or a branch name into what to review: the head and base commits
(fetched from the forge into ``refs/claudecluster/review/...``, so the user's own branches
and checkout are never touched), the pull request's title and body as its intent, and the
forge to post on. :func:`respond_plan` turns a pull request's unresolved review threads
into a plan with one task per file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import git

from claudecluster import gitops, remote
from claudecluster.errors import UsageError
from claudecluster.forges import Forge, ForgePull, ReviewThread, connect, find_token, locate
from claudecluster.models import TaskKind, TaskSpec, WorkerSettings
from claudecluster.plan import Plan
from claudecluster.pull_request import remote_url
from claudecluster.review import (
    NOTE_MARKER,
    REVIEW_MARKER,
    Review,
    post_review,
    review_markdown,
    run_review,
)
from claudecluster.session import SessionHost

REPLY_MARKER = "<!-- claudecluster:reply -->"
_PR_URL = re.compile(r"^(https?://[^/]+(?:/.+)?)/([^/]+)/([^/]+)/pulls?/(\d+)/?$")


@dataclass
class ReviewSubject:
    """A change to review: ``base``..``head`` of a repository, and where to post."""

    repo: git.Repo
    base: str
    head: str
    label: str  # "pull request #3" or "branch feature/x"
    intent: str  # what the change says it does
    forge: Forge | None = None
    pull: ForgePull | None = None
    git_url: str | None = None
    git_env: dict[str, str] = field(default_factory=dict, repr=False)


def parse_pull_url(text: str) -> tuple[str, int] | None:
    """``(repository web URL, number)`` of a pull request URL; None for anything else."""
    found = _PR_URL.match(text.strip())
    if not found:
        return None
    return f"{found.group(1)}/{found.group(2)}/{found.group(3)}", int(found.group(4))


def open_subject(
    repo: git.Repo,
    target: str,
    *,
    base: str | None = None,
    token: str | None = None,
    api_url: str | None = None,
    need_forge: bool = False,
) -> ReviewSubject:
    """What ``target`` (a pull request URL or a branch) asks to review."""
    parsed = parse_pull_url(target)
    if parsed is not None:
        web_url, number = parsed
        forge = connect(locate(web_url + ".git", api_url), find_token(token))
        pull = forge.get(number)
        git_url = _git_url_for(repo, web_url)
        env = remote.credential_env(None, find_token(token))
        prefix = f"refs/claudecluster/review/{number}"
        head = remote.fetch_from(
            repo, git_url, f"refs/heads/{pull.head}", f"{prefix}/head", env=env
        )
        base_tip = remote.fetch_from(
            repo, git_url, f"refs/heads/{pull.base}", f"{prefix}/base", env=env
        )
        return ReviewSubject(
            repo=repo,
            base=repo.git.merge_base(base_tip, head),
            head=head,
            label=f"pull request #{number}",
            intent=f"{pull.title}\n\n{_strip_markers(pull.body)}".strip(),
            forge=forge,
            pull=pull,
            git_url=git_url,
            git_env=env,
        )
    if not gitops.branch_exists(repo, target):
        raise UsageError(
            f"{target} is neither a pull request URL nor a branch of {repo.working_dir}",
            hint="Pass https://HOST/OWNER/NAME/pull/N, or a local branch name.",
        )
    head = gitops.resolve_commit(repo, target)
    base_ref = base or _current_branch(repo)
    base_commit = repo.git.merge_base(gitops.resolve_commit(repo, base_ref), head)
    subject = ReviewSubject(
        repo=repo,
        base=base_commit,
        head=head,
        label=f"branch `{target}`",
        intent=f"The changes on branch {target} since {base_ref}.",
    )
    found_token = find_token(token)
    if found_token or need_forge:
        forge = connect(locate(remote_url(repo, None), api_url), found_token)
        subject.forge, subject.pull = forge, forge.find_open(target)
    return subject


def _git_url_for(repo: git.Repo, web_url: str) -> str:
    """The local repository's remote for ``web_url`` if it has one, else the web URL's git
    address (forges serve both)."""
    owner_name = "/".join(web_url.rstrip("/").split("/")[-2:]).lower()
    for candidate in repo.remotes:
        url = str(candidate.url)
        path = urlsplit(url).path if "://" in url else url.split(":", 1)[-1]
        if path.removesuffix(".git").strip("/").lower().endswith(owner_name):
            return url
    return web_url + ".git"


def _current_branch(repo: git.Repo) -> str:
    try:
        return str(repo.active_branch.name)
    except TypeError:
        raise UsageError(
            "cannot tell what to compare with (HEAD is detached)", hint="Pass --base BRANCH."
        ) from None


def _strip_markers(body: str) -> str:
    return re.sub(r"<!--.*?-->", "", body, flags=re.S).strip()


def answerable(threads: list[ReviewThread]) -> list[ReviewThread]:
    """The threads a person opened and ClaudeCluster has not answered yet."""
    return [
        t
        for t in threads
        if t.comments
        and NOTE_MARKER not in t.comments[0].body
        and REVIEW_MARKER not in t.comments[0].body
        and not any(REPLY_MARKER in c.body for c in t.comments)
    ]


def _task_id(path: str, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")[:40] or "file"
    candidate, n = base, 2
    while candidate in taken:
        candidate, n = f"{base}-{n}", n + 1
    taken.add(candidate)
    return candidate


def respond_plan(
    threads: list[ReviewThread], *, number: int, verify: str | None
) -> tuple[Plan, dict[str, list[ReviewThread]]]:
    """One task per file with unresolved threads; the plan and each task's threads."""
    by_path: dict[str, list[ReviewThread]] = {}
    for thread in threads:
        by_path.setdefault(thread.path, []).append(thread)
    tasks: list[TaskSpec] = []
    answered: dict[str, list[ReviewThread]] = {}
    taken: set[str] = set()
    for path, group in sorted(by_path.items()):
        task_id = _task_id(path, taken)
        asks = "\n".join(
            f"- line {t.line or '?'}: "
            + "\n  ".join(f"{c.author}: {' '.join(c.body.split())}" for c in t.comments)
            for t in group
        )
        tasks.append(
            TaskSpec(
                id=task_id,
                kind=TaskKind.REFACTOR,
                title=f"Answer the review of {path}",
                prompt=(
                    f"Reviewers of pull request #{number} left these comments on {path}:\n"
                    f"{asks}\n\nMake the changes they ask for in {path}. Change nothing else."
                ),
                paths=[path],
            )
        )
        answered[task_id] = group
    plan = Plan(goal=f"Answer the review of pull request #{number}", tasks=tasks, verify=verify)
    return plan, answered


@dataclass
class PostedReview:
    """A review of a subject and where it went."""

    review: Review
    markdown: str
    cost_usd: float
    comment_url: str | None = None  # None: not posted (no pull request, or not asked to)
    line_comments: int = 0


async def review_subject(
    subject: ReviewSubject,
    *,
    settings: WorkerSettings,
    worktree_root: Path,
    host: SessionHost | None = None,
    post: bool = True,
    lines: bool = False,
) -> PostedReview:
    """Review ``subject`` with a read-only session and, when it is an open pull request and
    ``post`` is set, post it as the sticky comment (and, with ``lines``, a batched review)."""
    review, diff, outcome = await run_review(
        str(subject.repo.working_dir),
        subject.base,
        subject.head,
        goal=subject.intent,
        intents=[],
        settings=settings,
        worktree_root=worktree_root,
        host=host,
    )
    markdown = review_markdown(review, subject=subject.label, cost_usd=outcome.cost_usd)
    posted = PostedReview(review, markdown, outcome.cost_usd)
    if post and subject.forge is not None and subject.pull is not None:
        posted.comment_url, posted.line_comments = post_review(
            subject.forge, subject.pull.number, review, markdown, diff, lines=lines
        )
    return posted
