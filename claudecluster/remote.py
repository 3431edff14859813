"""Repositories reached over git: clones for workers that share no disk with the driver.

A goal's repository may be a URL (https, ssh, git://, or anything git can fetch). Workers in
containers clone it, work in their own worktree, and push their task branch back; the
driver fetches the task branches and integrates as before, then pushes the integration
branch. For a local repository used with container pools, the driver serves it for the run
with ``git daemon`` on loopback (:class:`ServedRepository`), push included.

Credentials for https URLs come from a TargetRepository block and reach git through its
environment (``GIT_CONFIG_*`` with an ``http.extraHeader``), never through the URL, a log
line, the Prefect database or an image.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import git
from git.exc import GitCommandError

from claudecluster.errors import GitError, RepoError
from claudecluster.redact import redact

_URL_PREFIXES = ("http://", "https://", "ssh://", "git://", "file://", "git@")


def is_remote(location: str | Path) -> bool:
    """True when ``location`` is a git URL rather than a local path."""
    return str(location).startswith(_URL_PREFIXES)


def credential_env(username: str | None, secret: str | None) -> dict[str, str]:
    """Environment that makes git send basic-auth credentials to https remotes."""
    if not secret:
        return {}
    token = base64.b64encode(f"{username or 'x-access-token'}:{secret}".encode()).decode()
    return {
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "http.extraHeader",
        "GIT_CONFIG_VALUE_0": f"Authorization: Basic {token}",
        "GIT_TERMINAL_PROMPT": "0",
    }


def _run_git(args: list[str], cwd: Path | None, env: dict[str, str] | None) -> str:
    full_env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", **(env or {})}
    proc = subprocess.run(
        ["git", *args], cwd=cwd, env=full_env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise GitError(
            redact(f"git {args[0]} failed: {proc.stderr.strip() or proc.stdout.strip()}"),
            command=redact("git " + " ".join(args)),
            stderr=redact(proc.stderr),
        )
    return proc.stdout


def cache_clone(url: str, root: Path, *, env: dict[str, str] | None = None) -> git.Repo:
    """A local clone of ``url`` under ``root`` (made once, fetched after), with all branches."""
    path = root / hashlib.sha256(url.encode()).hexdigest()[:16]
    if (path / ".git").is_dir():
        fetch(git.Repo(path), env=env)
        return git.Repo(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    try:
        _run_git(["clone", "--quiet", "--no-checkout", url, str(path)], None, env)
    except GitError as exc:
        raise RepoError(
            f"cannot clone {redact(url)}: {exc.message}",
            repo=redact(url),
            hint="Check the URL and the repository block's credentials.",
        ) from None
    repo = git.Repo(path)
    # Local branches for every remote branch, so tasks find their dependencies by name.
    fetch(repo, env=env)
    return repo


def fetch(repo: git.Repo, *, env: dict[str, str] | None = None, pattern: str = "*") -> None:
    """Fetch ``refs/heads/<pattern>`` from origin into the same local branch names."""
    _run_git(
        [
            "fetch",
            "--quiet",
            "--update-head-ok",
            "origin",
            f"+refs/heads/{pattern}:refs/heads/{pattern}",
        ],
        Path(repo.git_dir),
        env,
    )


def push(repo: git.Repo, branch: str, *, env: dict[str, str] | None = None) -> None:
    """Push ``branch`` to origin under the same name."""
    push_to(repo, "origin", branch, env=env)


def push_to(
    repo: git.Repo,
    url: str,
    branch: str,
    *,
    env: dict[str, str] | None,
    force: bool = False,
    to: str | None = None,
) -> None:
    """Push ``branch`` to the repository at ``url`` as ``to`` (default: the same name)."""
    spec = f"{'+' if force else ''}refs/heads/{branch}:refs/heads/{to or branch}"
    _run_git(["push", "--quiet", url, spec], Path(repo.git_dir), env)


def fetch_from(repo: git.Repo, url: str, ref: str, into: str, *, env: dict[str, str]) -> str:
    """Fetch ``ref`` of the repository at ``url`` into the local ref ``into``; its commit."""
    _run_git(["fetch", "--quiet", url, f"+{ref}:{into}"], Path(repo.git_dir), env)
    return _run_git(["rev-parse", into], Path(repo.git_dir), env).strip()


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServedRepository:
    """``git daemon`` serving one local repository on loopback, push included, for a run.

    Containers with host networking reach it at :attr:`url`. Pushes only create or update
    ``claudecluster/...`` branches in practice (that is all workers push); the checked-out
    branch of a non-bare repository is refused by git itself.
    """

    def __init__(self, repo_path: Path, host: str = "127.0.0.1") -> None:
        self.repo_path = repo_path.resolve()
        self.host = host
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The repository's git:// URL."""
        return f"git://{self.host}:{self.port}/{self.repo_path.name}"

    def __enter__(self) -> ServedRepository:
        try:
            git.Repo(self.repo_path).git.rev_parse("--git-dir")
        except (GitCommandError, git.InvalidGitRepositoryError):
            raise RepoError(
                f"{self.repo_path} is not a git repository", repo=str(self.repo_path)
            ) from None
        self.port = _free_port(self.host)
        self._process = subprocess.Popen(
            [
                "git",
                "daemon",
                "--reuseaddr",
                "--export-all",
                "--enable=receive-pack",
                f"--listen={self.host}",
                f"--port={self.port}",
                f"--base-path={self.repo_path.parent}",
                str(self.repo_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                if self._process.poll() is not None:
                    break
                time.sleep(0.05)
        self.__exit__(None, None, None)
        raise GitError(f"git daemon did not start on port {self.port}", command="git daemon")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGTERM)
            self._process.wait(timeout=10)
            self._process = None


def push_commit(
    repo: git.Repo, commit: str, branch: str, *, env: dict[str, str] | None = None
) -> None:
    """Point origin's ``branch`` at ``commit`` (created or moved, even backwards)."""
    _run_git(
        ["push", "--quiet", "origin", f"+{commit}:refs/heads/{branch}"], Path(repo.git_dir), env
    )


def delete_branch(repo: git.Repo, branch: str, *, env: dict[str, str] | None = None) -> None:
    """Delete origin's ``branch`` (nothing happens when it is not there)."""
    _run_git(["push", "--quiet", "origin", f":refs/heads/{branch}"], Path(repo.git_dir), env)
