"""A run's integration branch as a pull request: push it, open or update the PR, write its body.

The body is built from the run's own data (:func:`pull_request_body`): the goal, one row per
task with a link to its Prefect run, the final verify, conflicts resolved and branches left
unmerged, totals, and the goal's Prefect run; the reviewer's prose goes in a folded
``<details>`` section. What ClaudeCluster writes sits between two hidden markers, so text a
person adds to the body outside them survives updates, and the title it set is recorded
there too: once someone edits the title on the forge, it is left alone.

A pull request is found again by its head branch (``claudecluster/<run-id>/integration``),
so a re-run or ``resume`` of the same run updates it instead of opening a second. A run
whose final verify failed, or that left tasks unmerged or failed, opens at most a draft that
says so at the top.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

import git

from claudecluster import gitops, remote
from claudecluster.errors import ForgeAccessError, ForgeError, GitError
from claudecluster.forges import Forge, ForgePull, ForgeRepository, connect, find_token, locate
from claudecluster.models import PullRequestInfo, PullRequestMode, RunReport, RunStatus
from claudecluster.redact import redact
from claudecluster.summary import run_table_rows

BEGIN = "<!-- claudecluster:begin run={run_id} title={title} -->"
END = "<!-- claudecluster:end -->"
_BEGIN_RE = re.compile(r"<!-- claudecluster:begin run=(\S*) title=(\S*) -->")
TITLE_LIMIT = 72


@dataclass
class ForgeTarget:
    """Where a run's pull request goes, checked before the run starts."""

    forge: Forge
    push_url: str
    base_branch: str
    git_env: dict[str, str] = field(repr=False)

    @property
    def repository(self) -> ForgeRepository:
        return self.forge.repository


def remote_url(repo: git.Repo, location: str | None, remote_name: str = "origin") -> str:
    """The git URL pull requests are opened on: the run's repository URL, or the local
    clone's remote ``remote_name``."""
    if location and remote.is_remote(location):
        return location
    try:
        return str(repo.remotes[remote_name].url)
    except (IndexError, ValueError, AttributeError):
        raise ForgeAccessError(
            f"the repository has no remote {remote_name!r} to open a pull request on",
            forge="-",
            hint=f"Add one (git remote add {remote_name} URL), or pass --remote NAME.",
        ) from None


def base_branch(repo: git.Repo, base: str | None) -> str:
    """The branch a pull request asks to merge into: ``base`` when it names a branch, else
    the branch checked out in the repository."""
    if base:
        name = base.removeprefix("refs/heads/").removeprefix("origin/")
        if gitops.branch_exists(repo, name) or f"origin/{name}" in {str(r) for r in repo.refs}:
            return name
    try:
        return str(repo.active_branch.name)
    except TypeError:  # a detached HEAD
        raise ForgeAccessError(
            "cannot tell which branch the pull request should merge into (HEAD is detached)",
            forge="-",
            hint="Pass --base BRANCH.",
        ) from None


def prepare_forge_target(
    repo: git.Repo,
    *,
    location: str | None,
    base: str | None,
    token: str | None,
    api_url: str | None = None,
    remote_name: str = "origin",
) -> ForgeTarget:
    """Resolve and check where the pull request goes: the forge, the token (valid and
    allowed to push), the base branch. ForgeAccessError (a one-line usage error) otherwise."""
    url = remote_url(repo, location, remote_name)
    repository = locate(url, api_url)
    token = find_token(token)
    forge = connect(repository, token)
    forge.check_access()
    assert token is not None
    return ForgeTarget(
        forge=forge,
        push_url=url,
        base_branch=base_branch(repo, base),
        git_env=remote.credential_env(None, token),
    )


def pull_request_title(goal: str) -> str:
    first = " ".join(goal.strip().splitlines()[0].split()) if goal.strip() else "ClaudeCluster run"
    title = f"ClaudeCluster: {first}"
    return title if len(title) <= TITLE_LIMIT else title[: TITLE_LIMIT - 3].rstrip() + "..."


def problems(report: RunReport) -> list[str]:
    """Why the run's branch is not ready to merge, in words for the top of the PR."""
    found = []
    if report.final_verify is not None and not report.final_verify.ok:
        found.append(f"the final verify (`{report.final_verify.command}`) failed")
    failed = [r.id for r in report.tasks if not r.status.ok]
    if failed:
        found.append("tasks did not finish: " + ", ".join(f"`{t}`" for t in failed))
    if report.unmerged:
        found.append("tasks were left unmerged: " + ", ".join(f"`{u.id}`" for u in report.unmerged))
    if not found and report.status is not RunStatus.SUCCEEDED:
        found.append(report.error or "the run failed")
    return found


