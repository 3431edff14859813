"""Git operations on the user's repository, done so the user's checkout is never touched.

Every write happens in a separate worktree on a ``claudecluster/...`` branch: the user's
working tree, index and checked-out branch stay exactly as they were, dirty or not. Commits
skip the repository's hooks and signing (an unattended run cannot answer a pinentry prompt)
and ignore build litter such as ``__pycache__`` even when the repo has no ``.gitignore``.

GitPython's exceptions are translated into :class:`~claudecluster.errors.GitError` and
:class:`~claudecluster.errors.RepoError` here, at the one seam that calls git.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import git
from git.exc import GitCommandError, InvalidGitRepositoryError, NoSuchPathError

from claudecluster.errors import GitError, RepoError
from claudecluster.models import FileChange

BRANCH_PREFIX = "claudecluster"
AUTHOR_NAME = "ClaudeCluster"
AUTHOR_EMAIL = "claudecluster@users.noreply.localhost"

# Litter a verify run or a session leaves behind that must never land in a task commit.
_IGNORED_LITTER = "\n".join(
    [
        "__pycache__/",
        "*.py[cod]",
        ".pytest_cache/",
        ".mypy_cache/",
        ".ruff_cache/",
        ".coverage",
        ".claude/settings.local.json",
    ]
)


def task_branch(run_id: str, task_id: str) -> str:
    """The branch a task's work is committed to."""
    return f"{BRANCH_PREFIX}/{run_id}/{task_id}"


def integration_branch(run_id: str) -> str:
    """The branch a run's task branches are merged into.

    Git cannot hold both ``claudecluster/<run>`` and ``claudecluster/<run>/<task>`` (a ref
    cannot be both a file and a directory), so the integration branch sits beside the
    task branches under the run's folder.
    """
    return f"{BRANCH_PREFIX}/{run_id}/integration"


def open_repo(path: str | Path) -> git.Repo:
    """Open a non-bare repository with at least one commit, or raise a RepoError."""
    location = Path(path).expanduser()
    shown = str(path)
    if not location.exists():
        raise RepoError(
            f"repository {shown} does not exist", repo=shown, hint="Pass --repo an existing path."
        )
    try:
        repo = git.Repo(location, search_parent_directories=False)
    except (InvalidGitRepositoryError, NoSuchPathError):
        raise RepoError(
            f"{shown} is not a git repository",
            repo=shown,
            hint="Run `git init` and commit, or pass the repository's root folder.",
        ) from None
    if repo.bare:
        raise RepoError(
            f"{shown} is a bare repository",
            repo=shown,
            hint="Pass a clone with a working tree (git clone the bare repo first).",
        )
    try:
        repo.head.commit  # noqa: B018 - raises when the branch has no commits yet
    except ValueError:
        raise RepoError(
            f"{shown} has no commits",
            repo=shown,
            hint="Commit something first; tasks start from a commit.",
        ) from None
    return repo


def resolve_commit(repo: git.Repo, ref: str | None = None) -> str:
    """The full sha of ``ref`` (default: HEAD)."""
    try:
        return str(repo.commit(ref or "HEAD").hexsha)
    except (git.BadName, ValueError, GitCommandError) as exc:
        raise RepoError(
            f"cannot resolve {ref!r} to a commit",
            repo=str(repo.working_dir),
            hint="Pass a branch, tag or commit sha that exists.",
        ) from exc


def _git(repo: git.Repo, *args: str) -> str:
    try:
        return str(
            repo.git.execute(
                ["git", "-c", "core.quotepath=false", *args], strip_newline_in_stdout=False
            )
        )
    except GitCommandError as exc:
        raise GitError(
            f"git {args[0]} failed: {str(exc.stderr).strip() or exc}",
            command="git " + " ".join(args),
            stderr=str(exc.stderr),
        ) from exc


@dataclass(frozen=True)
class Worktree:
    """A worktree checked out on its own branch."""

    path: Path
    branch: str
    base_commit: str
    archived: str | None = None  # where an earlier attempt's work on the branch was kept


