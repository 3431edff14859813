"""The data ClaudeCluster passes around: task specs, units of work, results and reports.

These models are the public contract between the CLI, the Prefect flows and tasks, and
anything that reads a ``--json`` report. Every field is described, so the JSON schema
(``TaskResult.model_json_schema()``) documents itself.

:class:`WorkUnit` is the one model a task travels in, from the dispatcher through the
Prefect task (or the worker flow on a pool) to the worker: a new per-task field is added
there and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TASK_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
"""Task ids double as branch and artifact-key parts, so they follow Prefect's artifact rule."""

PermissionPolicy = Literal["safe", "read-only", "container"]


class StrictModel(BaseModel):
    """Base of ClaudeCluster's models: unknown fields are an error, not silently dropped."""

    # A field with a default is always present in what a model writes, so the JSON Schema of
    # its output (the TypeScript SDK's types of a report) marks it required.
    model_config = ConfigDict(
        extra="forbid", frozen=False, json_schema_serialization_defaults_required=True
    )


class TaskKind(StrEnum):
    """What sort of work a task is (the seed's task kinds, plus ``other``)."""

    SCAFFOLD = "scaffold"
    REFACTOR = "refactor"
    TEST = "test"
    DOCS = "docs"
    OTHER = "other"


class TaskSpec(StrictModel):
    """One well-scoped unit of work, run as one unattended Claude Code session."""

    id: Annotated[str, Field(pattern=TASK_ID_PATTERN)] = Field(
        description="Unique id within the plan: lowercase letters, digits and dashes."
    )
    kind: TaskKind = Field(
        default=TaskKind.OTHER,
        description="What sort of work this is: scaffold, refactor, test, docs or other.",
    )
    title: str = Field(min_length=1, description="A one-line title, used in commits and reports.")
    prompt: str = Field(
        min_length=1,
        description="The instructions given to Claude Code: self-contained, since the session "
        "sees nothing else.",
    )
    paths: list[str] = Field(
        default_factory=list,
        description="Repo-relative paths (files, folders or globs) the task expects to touch. "
        "Tasks with overlapping paths never run at the same time.",
    )
    depends_on: list[str] = Field(
        default_factory=list, description="Ids of tasks whose merged work this task builds on."
    )
    pool: str | None = Field(
        default=None, description="Work pool to run on; None means the plan's or run's default."
    )
    verify: str | None = Field(
        default=None,
        description="Shell command run in the worktree after the session; overrides the plan's.",
    )

    @field_validator("depends_on")
    @classmethod
    def _unique_dependencies(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class WorkerSettings(StrictModel):
    """How a Claude Code session is run: model, permissions and the limits that stop it."""

    model: str | None = Field(
        default=None, description="Model name passed to Claude Code; None uses the CLI default."
    )
    fallback_model: str | None = Field(
        default=None, description="Model Claude Code switches to when the main one is overloaded."
    )
    permission_policy: PermissionPolicy = Field(
        default="safe",
        description="'safe': only allow-listed tools, edits inside the worktree, a narrow set "
        "of shell commands; 'read-only': Read/Grep/Glob only; 'container': bypassPermissions, "
        "refused unless running inside a disposable container.",
    )
    allowed_tools: list[str] = Field(
        default_factory=list,
        description="Extra permission rules to allow, in Claude Code syntax, e.g. 'Bash(make:*)'.",
    )
    disallowed_tools: list[str] = Field(
        default_factory=list, description="Permission rules to deny; these win over allowed ones."
    )
    max_turns: int = Field(default=40, ge=1, description="Stop the session after this many turns.")
    max_budget_usd: float | None = Field(
        default=2.0,
        gt=0,
        description="Stop the session once it has spent this much (checked after each turn).",
    )
    timeout_s: float = Field(
        default=1800.0, gt=0, description="Wall-clock limit for the session, in seconds."
    )
    verify_timeout_s: float = Field(
        default=900.0, gt=0, description="Wall-clock limit for the verify command, in seconds."
    )
    resolve_conflicts: bool = Field(
        default=True,
        description="Give a conflicting task branch a resolution session at integration.",
    )
    retries: int = Field(
        default=1,
        ge=0,
        description="Times a crashed session (or one that lost the API) is retried, from a "
        "clean worktree.",
    )
    retry_delay_s: float = Field(
        default=10.0, ge=0, description="Seconds to wait before such a retry."
    )
    setting_sources: list[Literal["user", "project", "local"]] = Field(
        default_factory=list,
        description="Claude Code settings files to load; empty means none (no user hooks leak in).",
    )


class TaskStatus(StrEnum):
    """How a task ended."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    NO_CHANGES = "no_changes"
    ERROR = "error"
    SKIPPED = "skipped"

    @property
    def ok(self) -> bool:
        """True for a task that finished its work: succeeded, or found nothing to change."""
        return self in (TaskStatus.SUCCEEDED, TaskStatus.NO_CHANGES)


class FailureReason(StrEnum):
    """Why a task did not succeed; each limit has its own reason."""

    MAX_TURNS = "max_turns"
    BUDGET = "budget"
    TIMEOUT = "timeout"
    VERIFY_FAILED = "verify_failed"
    VERIFY_TIMEOUT = "verify_timeout"
    API_ERROR = "api_error"
    SESSION_ERROR = "session_error"
    DEPENDENCY_FAILED = "dependency_failed"
    GOAL_BUDGET = "goal_budget"  # never started (skipped), or stopped at a turn (failed)
    RUN_STOPPED = "run_stopped"  # the driver stopped (an error) before this task's session began
    GIT_ERROR = "git_error"
    API_UNREACHABLE = "api_unreachable"  # the model API did not answer at all
    SERVER_LOST = "server_lost"  # the Prefect server stopped answering; resume finishes it
    RESULT_STORAGE = "result_storage"  # a pool's worker cannot write its result storage
    WORKER_LOST = "worker_lost"  # its worker machine died too often (claudecluster.lost_workers)


class FileChange(StrictModel):
    """One file changed by a task, with line counts."""

    path: str = Field(description="Repo-relative path of the file after the change.")
    added: int = Field(ge=0, description="Lines added (0 for binary files).")
    removed: int = Field(ge=0, description="Lines removed (0 for binary files).")
    change: Literal["added", "modified", "deleted", "renamed"] = Field(
        default="modified", description="What happened to the file."
    )


class TestReport(StrictModel):
    """The outcome of a verify command."""

    __test__ = False  # not a pytest test class

    command: str = Field(description="The shell command that was run.")
    exit_code: int | None = Field(description="Its exit code; None when it was killed.")
    passed: int | None = Field(default=None, description="Tests passed (pytest output only).")
    failed: int | None = Field(default=None, description="Tests failed or errored (pytest only).")
    skipped: int | None = Field(default=None, description="Tests skipped (pytest output only).")
    duration_s: float = Field(default=0.0, description="Wall-clock time of the command.")
    timed_out: bool = Field(default=False, description="True when killed at the verify timeout.")
    output_tail: str = Field(default="", description="The last lines of combined stdout/stderr.")

    @property
    def ok(self) -> bool:
        """True when the command exited 0 within its time limit."""
        return self.exit_code == 0 and not self.timed_out


class TokenUsage(StrictModel):
    """Tokens a session used, as reported by Claude Code."""

    input_tokens: int = Field(default=0, description="Uncached input tokens.")
    output_tokens: int = Field(default=0, description="Output tokens.")
    cache_creation_input_tokens: int = Field(default=0, description="Tokens written to the cache.")
    cache_read_input_tokens: int = Field(default=0, description="Tokens read from the cache.")

    @property
    def total(self) -> int:
        """All tokens, cached or not."""
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_creation_input_tokens
            + self.cache_read_input_tokens
        )

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cache_creation_input_tokens=self.cache_creation_input_tokens
            + other.cache_creation_input_tokens,
            cache_read_input_tokens=self.cache_read_input_tokens + other.cache_read_input_tokens,
        )


class DeniedTool(StrictModel):
    """A tool call the permission policy refused."""

    tool_name: str = Field(description="The tool Claude tried to use.")
    tool_input: dict[str, object] = Field(
        default_factory=dict, description="The input it was called with (secrets redacted)."
    )


class Attempt(StrictModel):
    """One try at a task: a session, or a process that died while it ran one."""

    number: int = Field(ge=1, description="1 for the first try, 2 for its first retry, ...")
    outcome: Literal["running", "finished", "stopped", "failed", "interrupted"] = Field(
        description="running (now, or when its process died and nobody saw it end), finished "
        "(the session completed), stopped (a limit stopped it), failed (crashed or never got "
        "to its session), interrupted (its process died mid-session)."
    )
    failure_reason: FailureReason | None = Field(
        default=None, description="Why it did not finish, when it did not."
    )
    turns: int = Field(default=0, description="Turns its session took (as far as seen).")
    cost_usd: float = Field(
        default=0.0,
        description="What it cost: Claude Code's own figure when the session ended, else "
        "the list price of the usage seen so far.",
    )
    session_id: str | None = Field(default=None, description="Claude Code session id.")
    branch: str | None = Field(
        default=None,
        description="Where work it left unfinished is kept (claudecluster-attempts/...).",
    )
    started_at: datetime = Field(description="When the attempt started (UTC).")


class TaskResult(StrictModel):
    """Everything a worker produced for one task."""

    id: str = Field(description="The task id.")
    title: str = Field(default="", description="The task title.")
    kind: TaskKind = Field(default=TaskKind.OTHER, description="The task kind.")
    status: TaskStatus = Field(description="How the task ended.")
    failure_reason: FailureReason | None = Field(
        default=None, description="Machine-readable reason when status is not succeeded."
    )
    error: str | None = Field(
        default=None, description="What went wrong, in words a person can act on."
    )
    branch: str | None = Field(default=None, description="The task branch holding its commit.")
    base_commit: str = Field(description="The commit the task started from.")
    head_commit: str | None = Field(
        default=None, description="The task branch's head; equals base_commit when nothing changed."
    )
    files: list[FileChange] = Field(default_factory=list, description="Files the task changed.")
    diff: str = Field(default="", description="Unified diff of the task's commit (may be capped).")
    diff_truncated: bool = Field(default=False, description="True when the diff was capped.")
    test_report: TestReport | None = Field(
        default=None, description="The verify command's outcome, if one ran."
    )
    session_id: str | None = Field(default=None, description="Claude Code session id.")
    run_url: str | None = Field(
        default=None, description="The task's run (task run or worker flow run) in Prefect's UI."
    )
    turns: int = Field(default=0, description="Conversation turns the session took.")
    cost_usd: float = Field(default=0.0, description="Cost reported by Claude Code, in USD.")
    usage: TokenUsage = Field(default_factory=TokenUsage, description="Token usage.")
    duration_s: float = Field(default=0.0, description="Wall-clock time of the whole task.")
    permission_denials: list[DeniedTool] = Field(
        default_factory=list, description="Tool calls the permission policy refused."
    )
    api_retries: int = Field(
        default=0, description="API calls retried after 429/529 answers during the session."
    )
    model_fallbacks: int = Field(
        default=0, description="Times the session switched to the fallback model."
    )
    worktree: str | None = Field(
        default=None, description="Path of the worktree the task ran in, if it still exists."
    )
    cached: bool = Field(
        default=False,
        description="True when this result was reused from an earlier attempt of the run "
        "(resume): nothing ran and nothing was paid again.",
    )
    attempts: list[Attempt] = Field(
        default_factory=list,
        description="Every try at the task, retries and killed ones included; cost_usd is "
        "their sum.",
    )

    @classmethod
    def not_done(
        cls,
        spec: TaskSpec,
        base_commit: str,
        *,
        status: TaskStatus,
        reason: FailureReason,
        error: str,
    ) -> TaskResult:
        """The result of a task that never got to its work (skipped, or lost to a crash)."""
        return cls(
            id=spec.id,
            title=spec.title,
            kind=spec.kind,
            status=status,
            failure_reason=reason,
            error=error[:2000],
            base_commit=base_commit,
        )

    @property
    def added(self) -> int:
        """Lines added across all files."""
        return sum(f.added for f in self.files)

    @property
    def removed(self) -> int:
        """Lines removed across all files."""
        return sum(f.removed for f in self.files)


class UnmergedTask(StrictModel):
    """A task whose branch was kept but not merged into the integration branch."""

    id: str = Field(description="The task id.")
    branch: str | None = Field(default=None, description="The task branch, kept intact.")
    reason: str = Field(description="Why it was not merged, in words a person can act on.")
    conflicting_files: list[str] = Field(
        default_factory=list, description="Files that conflicted, when the merge conflicted."
    )


class RunTotals(StrictModel):
    """Totals over every task of a run."""

    cost_usd: float = Field(default=0.0, description="Cost of every session, planner included.")
    usage: TokenUsage = Field(default_factory=TokenUsage, description="Tokens of every session.")
    tokens: int = Field(default=0, description="All tokens, cached or not.")
    duration_s: float = Field(default=0.0, description="Wall-clock time of the whole run.")
    turns: int = Field(default=0, description="Turns of every session.")
    api_retries: int = Field(
        default=0, description="API calls retried after 429/529 answers, over all sessions."
    )
    files_changed: int = Field(default=0, description="Distinct files changed by merged tasks.")
    added: int = Field(default=0, description="Lines added by all tasks.")
    removed: int = Field(default=0, description="Lines removed by all tasks.")


class BudgetSummary(StrictModel):
    """What a goal budget allowed and what became of it."""

    budget_usd: float = Field(description="The goal's budget.")
    spent_usd: float = Field(description="What the run spent, planner and every attempt included.")
    stopped: list[str] = Field(
        default_factory=list,
        description="Tasks whose sessions were stopped at a turn once the budget was spent "
        "(their work is committed and kept on their branches, not merged).",
    )
    not_started: list[str] = Field(
        default_factory=list, description="Tasks that never started because of the budget."
    )


class RunStatus(StrEnum):
    """How a whole run ended."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"


class PullRequestMode(StrEnum):
    """What a run does with its integration branch on the repository's forge."""

    OFF = "off"  # keep the branch local (the default)
    BRANCH = "branch"  # push it and print the compare URL; open nothing
    DRAFT = "draft"  # push it and open (or update) a draft pull request
    READY = "ready"  # push it and open (or update) a pull request ready for review


class ReviewMode(StrEnum):
    """Whether a run's pull request gets a review from a read-only reviewer session."""

    NONE = "none"  # no review
    SUMMARY = "summary"  # one sticky comment, edited in place on every re-run (the default)
    LINES = "lines"  # the sticky comment and one batched review with line comments


class PullRequestOptions(StrictModel):
    """What a run does with its integration branch on the forge, resolved from the
    parameters over the settings block over the defaults."""

    mode: PullRequestMode = Field(
        default=PullRequestMode.OFF, description="off, branch (push only), draft or ready."
    )
    review: ReviewMode = Field(
        default=ReviewMode.SUMMARY, description="The review posted on the pull request."
    )
    remote: str = Field(
        default="origin",
        description="The git remote of a local repository that the pull request goes to.",
    )
    forge_api_url: str | None = Field(
        default=None,
        description="The forge's API base URL; None means api.github.com for github.com "
        "remotes (https://HOST/api/v3 is GitHub Enterprise, https://HOST/api/v1 Gitea).",
    )

    @property
    def wanted(self) -> bool:
        return self.mode is not PullRequestMode.OFF


class PullRequestInfo(StrictModel):
    """A pull request a run opened or updated (or, in ``branch`` mode, the pushed branch)."""

    url: str = Field(description="The pull request's page (the compare page in branch mode).")
    number: int | None = Field(default=None, description="Its number; None in branch mode.")
    state: str = Field(default="open", description="open, closed or merged, as the forge says.")
    draft: bool = Field(default=False, description="True for a draft pull request.")
    head: str = Field(description="The pushed branch the pull request is from.")
    base: str = Field(description="The branch it asks to merge into.")
    created: bool = Field(
        default=False, description="True when this run opened it; False when it updated one."
    )
    review_url: str | None = Field(
        default=None, description="The review summary comment, when a review was posted."
    )


class RunReport(StrictModel):
    """The outcome of one goal: what was planned, done, merged and verified."""

    run_id: str = Field(description="The run id; branches are named after it.")
    goal: str = Field(description="The goal as given.")
    status: RunStatus = Field(
        description="succeeded only if every task succeeded, all merged and final verify passed."
    )
    repo: str = Field(description="The repository the run worked on.")
    base_commit: str = Field(description="The commit every task started from.")
    integration_branch: str | None = Field(
        default=None, description="The branch holding the merged work."
    )
    head_commit: str | None = Field(default=None, description="Head of the integration branch.")
    final_verify: TestReport | None = Field(
        default=None, description="The verify command on the integration branch, if any ran."
    )
    tasks: list[TaskResult] = Field(default_factory=list, description="One result per task.")
    unmerged: list[UnmergedTask] = Field(
        default_factory=list, description="Tasks whose branches were kept but not merged."
    )
    resolved: list[str] = Field(
        default_factory=list,
        description="Tasks whose merge conflict a resolution session resolved and verified.",
    )
    planner: TaskResult | None = Field(
        default=None, description="The planner session's cost and usage, when the LLM planned."
    )
    totals: RunTotals = Field(default_factory=RunTotals, description="Totals over all tasks.")
    flow_run_id: str | None = Field(default=None, description="The Prefect flow run id.")
    ui_url: str | None = Field(default=None, description="Link to the run in the Prefect UI.")
    error: str | None = Field(default=None, description="Why the run failed as a whole, if so.")
    budget: BudgetSummary | None = Field(
        default=None, description="The goal budget's account, when the run had one."
    )
    interrupted: bool = Field(
        default=False,
        description="True when the run stopped early (its Prefect server was lost): "
        "`claudecluster resume RUN_ID` finishes it without paying for finished work again.",
    )
    pull_request: PullRequestInfo | None = Field(
        default=None, description="The pull request the run opened or updated, if asked to."
    )
    trace_id: str | None = Field(
        default=None,
        description="The run's OpenTelemetry trace id, when telemetry is on (see README).",
    )
    trace_url: str | None = Field(
        default=None, description="The trace's page, from CLAUDECLUSTER_TRACE_URL's template."
    )


EventKind = Literal["planning", "planned", "started", "finished", "integrating", "done"]


class ProgressEvent(StrictModel):
    """A snapshot of a run's progress, sent on every change (a Prefect event's payload)."""

    run_id: str = Field(description="The run.")
    kind: EventKind = Field(description="What just happened.")
    total: int = Field(default=0, description="Tasks in the plan.")
    planned: list[str] = Field(
        default_factory=list, description="The plan's task ids, in the plan's order."
    )
    done: list[str] = Field(default_factory=list, description="Tasks that finished.")
    running: list[str] = Field(default_factory=list, description="Tasks running now.")
    failed: list[str] = Field(default_factory=list, description="Tasks that did not succeed.")
    cost_usd: float = Field(default=0.0, description="Cost of the finished sessions so far.")
    task: TaskResult | None = Field(default=None, description="The task that just finished.")
    message: str = Field(default="", description="A line for humans.")


class Dependency(StrictModel):
    """A finished task another task builds on: where its work is."""

    id: str = Field(description="The dependency's task id.")
    branch: str | None = Field(
        default=None, description="Its task branch; None when it changed nothing."
    )
    head_commit: str | None = Field(default=None, description="Its branch's head commit.")

    @classmethod
    def of(cls, result: TaskResult) -> Dependency:
        """The dependency a finished task's result describes."""
        return cls(id=result.id, branch=result.branch, head_commit=result.head_commit)


class WorkUnit(StrictModel):
    """One task to run, with everything its worker needs.

    The dispatcher builds it; it travels as the one parameter of the worker task (local
    runs) or of the worker flow (work pools) to :func:`claudecluster.worker.execute_task`.
    Secrets never travel in it: blocks are named, and loaded where the session runs.
    """

    run_id: str = Field(description="The run the task belongs to; branches are named after it.")
    spec: TaskSpec = Field(description="The task.")
    repo: str = Field(
        description="The repository: a path on the worker's machine, or a git URL to clone "
        "(the task branch is then pushed back)."
    )
    base_commit: str = Field(description="The commit the run started from.")
    verify: str | None = Field(
        default=None,
        description="The run's verify command; the task's own (spec.verify) wins over it.",
    )
    dependencies: list[Dependency] = Field(
        default_factory=list,
        description="Finished tasks this one depends on; it starts from the base commit plus "
        "their work.",
    )
    settings: WorkerSettings = Field(
        default_factory=WorkerSettings, description="How the session runs and what stops it."
    )
    settings_block: str | None = Field(
        default=None,
        description="ClaudeCodeSettings block whose credentials the session gets (loaded by "
        "the worker, so they never travel).",
    )
    repo_block: str | None = Field(
        default=None,
        description="TargetRepository block with git credentials for a repository URL.",
    )
    worktree_root: str | None = Field(
        default=None,
        description="Where worktrees go on the worker's machine; None means "
        "<claudecluster home>/worktrees.",
    )
    artifact_scope: str | None = Field(
        default=None,
        description="The stable first part of the task's artifact keys (see "
        "claudecluster.naming); None means the run id.",
    )
    pool: str = Field(
        default="local",
        description="The work pool the task runs on ('local': in the goal's flow run).",
    )
    publish_artifacts: bool = Field(
        default=True,
        description="Whether the worker publishes the task's diff and test report; the "
        "driver does it for tasks it sends to work pools, so every task's show on the goal's "
        "run.",
    )

    def fingerprint(self) -> str:
        """What makes two units the same work: spec, settings, verify and starting point.

        Prefect's cache key and the run journal both use it, so a resumed run reuses a
        finished task only when nothing about it changed.
        """
        identity = {
            "base": self.base_commit,
            "dependencies": [dep.head_commit for dep in self.dependencies],
            "spec": self.spec.model_dump(mode="json"),
            "settings": self.settings.model_dump(mode="json", exclude={"retries", "retry_delay_s"}),
            "verify": self.verify_command,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]

    @property
    def verify_command(self) -> str | None:
        """The command that checks this task's work: its own, else the run's."""
        return self.spec.verify or self.verify

    @property
    def dependency_branches(self) -> list[str]:
        """Branches holding the dependencies' work (those that changed something)."""
        return [dep.branch for dep in self.dependencies if dep.branch]