def pull_request_body(report: RunReport, title: str, review: str | None = None) -> str:
    """The ClaudeCluster part of the PR body (between its markers)."""
    lines = [BEGIN.format(run_id=report.run_id, title=quote(title, safe=""))]
    issues = problems(report)
    if issues:
        lines += ["> [!WARNING]", "> **Not ready to merge:** " + "; ".join(issues) + ".", ""]
    lines += ["### Goal", "", report.goal.strip(), ""]
    if report.tasks:
        lines += [
            "### Tasks",
            "",
            "| task | status | files | +/- | tests | turns | cost | run |",
            "|---|---|---:|---:|---|---:|---:|---|",
        ]
        urls = {r.id: r.run_url for r in report.tasks}
        for row in run_table_rows(report):
            url = urls.get(str(row["task"]))
            link = f"[run]({url})" if url else "-"
            lines.append(
                f"| `{row['task']}` | {row['status']} | {row['files']} | "
                f"+{row['+lines']}/-{row['-lines']} | {row['tests']} | {row['turns']} | "
                f"${float(str(row['cost_usd'])):.4f} | {link} |"
            )
        lines.append("")
    lines += ["### Verify", ""]
    fv = report.final_verify
    if fv is None:
        lines.append("No verify command: nothing was run on the integration branch.")
    else:
        counts = f" ({fv.passed} passed, {fv.failed} failed)" if fv.passed is not None else ""
        lines.append(
            f"`{fv.command}` on the integration branch: "
            f"{'passed' if fv.ok else '**FAILED**'}{counts}"
        )
    lines.append("")
    if report.resolved or report.unmerged:
        lines += ["### Merging", ""]
        lines += [f"- conflict resolved: `{task}`" for task in report.resolved]
        lines += [
            f"- not merged: `{u.id}` (kept on `{u.branch or 'no branch'}`): {u.reason}"
            for u in report.unmerged
        ]
        lines.append("")
    t = report.totals
    lines += [
        "### Totals",
        "",
        f"{len(report.tasks)} tasks, {t.files_changed} files, +{t.added}/-{t.removed} lines, "
        f"{t.turns} turns, ${t.cost_usd:.4f}, {t.duration_s:.0f} s.",
        "",
    ]
    where = f"[the goal's run in Prefect]({report.ui_url})" if report.ui_url else "Prefect"
    lines.append(f"Run `{report.run_id}`, base `{report.base_commit[:12]}`: {where}.")
    if report.trace_id:
        trace = f"[{report.trace_id}]({report.trace_url})" if report.trace_url else report.trace_id
        lines.append(f"Trace: {trace}.")
    if review:
        lines += [
            "",
            "<details><summary>Review summary</summary>",
            "",
            review.strip(),
            "",
            "</details>",
        ]
    lines.append(END)
    return redact("\n".join(lines))


def merge_body(existing: str, ours: str) -> str:
    """``existing`` with its ClaudeCluster part replaced by ``ours`` (text outside kept)."""
    start = _BEGIN_RE.search(existing)
    end = existing.find(END, start.end()) if start else -1
    if start is None or end < 0:
        return ours if not existing.strip() else f"{ours}\n\n{existing}"
    return existing[: start.start()] + ours + existing[end + len(END) :]


def title_we_set(body: str) -> str | None:
    found = _BEGIN_RE.search(body)
    return unquote(found.group(2)) if found else None


def push_branch(repo: git.Repo, target: ForgeTarget, branch: str) -> None:
    """Push ``branch`` to the forge under the same name (it is ClaudeCluster's own branch,
    so a re-run's new head replaces the old one)."""
    try:
        remote.push_to(repo, target.push_url, branch, env=target.git_env, force=True)
    except GitError as exc:
        raise ForgeError(
            f"cannot push {branch} to {target.repository.web_url}: {exc.message}",
            forge=target.repository.api_url,
        ) from None


def publish_pull_request(
    repo: git.Repo,
    report: RunReport,
    target: ForgeTarget,
    mode: PullRequestMode,
    review: str | None = None,
) -> PullRequestInfo | None:
    """Push the run's integration branch and open or update its pull request (``mode``).
    None when the run has no integration branch to offer."""
    head = report.integration_branch
    if mode is PullRequestMode.OFF or head is None or report.head_commit is None:
        return None
    push_branch(repo, target, head)
    if mode is PullRequestMode.BRANCH:
        return PullRequestInfo(
            url=target.repository.compare_url(target.base_branch, head),
            head=head,
            base=target.base_branch,
        )
    title = pull_request_title(report.goal)
    body = pull_request_body(report, title, review)
    existing = target.forge.find_open(head)
    if existing is None:
        draft = mode is PullRequestMode.DRAFT or bool(problems(report))
        pull = target.forge.create(
            title=title, body=body, head=head, base=target.base_branch, draft=draft
        )
        return _info(pull, created=True)
    pull = target.forge.update(
        existing.number,
        title=title if title_we_set(existing.body) in (existing.title, None) else None,
        body=merge_body(existing.body, body),
    )
    return _info(pull, created=False)


def _info(pull: ForgePull, *, created: bool) -> PullRequestInfo:
    return PullRequestInfo(
        url=pull.url,
        number=pull.number,
        state=pull.state,
        draft=pull.draft,
        head=pull.head,
        base=pull.base,
        created=created,
    )