def add_worktree(repo: git.Repo, path: Path, branch: str, base_commit: str) -> Worktree:
    """Create ``branch`` at ``base_commit`` and check it out in a new worktree at ``path``.

    An earlier attempt's leftovers are never lost: uncommitted changes in a worktree still at
    ``path`` (a killed worker's) are committed first, and a branch holding commits is kept
    under ``claudecluster-attempts/...`` (see :func:`archive_branch`) before starting clean.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and (path / ".git").exists():
        with contextlib.suppress(GitError, git.GitError):
            commit_all(path, "Unfinished work of an interrupted attempt")
    archived = None
    with worktree_lock(repo):
        if path.exists():
            _remove_worktree(repo, path)
        if branch_exists(repo, branch):
            if commits_ahead(repo, base_commit, branch):
                archived = _archive_branch(repo, branch)
            else:
                _git(repo, "branch", "-D", branch)
        _git(repo, "worktree", "add", "--quiet", "-b", branch, str(path), base_commit)
    return Worktree(path=path, branch=branch, base_commit=base_commit, archived=archived)


ATTEMPTS_PREFIX = "claudecluster-attempts"


def _archive_branch(repo: git.Repo, branch: str) -> str:
    # Numbered so repeated attempts never overwrite each other; callers hold the lock.
    number = 1
    while branch_exists(repo, attempt_branch(branch, number)):
        number += 1
    archived = attempt_branch(branch, number)
    _git(repo, "branch", "-m", branch, archived)
    return archived


def attempt_branch(branch: str, number: int) -> str:
    """Where attempt ``number``'s unfinished work on ``branch`` is kept."""
    return f"{ATTEMPTS_PREFIX}/{branch}/{number}"


def attempt_branches(repo: git.Repo, branch: str) -> list[str]:
    """The branches keeping earlier attempts' work on ``branch``, oldest first."""
    prefix = f"{ATTEMPTS_PREFIX}/{branch}/"
    names = _git(repo, "for-each-ref", "--format=%(refname:short)", f"refs/heads/{prefix}")
    found = [n for n in names.split() if n.removeprefix(prefix).isdigit()]
    return sorted(found, key=lambda n: int(n.removeprefix(prefix)))


_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


@contextmanager
def worktree_lock(repo: git.Repo) -> Iterator[None]:
    """Serialise worktree and branch bookkeeping on one repository.

    Git (2.39) reads every registered worktree's admin folder while adding or pruning one,
    and fails on one that another process is half-way through creating; parallel workers
    must take turns. A thread lock covers this process, a file lock the other processes.
    """
    common = Path(repo.common_dir).resolve()
    with _thread_locks_guard:
        lock = _thread_locks.setdefault(str(common), threading.Lock())
    with lock, open(common / "claudecluster.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_worktree(repo: git.Repo, path: Path) -> None:
    """Remove a worktree directory and its registration; its branch is kept."""
    with worktree_lock(repo):
        _remove_worktree(repo, path)


def _remove_worktree(repo: git.Repo, path: Path) -> None:
    if path.exists():
        try:
            _git(repo, "worktree", "remove", "--force", "--force", str(path))
        except GitError:
            shutil.rmtree(path, ignore_errors=True)
    _git(repo, "worktree", "prune")


def branch_exists(repo: git.Repo, branch: str) -> bool:
    """True when ``refs/heads/<branch>`` exists."""
    try:
        repo.git.rev_parse("--verify", "--quiet", f"refs/heads/{branch}")
    except GitCommandError:
        return False
    return True


def commits_ahead(repo: git.Repo, base: str, ref: str) -> int:
    """How many commits ``ref`` has that ``base`` does not."""
    return int(_git(repo, "rev-list", "--count", f"{base}..{ref}").strip() or 0)


def delete_branch(repo: git.Repo, branch: str) -> None:
    """Delete a branch that holds no unique work (callers check first)."""
    with worktree_lock(repo):
        _git(repo, "branch", "-D", branch)


@contextmanager
def _litter_excludes(tmp_dir: Path) -> Iterator[Path]:
    exclude = tmp_dir / "claudecluster-excludes"
    exclude.write_text(_IGNORED_LITTER + "\n")
    try:
        yield exclude
    finally:
        exclude.unlink(missing_ok=True)


def commit_all(worktree: Path, message: str) -> str | None:
    """Stage and commit everything the session changed; return the new sha or None.

    The author and committer are ClaudeCluster, so a task's commits are identifiable.
    """
    # Closed afterwards: GitPython keeps helper git processes running in the worktree.
    with git.Repo(worktree) as repo:
        git_dir = Path(repo.git_dir)
        with _litter_excludes(git_dir) as exclude:
            _git(repo, "-c", f"core.excludesFile={exclude}", "add", "--all", ".")
        if not _git(repo, "diff", "--cached", "--name-only").strip():
            return None
        _git(repo, *_identity("commit", "--quiet", "--no-verify", "-m", message))
        return str(repo.head.commit.hexsha)


def snapshot_commit(worktree: Path, message: str, *, allow_empty: bool = False) -> str | None:
    """A commit of the files in ``worktree`` as they are now, on top of its HEAD, made with
    a scratch index: the worktree's own index, branch and files are untouched. None when
    its tree is the same as HEAD's, unless ``allow_empty`` (the message still says something)."""
    with git.Repo(worktree) as repo, tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(scratch) / "index")}

        def run(*args: str) -> str:
            try:
                return str(repo.git.execute(["git", *args], env=env)).strip()
            except GitCommandError as exc:
                raise GitError(
                    f"git {args[0]} failed: {str(exc.stderr).strip() or exc}",
                    command="git " + " ".join(args),
                    stderr=str(exc.stderr),
                ) from exc

        run("read-tree", "HEAD")
        with _litter_excludes(Path(scratch)) as exclude:
            run("-c", f"core.excludesFile={exclude}", "add", "--all", ".")
        tree = run("write-tree")
        if not allow_empty and tree == run("rev-parse", "HEAD^{tree}"):
            return None
        return run(*_identity("commit-tree", tree, "-p", "HEAD", "-m", message))


