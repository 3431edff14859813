"""ClaudeCluster: run many unattended Claude Code sessions as one coding cluster on Prefect.

The public surface is small and pinned by a test:

- models: :class:`TaskSpec`, :class:`WorkerSettings`, :class:`TaskResult`, :class:`TestReport`
- errors: :class:`ClaudeClusterError` and its subclasses (see :mod:`claudecluster.errors`)
- the worker: :func:`execute_task` (one session, one worktree, one commit, one verify)
"""

from claudecluster.errors import (
    ClaudeClusterError,
    ConfigError,
    GitError,
    PlanError,
    RepoError,
    SessionError,
    UsageError,
)
from claudecluster.models import (
    FailureReason,
    FileChange,
    TaskResult,
    TaskSpec,
    TaskStatus,
    TestReport,
    TokenUsage,
    WorkerSettings,
)
from claudecluster.worker import execute_task, new_run_id

__version__ = "0.1.0"

__all__ = [
    "ClaudeClusterError",
    "ConfigError",
    "FailureReason",
    "FileChange",
    "GitError",
    "PlanError",
    "RepoError",
    "SessionError",
    "TaskResult",
    "TaskSpec",
    "TaskStatus",
    "TestReport",
    "TokenUsage",
    "UsageError",
    "WorkerSettings",
    "__version__",
    "execute_task",
    "new_run_id",
]
