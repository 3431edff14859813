"""``claudecluster clean``: reclaim disk from finished worktrees, never from unfinished work.

A worktree left under ``<claudecluster home>/worktrees`` (kept with ``keep_worktree``, or
left by a killed worker) is removed only when nothing in it is unique: its changes are all
committed (the commits stay on their branch, which ``clean`` never deletes) and no process
is working in it. Everything else is kept, and the report says why.

Persisted results (``<home>/results``) and run journals (``<home>/runs``) older than a
number of days go too (:func:`reclaim_old`): they only serve ``claudecluster resume``.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import git
from pydantic import Field

from claudecluster import gitops
from claudecluster.models import StrictModel


class KeptWorktree(StrictModel):
    """A worktree clean left in place."""

    path: str = Field(description="The worktree.")
    reason: str = Field(description="Why it was kept.")


class CleanReport(StrictModel):
    """What clean removed and what it kept."""

    removed: list[str] = Field(default_factory=list, description="Worktrees removed.")
    kept: list[KeptWorktree] = Field(default_factory=list, description="Worktrees kept.")
    bytes_freed: int = Field(default=0, description="Disk space reclaimed, in bytes.")
    results_removed: int = Field(default=0, description="Persisted result files removed.")
    journals_removed: list[str] = Field(
        default_factory=list, description="Run journals removed (by run id)."
    )


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).lstat().st_size
            except OSError:
                continue
    return total


def _in_use(path: Path) -> bool:
    resolved = path.resolve()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if cwd == resolved or resolved in cwd.parents:
            return True
    return False


def _candidates(root: Path) -> list[Path]:
    # worktrees/<run-id>/<task-id>; anything holding a .git file is a worktree.
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("*/*") if (p / ".git").is_file())


def clean(root: Path, *, dry_run: bool = False) -> CleanReport:
    """Remove finished worktrees under ``root``; keep and explain everything else."""
    report = CleanReport()
    for path in _candidates(root):
        try:
            with git.Repo(path) as worktree:
                dirty = worktree.is_dirty(untracked_files=True)
                common_dir = worktree.common_dir
        except (git.GitError, OSError, ValueError):
            report.kept.append(KeptWorktree(path=str(path), reason="not a readable worktree"))
            continue
        if dirty:
            report.kept.append(
                KeptWorktree(
                    path=str(path), reason="it has uncommitted changes; commit or copy them"
                )
            )
            continue
        if _in_use(path):
            report.kept.append(KeptWorktree(path=str(path), reason="a process is working in it"))
            continue
        size = _size(path)
        if not dry_run:
            with git.Repo(common_dir) as main:
                gitops.remove_worktree(main, path)
            shutil.rmtree(path, ignore_errors=True)
        report.removed.append(str(path))
        report.bytes_freed += size
    if not dry_run:
        for run_dir in root.glob("*") if root.is_dir() else []:
            if run_dir.is_dir() and not any(run_dir.iterdir()):
                run_dir.rmdir()
    return report


def reclaim_old(
    results: Path, runs: Path, *, older_than_days: float, dry_run: bool = False
) -> CleanReport:
    """Remove result files and run journals untouched for ``older_than_days``."""
    report = CleanReport()
    cutoff = time.time() - older_than_days * 86_400
    for path in sorted(results.rglob("*")) if results.is_dir() else []:
        if path.is_file() and path.stat().st_mtime < cutoff:
            report.results_removed += 1
            report.bytes_freed += path.stat().st_size
            if not dry_run:
                path.unlink(missing_ok=True)
    for journal in sorted(runs.iterdir()) if runs.is_dir() else []:
        newest = max((p.stat().st_mtime for p in journal.rglob("*")), default=0.0)
        if journal.is_dir() and newest < cutoff:
            report.journals_removed.append(journal.name)
            report.bytes_freed += _size(journal)
            if not dry_run:
                shutil.rmtree(journal, ignore_errors=True)
    return report
