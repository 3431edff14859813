"""Merge-conflict resolution: a Claude Code session that reconciles two tasks' changes.

When a task branch conflicts during integration, the branch is merged onto the integration
branch's head in a fresh worktree, conflicts left in place. A resolution session is told
both sides' intent (the task prompts) and the conflicted files, edits them, and must leave no
conflict markers; then the verify command runs there. Only then is the merge committed and
the integration branch moved forward to it. If anything fails, the task branch is kept as
it was and the conflict is reported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import Field

from claudecluster import telemetry
from claudecluster.gitops import files_with_markers
from claudecluster.models import StrictModel, TaskSpec, WorkerSettings
from claudecluster.permissions import permissions_for
from claudecluster.session import SessionHost, SessionRequest
from claudecluster.verify import run_verify

RESOLVER_INSTRUCTIONS = """\
You are the ClaudeCluster merge resolver, an unattended Claude Code session. The current
directory is a git worktree in the middle of a merge: the files listed in the prompt contain
conflict markers (<<<<<<<, =======, >>>>>>>). Edit each of them so the result keeps the
intent of BOTH sides, remove every conflict marker, and change nothing else. Do not run git
commands that commit, abort or reset the merge: ClaudeCluster commits it when you finish."""


class Resolution(StrictModel):
    """How a resolution session went."""

    ok: bool = Field(description="True when the conflict is resolved and verified.")
    reason: str = Field(default="", description="Why the resolution was rejected, if it was.")
    cost_usd: float = Field(default=0.0, description="Cost of the resolution session.")


Resolver = Callable[[Path, list[str], TaskSpec, list[TaskSpec], str | None], Resolution]


def resolution_prompt(task: TaskSpec, others: list[TaskSpec], files: list[str]) -> str:
    """The resolver's prompt: both sides' intent and the conflicted files."""
    lines = [
        f"Resolve the merge conflict in: {', '.join(files)}.",
        "",
        f"Incoming side, task {task.id} ({task.title}):",
        task.prompt.strip(),
        "",
        "Already merged side (the integration branch), changed by:",
    ]
    for other in others or []:
        lines += [f"- task {other.id} ({other.title}): {other.prompt.strip()}"]
    if not others:
        lines.append("- earlier tasks of this run")
    lines += ["", "Keep both intents; remove every conflict marker."]
    return "\n".join(lines)


async def resolve_conflict(
    worktree: Path,
    files: list[str],
    task: TaskSpec,
    others: list[TaskSpec],
    verify: str | None,
    *,
    settings: WorkerSettings,
    host: SessionHost | None = None,
) -> Resolution:
    """Run a resolution session in ``worktree`` and check its work."""
    outcome = await (host or SessionHost()).run(
        SessionRequest(
            prompt=resolution_prompt(task, others, files),
            cwd=worktree,
            settings=settings,
            permissions=permissions_for(
                "safe",
                verify=verify,
                extra_allowed=settings.allowed_tools,
                extra_disallowed=settings.disallowed_tools,
            ),
            system_prompt_append=RESOLVER_INSTRUCTIONS,
            attributes={telemetry.TASK_KIND: "resolve"},
        )
    )
    if not outcome.ok:
        return Resolution(
            ok=False,
            reason=f"the resolution session failed: {outcome.error}",
            cost_usd=outcome.cost_usd,
        )
    left = files_with_markers(worktree, files)
    if left:
        return Resolution(
            ok=False,
            reason=f"conflict markers remain in {', '.join(left)}",
            cost_usd=outcome.cost_usd,
        )
    if verify:
        report = run_verify(verify, worktree, settings.verify_timeout_s)
        if not report.ok:
            return Resolution(
                ok=False,
                reason=f"the resolved merge fails its verify command ({verify})",
                cost_usd=outcome.cost_usd,
            )
    return Resolution(ok=True, cost_usd=outcome.cost_usd)
