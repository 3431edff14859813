"""Repositories reached over git: a served local repo, and a goal on a git:// URL."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from claudecluster.api import run_goal
from claudecluster.errors import RepoError
from claudecluster.models import TaskSpec
from claudecluster.plan import Plan
from claudecluster.remote import ServedRepository, credential_env, is_remote
from claudecluster.testing import Script, ScriptedModelServer, text, tool_use
from tests.conftest import git

pytestmark = pytest.mark.integration


class TestUrls:
    """What counts as a remote repository."""

    @pytest.mark.parametrize(
        "location",
        ["https://example.invalid/r.git", "ssh://git@host/r", "git://127.0.0.1:9/r", "git@h:r"],
    )
    def test_urls_are_remote(self, location: str) -> None:
        assert is_remote(location)

    @pytest.mark.parametrize("location", ["/srv/repo", "repo", "./repo", "C:/repo"])
    def test_paths_are_local(self, location: str) -> None:
        assert not is_remote(location)

    def test_credentials_go_in_a_header_not_the_url(self) -> None:
        env = credential_env("bot", "s3cret-token-value")
        assert env["GIT_CONFIG_KEY_0"] == "http.extraHeader"
        assert env["GIT_CONFIG_VALUE_0"].startswith("Authorization: Basic ")
        assert "s3cret-token-value" not in env["GIT_CONFIG_VALUE_0"]
        assert credential_env("bot", None) == {}


class TestServedRepository:
    """git daemon serves a local repository on loopback for the run, push included."""

    def test_clone_push_and_stop(self, repo: Path, tmp_path: Path) -> None:
        with ServedRepository(repo) as served:
            port = served.port
            clone = tmp_path / "clone"
            git(tmp_path, "clone", "-q", served.url, str(clone))
            (clone / "new.txt").write_text("from a container\n")
            git(clone, "checkout", "-q", "-b", "claudecluster/r1/t1")
            git(clone, "add", "new.txt")
            git(clone, "commit", "-q", "-m", "work")
            git(clone, "push", "-q", "origin", "claudecluster/r1/t1")
        assert git(repo, "show", "claudecluster/r1/t1:new.txt") == "from a container\n"
        assert git(repo, "status", "--porcelain") == ""  # the checkout is untouched
        with (
            pytest.raises(ConnectionRefusedError),
            socket.create_connection(("127.0.0.1", port), timeout=1),
        ):
            pass

    def test_not_a_repository(self, tmp_path: Path) -> None:
        with pytest.raises(RepoError), ServedRepository(tmp_path):
            pass


@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_backend")
class TestGoalOnUrl:
    """A goal on a git:// URL works in a clone and pushes every branch back."""

    def test_branches_pushed_back(
        self,
        make_repo: Callable[..., Path],
        tmp_path: Path,
        worktree_root: Path,
        model_server: ScriptedModelServer,
        marker: str,
    ) -> None:
        source = make_repo()
        bare = tmp_path / "origin.git"
        git(tmp_path, "clone", "-q", "--bare", str(source), str(bare))
        model_server.add_script(
            Script(
                name="remote-edit",
                match=marker,
                turns=[
                    tool_use("Read", {"file_path": "calc.py"}),
                    tool_use(
                        "Edit",
                        {
                            "file_path": "calc.py",
                            "old_string": "a - b",
                            "new_string": "a - b  # ok",
                        },
                    ),
                    text("Done."),
                ],
            )
        )
        plan = Plan(
            goal="Edit over git",
            verify="python -m pytest -q",
            tasks=[
                TaskSpec(id="edit", title="Edit calc", prompt=f"{marker} edit", paths=["calc.py"])
            ],
        )
        run_id = f"url-{marker.lower()}"

        with ServedRepository(bare) as served:
            report = run_goal(
                None,
                served.url,
                plan=plan,
                max_parallel=1,
                run_id=run_id,
                worktree_root=worktree_root,
            )

        assert report.status == "succeeded", report.error
        branches = git(bare, "branch", "--list", f"claudecluster/{run_id}/*").split()
        assert sorted(branches) == [
            f"claudecluster/{run_id}/edit",
            f"claudecluster/{run_id}/integration",
        ]
        merged = git(bare, "show", f"claudecluster/{run_id}/integration:calc.py")
        assert "a - b  # ok" in merged
        assert report.final_verify is not None
        assert report.final_verify.passed == 2
