"""Where a run's things live on this machine: the ClaudeCluster home, worktrees, run ids.

``$CLAUDECLUSTER_HOME`` (default ``~/.claudecluster``) holds everything ClaudeCluster keeps:
the embedded Prefect server's data and log, worktrees under ``worktrees/<run-id>/``, clones
of remote repositories under ``worktrees/clones/``, run journals under ``runs/<run-id>/``
and Prefect's persisted results under ``results/`` (unless you configure result storage).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path

from claudecluster.errors import ConfigError

HOME_ENV = "CLAUDECLUSTER_HOME"


def home_path(home: Path | None = None) -> Path:
    """``home``, else ``$CLAUDECLUSTER_HOME``, else ``~/.claudecluster`` (absolute, not created)."""
    if home is None:
        raw = os.environ.get(HOME_ENV, "").strip()
        home = Path(raw) if raw else Path.home() / ".claudecluster"
    # Servers and workers run with other working directories: never depend on ours.
    return home.expanduser().absolute()


def claudecluster_home(home: Path | None = None) -> Path:
    """The ClaudeCluster home, created (mode 0700) if missing."""
    path = home_path(home)
    try:
        # 0o700: the server's database holds every flow's parameters and logs.
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError as exc:
        raise ConfigError(
            f"ClaudeCluster home {path} exists but is not a directory",
            hint=f"Point {HOME_ENV} at a directory.",
        ) from exc
    except OSError as exc:
        raise ConfigError(
            f"Cannot create the ClaudeCluster home {path}: {exc.strerror or exc}",
            hint=f"Set {HOME_ENV} to a writable directory.",
        ) from exc
    return path


_WORKTREE_ROOT: ContextVar[Path | None] = ContextVar("claudecluster_worktree_root", default=None)


@contextmanager
def worktrees_in(root: Path | None) -> Iterator[None]:
    """Put this context's worktrees under ``root`` (None: the default) while the block runs.

    For a caller of the Python API that wants a run's worktrees elsewhere (tests keep them
    in a temporary folder); the run's tasks, in threads copied from this context, see it.
    """
    token = _WORKTREE_ROOT.set(root)
    try:
        yield
    finally:
        _WORKTREE_ROOT.reset(token)


def default_worktree_root() -> Path:
    """Where worktrees live: ``<claudecluster home>/worktrees`` (or :func:`worktrees_in`)."""
    return _WORKTREE_ROOT.get() or claudecluster_home() / "worktrees"


def results_root() -> Path:
    """Where Prefect persists results (unless the user configured result storage)."""
    return claudecluster_home() / "results"


def new_run_id() -> str:
    """A sortable, branch- and artifact-key-safe run id, e.g. ``20261125-093012-7f3a``."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
