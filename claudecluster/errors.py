"""The ClaudeCluster exception hierarchy.

Every error we raise on purpose derives from :class:`ClaudeClusterError`. Each carries
structured fields (what was wrong, what to do about it) so the CLI can print a one-line
message and pick an exit code without string matching::

    ClaudeClusterError
    ├── UsageError                    bad input from the user: exit code 2, nothing changed
    │   ├── RepoError                 the repo is missing, not git, bare, or has no commits
    │   ├── PlanError                 a plan (file or planner output) is invalid
    │   ├── PathEscapeError           a path points outside the repository
    │   ├── ConfigError               settings, keys or pools are missing or contradictory
    │   │   └── UnknownPoolError      a work pool does not exist or has no worker deployment
    │   └── ForgeAccessError          no forge token, a wrong one, or an unknown forge
    ├── GitError                      a git operation we rely on failed
    ├── SessionError                  a Claude Code session could not run at all
    │   └── StartRefusedError         the run stopped starting sessions (its budget is spent)
    ├── SessionAnswerError            a session did not answer in the shape asked for
    │   ├── PlannerError              the planner session produced no usable plan
    │   └── ReviewError               the reviewer session produced no usable review
    ├── ServerError                   the embedded Prefect server could not be started
    └── ForgeError                    the forge refused a request during a run

Foreign exceptions (GitPython's, the SDK's) are translated at the seam that calls them.
"""

from __future__ import annotations


class ClaudeClusterError(Exception):
    """Base class for every error ClaudeCluster raises on purpose."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message and the hint on one line, as the CLI prints it."""
        text = self.message.rstrip(".")
        return f"{text}. {self.hint}" if self.hint else f"{text}."

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only fields would be lost by Exception's default pickling (args only),
        # and errors travel between processes in Prefect's persisted states.
        return (_restore, (type(self), self.message, dict(self.__dict__)))


def _restore(
    cls: type[ClaudeClusterError], message: str, state: dict[str, object]
) -> ClaudeClusterError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class UsageError(ClaudeClusterError):
    """The user's input is wrong; nothing was started or changed."""

    exit_code = 2


class RepoError(UsageError):
    """The repository is missing, not a git repository, bare, or has no commits."""

    def __init__(self, message: str, *, repo: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.repo = repo


class PlanError(UsageError):
    """A plan is invalid: bad file, duplicate ids, unknown dependencies, cycles, bad paths."""

    def __init__(self, message: str, *, source: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.source = source


class PathEscapeError(PlanError):
    """A task path points outside the repository."""

    def __init__(self, message: str, *, path: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = path


class ConfigError(UsageError):
    """Settings, credentials or pools are missing or contradictory."""


class UnknownPoolError(ConfigError):
    """A task names a work pool that does not exist or has no worker deployment."""

    def __init__(self, message: str, *, pool: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.pool = pool


class GitError(ClaudeClusterError):
    """A git operation ClaudeCluster relies on failed."""

    def __init__(self, message: str, *, command: str | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.command = command
        self.stderr = stderr


class SessionError(ClaudeClusterError):
    """A Claude Code session could not be started or crashed outright."""

    def __init__(self, message: str, *, exit_code: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.process_exit_code = exit_code
        self.stderr = stderr


class StartRefusedError(SessionError):
    """The run stopped starting sessions before this one started (its budget is spent)."""

    def __init__(self, message: str, *, failure_reason: str) -> None:
        super().__init__(message)
        self.failure_reason = failure_reason


class SessionAnswerError(ClaudeClusterError):
    """A session that must answer in a given shape (a plan, a review) did not; what it cost."""

    def __init__(
        self, message: str, *, hint: str | None = None, cost_usd: float = 0.0, turns: int = 0
    ) -> None:
        super().__init__(message, hint=hint)
        self.cost_usd = cost_usd
        self.turns = turns


class PlannerError(SessionAnswerError):
    """The planner session returned no plan, or one that does not validate."""


class ReviewError(SessionAnswerError):
    """The reviewer session returned no review, or one that does not validate."""


class ServerError(ClaudeClusterError):
    """The embedded Prefect server could not be started or reached."""


class ForgeError(ClaudeClusterError):
    """A forge (GitHub, Gitea) refused or failed a request during a run."""

    def __init__(
        self, message: str, *, forge: str, status: int | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.forge = forge
        self.status = status


class ForgeAccessError(UsageError):
    """The forge cannot be used as asked: no token, a wrong one, no push access, or an
    address that says nothing of which forge it is. Found before anything starts."""

    def __init__(self, message: str, *, forge: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.forge = forge
