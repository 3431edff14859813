"""Review summaries: a read-only Claude Code session reads a diff with each task's intent.

The reviewer explores the reviewed head in a scratch worktree with Read, Grep and Glob only,
gets the diff and what each task meant to do in its prompt, and answers through structured
output constrained by :class:`Review` (summary, risks, per-file notes with path and line,
missing tests). :func:`review_markdown` renders it as one sticky comment, found again by
:data:`REVIEW_MARKER` and edited in place on every re-run; :func:`line_comments` keeps the
notes whose path and line are in the diff, for one batched review (event ``COMMENT``, never
an approval).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from claudecluster import gitops, telemetry
from claudecluster.errors import ReviewError
from claudecluster.forges import Forge, LineComment
from claudecluster.models import StrictModel, WorkerSettings
from claudecluster.permissions import permissions_for
from claudecluster.planner import inline_refs
from claudecluster.redact import redact
from claudecluster.session import SessionHost, SessionOutcome, SessionRequest

REVIEW_MARKER = "<!-- claudecluster:review -->"
NOTE_MARKER = "<!-- claudecluster:review-note -->"
DIFF_LIMIT = 120_000  # characters of diff put in the reviewer's prompt


class FileNote(StrictModel):
    """One remark on a line of the change."""

    path: str = Field(description="The file, relative to the repository root.")
    line: int | None = Field(
        default=None, description="The line in the new version of the file; null for the file."
    )
    note: str = Field(description="The remark: what is wrong or risky, and what to do.")


class Review(StrictModel):
    """A reviewer's answer."""

    summary: str = Field(
        description="What the change does and whether it does what was "
        "intended, in three to six sentences."
    )
    risks: list[str] = Field(
        description="What could break or be wrong, most serious first; "
        "empty when nothing stands out."
    )
    notes: list[FileNote] = Field(description="Remarks on particular files and lines.")
    missing_tests: list[str] = Field(
        description="Behaviour the change adds or alters that no test checks."
    )


def review_schema() -> dict[str, Any]:
    """The reviewer's StructuredOutput schema, from :class:`Review` (self-contained, every
    property required, nothing else allowed)."""
    schema = inline_refs(Review.model_json_schema())

    def close(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: close(v) for k, v in node.items() if k not in ("title", "default")}
            if node.get("type") == "object" and "properties" in node:
                node["required"] = list(node["properties"])
                node["additionalProperties"] = False
        elif isinstance(node, list):
            node = [close(item) for item in node]
        return node

    closed: dict[str, Any] = close(schema)
    return closed


REVIEWER_INSTRUCTIONS = """\
You are the ClaudeCluster reviewer. You do not change anything. You are given a diff and what
each change meant to do; read the changed files and their surroundings with Read, Grep and
Glob, then answer through the StructuredOutput tool: a short summary, the risks, notes on
particular lines (path relative to the repository root, line in the new version), and the
behaviour no test checks. Be brief and concrete; say nothing when there is nothing to say."""


@dataclass(frozen=True)
class Intent:
    """What one change meant to do (a task of the run, or a pull request's description)."""

    id: str
    title: str
    prompt: str


def review_prompt(goal: str, intents: list[Intent], diff: str) -> str:
    if len(diff) > DIFF_LIMIT:
        diff = diff[:DIFF_LIMIT] + f"\n[... {len(diff) - DIFF_LIMIT} more characters cut]"
    parts = [f"Goal: {goal.strip()}", ""]
    if intents:
        parts.append("The change was made as these tasks:")
        parts += [f"- {i.id}: {i.title}\n  {' '.join(i.prompt.split())[:600]}" for i in intents]
        parts.append("")
    parts += [
        "The diff:",
        "```diff",
        diff,
        "```",
        "",
        "Review it, then answer with the StructuredOutput tool.",
    ]
    return "\n".join(parts)


