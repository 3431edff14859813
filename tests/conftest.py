"""Shared fixtures: real git repositories, the scripted model server, a real Prefect backend.

Nothing here mocks Claude Code, git or Prefect. ``model_server`` is one scripted Anthropic
API for the whole test session; each test registers scripts whose ``match`` marker is unique
to it (see ``marker``), so tests never answer each other's sessions.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from claudecluster.testing import ScriptedModelServer

SAMPLE_FILES = {
    "calc.py": "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n",
    "strings.py": "def shout(text):\n    return text.upper()\n",
    "test_calc.py": "from calc import add, sub\n\n\ndef test_add():\n    assert add(1, 2) == 3\n\n"
    "\ndef test_sub():\n    assert sub(3, 2) == 1\n",
}


def git(repo: Path, *args: str) -> str:
    """Run git in ``repo`` with a fixed identity and return stdout."""
    return subprocess.run(
        ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def snapshot(repo: Path) -> dict[str, object]:
    """Everything of the user's checkout a run must not touch: HEAD, branch, index, files."""
    files = {
        str(p.relative_to(repo)): p.read_bytes()
        for p in sorted(repo.rglob("*"))
        if p.is_file() and ".git" not in p.relative_to(repo).parts
    }
    return {
        "head": git(repo, "rev-parse", "HEAD"),
        "branch": git(repo, "symbolic-ref", "--short", "HEAD"),
        "status": git(repo, "status", "--porcelain=v1", "--untracked-files=all"),
        "index": (repo / ".git" / "index").read_bytes(),
        "files": files,
    }


@pytest.fixture(scope="session", autouse=True)
def claudecluster_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keep every test's ClaudeCluster state (worktrees, server data) out of the real home."""
    home = tmp_path_factory.mktemp("claudecluster-home")
    saved = os.environ.get("CLAUDECLUSTER_HOME")
    os.environ["CLAUDECLUSTER_HOME"] = str(home)
    try:
        yield home
    finally:
        from claudecluster.prefect_server import stop_server

        # A test that ran a goal without a backend fixture started the embedded server here.
        stop_server(home)
        if saved is None:
            os.environ.pop("CLAUDECLUSTER_HOME", None)
        else:
            os.environ["CLAUDECLUSTER_HOME"] = saved


@pytest.fixture(autouse=True)
def fresh_run_journals(claudecluster_home: Path) -> None:
    """Each test starts with no run journals: tests reuse run ids ("run-test"), and a journal
    left by another test would be taken for an earlier attempt of the same run."""
    import shutil

    shutil.rmtree(claudecluster_home / "runs", ignore_errors=True)


@pytest.fixture
def make_repo(tmp_path: Path) -> Callable[..., Path]:
    """Factory: a real git repository with a small Python project, one commit on main."""

    def factory(files: dict[str, str] | None = None, name: str = "repo") -> Path:
        repo = tmp_path / name
        repo.mkdir()
        git(repo, "init", "-q", "-b", "main")
        for rel, content in (files or SAMPLE_FILES).items():
            target = repo / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", "initial commit")
        return repo

    return factory


@pytest.fixture
def repo(make_repo: Callable[..., Path]) -> Path:
    """A sample repository."""
    return make_repo()


@pytest.fixture(scope="session")
def model_server() -> Iterator[ScriptedModelServer]:
    """One scripted Anthropic API for the session, with the CLI pointed at it."""
    server = ScriptedModelServer().start()
    saved = {k: os.environ.get(k) for k in server.env(max_retries=2)}
    os.environ.update(server.env(max_retries=2))
    try:
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def marker() -> str:
    """A unique string for a test's prompts, so its scripts match only its sessions."""
    return f"MARK-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def worktree_root(tmp_path: Path) -> Path:
    """Where a test's worktrees go (never the user's home)."""
    return tmp_path / "worktrees"


@pytest.fixture(scope="session")
def prefect_backend() -> Iterator[str]:
    """A real Prefect server for the session: Prefect's test harness (one SQLite server).

    Its URL is exported as ``PREFECT_API_URL`` too, so ClaudeCluster's own backend selection
    and any CLI subprocess use this server instead of starting the embedded one.
    """
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    saved = os.environ.get("PREFECT_API_URL")
    with prefect_test_harness(server_startup_timeout=120):
        url = str(PREFECT_API_URL.value())
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            if saved is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = saved