def diff_stats(repo: git.Repo, base: str, head: str) -> list[FileChange]:
    """Files changed between two commits, with added/removed line counts.

    Renames are reported as a deletion plus an addition, which keeps the line counts honest
    and the parsing trivial.
    """
    kinds = {"A": "added", "M": "modified", "D": "deleted"}
    statuses: dict[str, str] = {}
    for line in _git(repo, "diff", "--no-renames", "--name-status", base, head).splitlines():
        status, _, path = line.partition("\t")
        if path:
            statuses[path] = kinds.get(status[:1], "modified")
    changes: list[FileChange] = []
    for line in _git(repo, "diff", "--no-renames", "--numstat", base, head).splitlines():
        added, removed, path = ([*line.split("\t", 2), "", ""])[:3]
        if not path:
            continue
        changes.append(
            FileChange(
                path=path,
                added=int(added) if added.isdigit() else 0,
                removed=int(removed) if removed.isdigit() else 0,
                change=statuses.get(path, "modified"),
            )
        )
    return changes


def diff_text(repo: git.Repo, base: str, head: str) -> str:
    """The unified diff between two commits."""
    return _git(repo, "diff", "-M", base, head)


def cap_text(text: str, max_bytes: int) -> tuple[str, bool]:
    """Cut ``text`` to about ``max_bytes``, at a line end, saying what was cut."""
    raw = text.encode()
    if len(raw) <= max_bytes:
        return text, False
    kept = raw[:max_bytes].decode(errors="ignore")
    kept = kept[: kept.rfind("\n") + 1] if "\n" in kept else kept
    cut_lines = text.count("\n") - kept.count("\n")
    cut_bytes = len(raw) - len(kept.encode())
    return kept + f"\n[... {cut_lines} more lines ({cut_bytes} bytes) cut ...]\n", True


class MergeConflictError(GitError):
    """Merging a branch conflicted; the merge was aborted and nothing was lost."""

    def __init__(self, branch: str, files: list[str]) -> None:
        super().__init__(
            f"merging {branch} conflicts in {', '.join(files) or 'the tree'}",
            command=f"git merge {branch}",
        )
        self.branch = branch
        self.files = files


def _identity(*args: str) -> tuple[str, ...]:
    return (
        "-c",
        f"user.name={AUTHOR_NAME}",
        "-c",
        f"user.email={AUTHOR_EMAIL}",
        "-c",
        "commit.gpgsign=false",
        *args,
    )


def merge_branch(worktree: git.Repo, branch: str, message: str, *, no_ff: bool = True) -> str:
    """Merge ``branch`` into the worktree's HEAD; abort and raise MergeConflictError on conflict."""
    flags = ["--no-ff"] if no_ff else ["--ff"]
    try:
        _git(worktree, *_identity("merge", "--quiet", "--no-verify", *flags, "-m", message, branch))
    except GitError as exc:
        conflicted = [
            line
            for line in _git(worktree, "diff", "--name-only", "--diff-filter=U").splitlines()
            if line.strip()
        ]
        try:
            _git(worktree, "merge", "--abort")
        except GitError:
            _git(worktree, "reset", "--hard", "--quiet", "HEAD")
        if conflicted:
            raise MergeConflictError(branch, conflicted) from exc
        raise
    return head_commit(worktree)