async def run_review(
    repo_path: str | Path,
    base: str,
    head: str,
    *,
    goal: str,
    intents: list[Intent],
    settings: WorkerSettings,
    worktree_root: Path,
    host: SessionHost | None = None,
) -> tuple[Review, str, SessionOutcome]:
    """Review ``base``..``head``; the review, the diff it read, and its session."""
    host = host or SessionHost()
    repo = gitops.open_repo(repo_path)
    diff = gitops.diff_text(repo, base, head)
    name = f"review-{uuid.uuid4().hex[:8]}"
    with gitops.scratch_worktree(repo, worktree_root, name, head) as scratch:
        outcome = await host.run(
            SessionRequest(
                prompt=review_prompt(goal, intents, diff),
                cwd=Path(scratch.working_dir),
                settings=settings.model_copy(update={"permission_policy": "read-only"}),
                permissions=permissions_for("read-only"),
                system_prompt_append=REVIEWER_INSTRUCTIONS,
                attributes={telemetry.TASK_KIND: "review"},
                output_format={"type": "json_schema", "schema": review_schema()},
            )
        )
    if not outcome.ok:
        raise ReviewError(
            f"the reviewer produced no review: {outcome.error or outcome.failure_reason}",
            hint="Retry the review.",
            cost_usd=outcome.cost_usd,
            turns=outcome.turns,
        )
    try:
        review = Review.model_validate(outcome.structured_output)
    except ValidationError as exc:
        raise ReviewError(
            f"the reviewer's answer is not a review: {exc.errors()[0]['msg']}",
            hint="Retry the review.",
            cost_usd=outcome.cost_usd,
            turns=outcome.turns,
        ) from None
    return review, diff, outcome


_HUNK = re.compile(r"^@@ -\d+(?:,\d+)? \+(\d+)(?:,(\d+))? @@")


def commentable_lines(diff: str) -> dict[str, set[int]]:
    """The lines of each file's new version a review comment may point at: added or
    context lines inside the diff's hunks."""
    lines: dict[str, set[int]] = {}
    path: str | None = None
    number = 0
    for row in diff.splitlines():
        if row.startswith("+++ "):
            target = row[4:].strip()
            path = None if target == "/dev/null" else target.removeprefix("b/")
            continue
        if row.startswith(("--- ", "diff --git", "index ")):
            continue
        hunk = _HUNK.match(row)
        if hunk:
            number = int(hunk.group(1))
            continue
        if path is None or not row or row[0] not in " +-":
            continue
        if row[0] in " +":
            lines.setdefault(path, set()).add(number)
            number += 1
    return lines


def line_comments(review: Review, diff: str) -> list[LineComment]:
    """The review's notes that point at a line in the diff, as line comments."""
    valid = commentable_lines(diff)
    return [
        LineComment(n.path, n.line, f"{redact(n.note)}\n\n{NOTE_MARKER}")
        for n in review.notes
        if n.line is not None and n.line in valid.get(n.path, set())
    ]


def review_prose(review: Review) -> str:
    """The review's summary and risks, for the pull request body's folded section."""
    lines = [review.summary.strip()]
    if review.risks:
        lines += ["", "Risks:"] + [f"- {risk}" for risk in review.risks]
    return redact("\n".join(lines))


def review_markdown(review: Review, *, subject: str, cost_usd: float | None = None) -> str:
    """The sticky review comment: summary first, the rest folded."""
    lines = [
        REVIEW_MARKER,
        f"### ClaudeCluster review of {subject}",
        "",
        review.summary.strip(),
        "",
    ]
    if review.risks:
        lines += ["**Risks**", ""] + [f"- {risk}" for risk in review.risks] + [""]
    details: list[str] = []
    if review.notes:
        details += ["**Notes**", ""]
        details += [f"- `{n.path}{f':{n.line}' if n.line else ''}`: {n.note}" for n in review.notes]
        details.append("")
    if review.missing_tests:
        details += ["**Not tested**", ""] + [f"- {t}" for t in review.missing_tests] + [""]
    if details:
        count = len(review.notes) + len(review.missing_tests)
        lines += [f"<details><summary>{count} notes</summary>", "", *details, "</details>", ""]
    if cost_usd is not None:
        lines.append(
            f"<sub>Read-only review session, ${cost_usd:.4f}. Edited in place on "
            "every re-run.</sub>"
        )
    return redact("\n".join(lines))


def post_review(
    forge: Forge, number: int, review: Review, markdown: str, diff: str, *, lines: bool
) -> tuple[str, int]:
    """Post ``review`` on pull request ``number``: ``markdown`` as the sticky comment (edited in
    place when it is there), and with ``lines`` its notes on lines of ``diff`` as one review
    (event COMMENT), leaving out notes already there, so a re-run adds no duplicates. The
    comment's URL and how many line comments were posted."""
    url = forge.upsert_comment(number, REVIEW_MARKER, markdown)
    if not lines:
        return url, 0
    posted = {(c.path, c.line, c.body) for c in forge.line_comments(number)}
    fresh = [c for c in line_comments(review, diff) if (c.path, c.line, c.body) not in posted]
    if fresh:
        forge.create_review(number, f"{len(fresh)} notes from the ClaudeCluster review.", fresh)
    return url, len(fresh)
