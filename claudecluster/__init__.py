"""ClaudeCluster: run many unattended Claude Code sessions as one coding cluster on Prefect.

The public surface is small and pinned by a test:

- models: :class:`TaskSpec`, :class:`WorkUnit`, :class:`WorkerSettings`, :class:`TaskResult`,
  :class:`TestReport` (all in :mod:`claudecluster.models`)
- errors: :class:`ClaudeClusterError` and its subclasses (see :mod:`claudecluster.errors`)
- the driver: :func:`run_goal` (plan, run workers, merge, verify, report) and its
  :class:`RunReport`, :class:`Plan`
- the worker: :func:`execute_task` (one session, one worktree, one commit, one verify)

Beyond this package's names, the public modules are :mod:`claudecluster.models`,
:mod:`claudecluster.errors`, :mod:`claudecluster.plan`, :mod:`claudecluster.testing` (the
scripted model server), :mod:`claudecluster.blocks` and :mod:`claudecluster.flows` (what
deployments name). Every other module is internal and may change without notice; the
layers they form are drawn in the README's Development section.
"""

from claudecluster.api import run_goal
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
    RunReport,
    TaskResult,
    TaskSpec,
    TaskStatus,
    TestReport,
    TokenUsage,
    WorkerSettings,
    WorkUnit,
)
from claudecluster.plan import Plan, load_plan_file
from claudecluster.worker import execute_task
from claudecluster.workspace import new_run_id

__version__ = "0.1.0"

__all__ = [
    "ClaudeClusterError",
    "ConfigError",
    "FailureReason",
    "FileChange",
    "GitError",
    "Plan",
    "PlanError",
    "RepoError",
    "RunReport",
    "SessionError",
    "TaskResult",
    "TaskSpec",
    "TaskStatus",
    "TestReport",
    "TokenUsage",
    "UsageError",
    "WorkUnit",
    "WorkerSettings",
    "__version__",
    "execute_task",
    "load_plan_file",
    "new_run_id",
    "run_goal",
]