@contextmanager
def scratch_worktree(repo: git.Repo, root: Path, name: str, commit: str) -> Iterator[git.Repo]:
    """A detached worktree at ``commit`` that is removed afterwards."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with worktree_lock(repo):
        if path.exists():
            _remove_worktree(repo, path)
        _git(repo, "worktree", "add", "--quiet", "--detach", str(path), commit)
    with _opened_until_removed(repo, path) as scratch:
        yield scratch


@contextmanager
def branch_worktree(repo: git.Repo, path: Path, branch: str, commit: str) -> Iterator[git.Repo]:
    """``branch`` created at ``commit`` in a worktree at ``path``, removed afterwards.

    The branch is kept; only the worktree goes.
    """
    add_worktree(repo, path, branch, commit)
    with _opened_until_removed(repo, path) as worktree:
        yield worktree


@contextmanager
def _opened_until_removed(repo: git.Repo, path: Path) -> Iterator[git.Repo]:
    # Closed first: GitPython keeps helper git processes running in the worktree.
    worktree = git.Repo(path)
    try:
        yield worktree
    finally:
        worktree.close()
        remove_worktree(repo, path)


def branch_head(repo: git.Repo, branch: str) -> str | None:
    """The sha ``branch`` points at, or None when there is no such branch."""
    try:
        return str(repo.git.rev_parse("--verify", "--quiet", f"refs/heads/{branch}")).strip()
    except GitCommandError:
        return None


def trailers(repo: git.Repo, commit: str) -> dict[str, str]:
    """The trailers (``Key: value`` lines at the end) of ``commit``'s message."""
    text = _git(repo, "log", "-1", "--format=%(trailers:only,unfold)", commit)
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            found[key.strip()] = value.strip()
    return found


def head_commit(worktree: git.Repo) -> str:
    """The sha of a worktree's HEAD."""
    return str(worktree.head.commit.hexsha)


def combine_branches(
    repo: git.Repo, base: str, branches: list[str], *, root: Path, name: str
) -> str:
    """A commit holding ``base`` plus the work of ``branches``, for a task to start from.

    One branch fast-forwards (no extra commit); several are merged one after another. Raises
    MergeConflictError when they do not combine cleanly.
    """
    if not branches:
        return base
    if len(branches) == 1 and is_ancestor(repo, base, branches[0]):
        return resolve_commit(repo, branches[0])
    with scratch_worktree(repo, root, name, base) as scratch:
        head = base
        for branch in branches:
            head = merge_branch(scratch, branch, f"Combine {branch}", no_ff=False)
        return head


def is_ancestor(repo: git.Repo, ancestor: str, descendant: str) -> bool:
    """True when ``ancestor`` is reachable from ``descendant``."""
    try:
        repo.git.merge_base("--is-ancestor", ancestor, descendant)
    except GitCommandError:
        return False
    return True


CONFLICT_MARKERS = ("<<<<<<< ", ">>>>>>> ")


def start_merge(worktree: git.Repo, branch: str) -> list[str]:
    """Merge ``branch`` without committing, leaving conflicts in place; the conflicted files."""
    # A conflict makes git fail and leave the merge half-done, which is what we want here.
    with contextlib.suppress(GitError):
        _git(
            worktree,
            *_identity("merge", "--quiet", "--no-verify", "--no-ff", "--no-commit", branch),
        )
    return [
        line
        for line in _git(worktree, "diff", "--name-only", "--diff-filter=U").splitlines()
        if line.strip()
    ]


def files_with_markers(worktree: Path, files: list[str]) -> list[str]:
    """Those of ``files`` that still contain conflict markers."""
    left = []
    for name in files:
        path = worktree / name
        if path.is_file():
            text = path.read_text(errors="replace")
            if any(line.startswith(CONFLICT_MARKERS) for line in text.splitlines()):
                left.append(name)
    return left


def finish_merge(worktree: git.Repo, message: str) -> str:
    """Commit a resolved merge (everything staged, litter ignored); the merge commit's sha."""
    git_dir = Path(worktree.git_dir)
    with _litter_excludes(git_dir) as exclude:
        _git(worktree, "-c", f"core.excludesFile={exclude}", "add", "--all", ".")
    _git(worktree, *_identity("commit", "--quiet", "--no-verify", "-m", message))
    return head_commit(worktree)


def fast_forward(worktree: git.Repo, commit: str) -> str:
    """Move the worktree's branch forward to ``commit`` (which must descend from it)."""
    _git(worktree, "merge", "--quiet", "--ff-only", commit)
    return head_commit(worktree)
