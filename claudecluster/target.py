"""The repository a run works on, resolved once: a path or a git URL, and the base commit.

:func:`open_target` is the one place a location becomes an opened repository: a local path
is opened as it is (never changed: every write happens in worktrees), a git URL is cloned
once under ``clones_root`` and fetched afterwards. Blocks are resolved to a location by the
Prefect layer (:func:`claudecluster.blocks.repository.resolve_target`) and end up here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import git

from claudecluster import gitops, remote
from claudecluster.workspace import default_worktree_root


@dataclass(frozen=True)
class Target:
    """An opened repository (a local clone for a URL), its base commit and git environment."""

    repo: git.Repo
    base_commit: str
    url: str | None = None
    git_env: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def root(self) -> Path:
        """The working directory of the repository (of the local clone for a URL)."""
        return Path(self.repo.working_dir)

    @property
    def location(self) -> str:
        """What the user named: the URL, or the repository's path."""
        return self.url or str(self.root)


def open_target(
    location: str | Path,
    *,
    base: str | None = None,
    git_env: Mapping[str, str] | None = None,
    clones_root: Path | None = None,
) -> Target:
    """Open ``location`` (a path, or a git URL cloned under ``clones_root``) at ``base``.

    Raises RepoError for a missing, bare, empty or non-git repository, a URL that cannot
    be cloned, or a ``base`` that names no commit.
    """
    env = dict(git_env or {})
    url = str(location) if remote.is_remote(location) else None
    if url is not None:
        clones = clones_root or default_worktree_root() / "clones"
        repo = remote.cache_clone(url, clones, env=env)
    else:
        repo = gitops.open_repo(location)
    return Target(repo=repo, base_commit=gitops.resolve_commit(repo, base), url=url, git_env=env)
