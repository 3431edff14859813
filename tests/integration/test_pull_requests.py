"""Pull requests and reviews against a real forge on loopback.

The forge is :class:`claudecluster.testing.forge_server.ForgeServer`: bare repositories
served by ``git http-backend`` behind token authentication (pushes are real), and a stateful
GitHub-shaped API whose answers validate against githubkit's models (or the Gitea shape).
Runs use the real Claude Code CLI against the scripted model, real git and a real Prefect
server; nothing about the forge is mocked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from claudecluster.api import run_goal
from claudecluster.demo import create_sample_project
from claudecluster.models import RunReport, RunStatus, TaskSpec
from claudecluster.naming import artifact_key, artifact_scope
from claudecluster.plan import Plan
from claudecluster.pr_review import REPLY_MARKER
from claudecluster.remote import credential_env
from claudecluster.respond import respond
from claudecluster.review import NOTE_MARKER, REVIEW_MARKER
from claudecluster.testing import Script, ScriptedModelServer, structured, text, tool_use
from claudecluster.testing.forge_server import REVIEWER_LOGIN, ForgeServer
from tests.conftest import git

pytestmark = [
    pytest.mark.integration,
    pytest.mark.prefect_server,
    pytest.mark.usefixtures("prefect_backend"),
]

OWNER, NAME = "acme", "sample"
REVIEWER_TOKEN = "reviewer-token"
USAGE = "# Usage\n\nCount stock with Stock.add.\nPrice it with total_price.\n"


@pytest.fixture
def canary() -> Iterator[str]:
    """The forge token: a string found nowhere after a run but in the forge's own hands."""
    token = f"ccforge-canary-{uuid.uuid4().hex}"
    saved = os.environ.get("CLAUDECLUSTER_FORGE_TOKEN")
    os.environ["CLAUDECLUSTER_FORGE_TOKEN"] = token
    yield token
    if saved is None:
        os.environ.pop("CLAUDECLUSTER_FORGE_TOKEN", None)
    else:
        os.environ["CLAUDECLUSTER_FORGE_TOKEN"] = saved


class SessionEnvirons:
    """Reads the environment of every Claude Code process while it runs (from /proc): how
    many were seen, how many had the forge token variables blanked, whether any had the
    token itself."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.blanked: set[int] = set()
        self.leaked = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> SessionEnvirons:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        token = os.environ["CLAUDECLUSTER_FORGE_TOKEN"].encode()
        while not self._stop.wait(0.05):
            for environ in Path("/proc").glob("[0-9]*/environ"):
                try:
                    data = environ.read_bytes()
                except OSError:
                    continue
                if b"CLAUDE_CONFIG_DIR=" not in data or b"claudecluster-config-" not in data:
                    continue
                pid = int(environ.parent.name)
                self.seen.add(pid)
                if b"\0CLAUDECLUSTER_FORGE_TOKEN=\0" in data:
                    self.blanked.add(pid)
                self.leaked = self.leaked or token in data


def forge_with_sample(tmp_path: Path, token: str, flavor: str) -> tuple[ForgeServer, Path]:
    forge = ForgeServer(
        tmp_path / "forge",
        token,
        flavor=flavor,
        reviewer_token=REVIEWER_TOKEN,  # type: ignore[arg-type]
    ).__enter__()
    sample = create_sample_project(tmp_path / "sample")
    forge.create_repo(OWNER, NAME, source=sample)
    git(sample, "remote", "add", "origin", forge.git_url(OWNER, NAME))
    return forge, sample


@pytest.fixture
def github(tmp_path: Path, canary: str) -> Iterator[tuple[ForgeServer, Path]]:
    forge, sample = forge_with_sample(tmp_path, canary, "github")
    yield forge, sample
    forge.__exit__(None, None, None)


@pytest.fixture
def gitea(tmp_path: Path, canary: str) -> Iterator[tuple[ForgeServer, Path]]:
    forge, sample = forge_with_sample(tmp_path, canary, "gitea")
    yield forge, sample
    forge.__exit__(None, None, None)


def add_scripts(model_server: ScriptedModelServer, marker: str) -> None:
    """A task that writes docs/usage.md (after a slow first turn), and a reviewer
    whose notes point at a line of that diff and at a line outside it. The reviewer's prompt
    quotes the task's, so its script comes first (the first matching script answers)."""
    model_server.add_script(
        Script(
            name=f"{marker}-review",
            match=f"Goal: {marker}",
            turns=[
                tool_use("Read", {"file_path": "docs/usage.md"}),
                structured(
                    {
                        "summary": f"{marker}: adds a usage page.",
                        "risks": ["The page names no version."],
                        "notes": [
                            {"path": "docs/usage.md", "line": 3, "note": "Show a code sample."},
                            {"path": "inventory/stock.py", "line": 999, "note": "Not in diff."},
                        ],
                        "missing_tests": ["Nothing checks the usage page."],
                    }
                ),
                text("Reviewed."),
            ],
        )
    )
    model_server.add_script(
        Script(
            name=f"{marker}-usage",
            match=f"{marker}-usage",
            turns=[
                tool_use("Read", {"file_path": "README.md"}, latency_s=1.0),
                tool_use("Write", {"file_path": "docs/usage.md", "content": USAGE}),
                text("Wrote docs/usage.md."),
            ],
        )
    )


def usage_plan(marker: str, verify: str | None = "python -m pytest -q") -> Plan:
    return Plan(
        goal=f"{marker} usage docs",
        verify=verify,
        tasks=[
            TaskSpec(
                id="usage",
                title="Write a usage page",
                prompt=f"{marker}-usage Write docs/usage.md.",
                paths=["docs/usage.md"],
            )
        ],
    )


def run_with_pr(
    sample: Path, forge: ForgeServer, plan: Plan, worktree_root: Path, **kwargs: object
) -> RunReport:
    return run_goal(
        None,
        sample,
        plan=plan,
        worktree_root=worktree_root,
        forge_api_url=forge.api_url,
        **kwargs,  # type: ignore[arg-type]
    )


def latest_artifact(key: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        [artifact] = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    return artifact


def remote_head(forge: ForgeServer, branch: str) -> str:
    bare = forge.root / OWNER / f"{NAME}.git"
    return subprocess.run(
        ["git", "-C", str(bare), "rev-parse", f"refs/heads/{branch}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


class TestOpenAndUpdate:
    def test_a_ready_pr_with_a_sticky_review_then_updated_not_duplicated(
        self,
        github: tuple[ForgeServer, Path],
        model_server: ScriptedModelServer,
        marker: str,
        worktree_root: Path,
        canary: str,
        tmp_path: Path,
    ) -> None:
        forge, sample = github
        add_scripts(model_server, marker)
        users_refs = git(sample, "for-each-ref", "refs/heads/main", "refs/remotes")
        run_id = f"pr-{marker.lower()}"
        sessions = SessionEnvirons().start()  # what each Claude Code process was given
        report = run_with_pr(
            sample,
            forge,
            usage_plan(marker),
            worktree_root,
            pr="ready",
            review="lines",
            run_id=run_id,
        )

        assert report.status is RunStatus.SUCCEEDED, report.error
        info = report.pull_request
        assert info is not None and info.number == 1 and info.created and not info.draft
        assert info.url == f"{forge.url}/{OWNER}/{NAME}/pull/1"
        pull = forge.pull(OWNER, NAME, 1)
        assert (pull.head, pull.base, pull.draft) == (report.integration_branch, "main", False)
        # The branch really went over git: the forge's repository has the run's head.
        assert remote_head(forge, pull.head) == report.head_commit
        # The body: goal, a task row with its Prefect run link, the verify, totals, the
        # review folded away.
        assert f"{marker} usage docs" in pull.body
        assert "| `usage` | succeeded | 1 | +4/-0 |" in pull.body
        assert "/runs/task-run/" in pull.body
        assert "`python -m pytest -q` on the integration branch: passed" in pull.body
        assert "<details><summary>Review summary</summary>" in pull.body
        assert "Not ready to merge" not in pull.body
        # One sticky review comment; one line comment, at the line in the diff only.
        [sticky] = pull.comments
        assert REVIEW_MARKER in sticky.body and f"{marker}: adds a usage page." in sticky.body
        assert [(c.path, c.line) for c in pull.review_comments] == [("docs/usage.md", 3)]
        assert [r["event"] for r in pull.reviews] == ["COMMENT"]
        assert info.review_url and info.review_url.endswith(f"#issuecomment-{sticky.id}")
        # In Prefect: a link artifact to the pull request, and a line in the run's summary.
        scope = artifact_scope(deployment=None, goal=report.goal)
        link = latest_artifact(artifact_key(scope, "pull-request")).data
        assert link == f"[Pull request #1]({info.url})"
        summary = str(latest_artifact(artifact_key(scope, "summary")).data)
        assert f"**Pull request:** [#1]({info.url})" in summary

        # Someone edits the title and adds to the body on the forge; the run runs again.
        pull.title = "Usage docs, by hand"
        pull.body += "\n\nReviewed by a person."
        again = run_with_pr(
            sample,
            forge,
            usage_plan(marker),
            worktree_root,
            pr="ready",
            review="lines",
            run_id=run_id,
        )

        assert again.pull_request is not None and again.pull_request.number == 1
        assert not again.pull_request.created
        assert len(forge.repos[(OWNER, NAME)].pulls) == 1  # updated, not a second one
        assert pull.title == "Usage docs, by hand"  # the person's title stands
        assert pull.body.endswith("Reviewed by a person.")  # and their text
        assert pull.body.count("### Tasks") == 1
        assert len(pull.comments) == 1  # the sticky comment was edited, not repeated
        assert len(pull.review_comments) == 1  # no duplicate line comments
        # The user's own branch, checkout and working tree were never touched.
        assert git(sample, "for-each-ref", "refs/heads/main", "refs/remotes") == users_refs
        assert git(sample, "symbolic-ref", "HEAD").strip() == "refs/heads/main"
        assert git(sample, "status", "--porcelain") == ""

        # The token went to the forge and nowhere else: not to the session (it printed its
        # environment to the model), not to Prefect (database), not to files or git config.
        sessions.stop()
        assert sessions.seen, "no Claude Code process was seen"
        assert sessions.blanked == sessions.seen and not sessions.leaked
        self.assert_found_nowhere(canary, model_server, sample, tmp_path)

    @staticmethod
    def assert_found_nowhere(
        canary: str, model_server: ScriptedModelServer, sample: Path, tmp_path: Path
    ) -> None:
        from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

        requests = b"".join(r.body for r in model_server.requests)
        assert canary.encode() not in requests
        database = str(PREFECT_API_DATABASE_CONNECTION_URL.value() or "").split("///")[-1]
        assert Path(database).is_file(), database  # the test server's database, to search
        for path in [Path(p) for p in (database, database + "-wal")] + [sample / ".git"]:
            files = [path] if path.is_file() else list(path.rglob("*")) if path.is_dir() else []
            for file in files:
                if file.is_file():
                    assert canary.encode() not in file.read_bytes(), file
        home = Path(os.environ["CLAUDECLUSTER_HOME"])
        for file in home.rglob("*"):
            if file.is_file() and file.stat().st_size < 50_000_000:
                assert canary.encode() not in file.read_bytes(), file

    def test_a_failed_verify_opens_a_draft_that_says_so(
        self,
        github: tuple[ForgeServer, Path],
        model_server: ScriptedModelServer,
        marker: str,
        worktree_root: Path,
    ) -> None:
        forge, sample = github
        add_scripts(model_server, marker)
        plan = usage_plan(marker, verify="test -f docs/usage.md && test -f docs/missing.md")

        report = run_with_pr(sample, forge, plan, worktree_root, pr="ready", review="none")

        assert report.status is RunStatus.FAILED
        assert report.pull_request is not None and report.pull_request.draft
        pull = forge.pull(OWNER, NAME, 1)
        assert pull.draft
        first_lines = pull.body.splitlines()[1:3]
        assert first_lines[0] == "> [!WARNING]"
        assert "the final verify" in first_lines[1] and "failed" in first_lines[1]
        assert pull.comments == []  # review none: no comment

    def test_branch_mode_pushes_and_prints_the_compare_url(
        self,
        github: tuple[ForgeServer, Path],
        model_server: ScriptedModelServer,
        marker: str,
        worktree_root: Path,
    ) -> None:
        forge, sample = github
        add_scripts(model_server, marker)

        report = run_with_pr(sample, forge, usage_plan(marker), worktree_root, pr="branch")

        info = report.pull_request
        assert info is not None and info.number is None
        assert info.url == (
            f"{forge.url}/{OWNER}/{NAME}/compare/main...{report.integration_branch}?expand=1"
        )
        assert remote_head(forge, info.head) == report.head_commit
        assert forge.repos[(OWNER, NAME)].pulls == {}

    def test_the_pr_merges_into_the_branch_named_as_base(
        self,
        github: tuple[ForgeServer, Path],
        model_server: ScriptedModelServer,
        marker: str,
        worktree_root: Path,
    ) -> None:
        forge, sample = github
        add_scripts(model_server, marker)
        git(sample, "branch", "release")
        subprocess.run(
            ["git", "-C", str(sample), "push", "-q", forge.git_url(OWNER, NAME), "release"],
            env={**os.environ, **credential_env(None, forge.token)},
            check=True,
        )

        report = run_with_pr(
            sample, forge, usage_plan(marker), worktree_root, pr="draft", base="release"
        )

        assert report.pull_request is not None and report.pull_request.base == "release"
        assert forge.pull(OWNER, NAME, 1).base == "release"


class TestRefused:
    def test_a_wrong_token_fails_in_one_line_before_anything(
        self,
        github: tuple[ForgeServer, Path],
        model_server: ScriptedModelServer,
        marker: str,
        tmp_path: Path,
    ) -> None:
        forge, sample = github
        add_scripts(model_server, marker)
        plan_file = tmp_path / "plan.yaml"
        plan_file.write_text(usage_plan(marker).model_dump_json())
        before = git(sample, "for-each-ref")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "claudecluster.cli",
                "run",
                "--repo",
                str(sample),
                "--plan",
                str(plan_file),
                "--pr",
                "draft",
                "--forge-api-url",
                forge.api_url,
            ],
            env={**os.environ, "CLAUDECLUSTER_FORGE_TOKEN": "wrong-token"},
            capture_output=True,
            text=True,
            timeout=300,
        )

        assert proc.returncode == 2, proc.stderr
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith("claudecluster: error: ") and "refused the forge token" in line
        assert "HTTP 401" in line and "wrong-token" not in line
        assert forge.pushes == [] and forge.repos[(OWNER, NAME)].pulls == {}
        assert not any(marker in (s.script or "") for s in model_server.sessions().values())
        assert git(sample, "for-each-ref") == before  # nothing of the user's changed

    def test_an_unknown_forge_host_says_what_to_pass(self, tmp_path: Path, canary: str) -> None:
        sample = create_sample_project(tmp_path / "sample")
        git(sample, "remote", "add", "origin", "https://git.example.com/acme/sample.git")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "claudecluster.cli",
                "run",
                "Document it",
                "--repo",
                str(sample),
                "--pr",
                "draft",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2
        assert "--forge-api-url https://git.example.com/api/v3" in proc.stderr


class TestReviewAndRespond:
    def test_review_of_a_branch_prints_it(
        self,
        github: tuple[ForgeServer, Path],
        model_server: ScriptedModelServer,
        marker: str,
    ) -> None:
        forge, sample = github
        branch = f"feature-{marker.lower()}"
        model_server.add_script(
            Script(
                name=f"{marker}-branch-review",
                match=f"The changes on branch {branch} since main",
                turns=[
                    structured(
                        {
                            "summary": f"{marker} adds a usage page.",
                            "risks": [],
                            "notes": [{"path": "docs/usage.md", "line": 2, "note": "Typo."}],
                            "missing_tests": [],
                        }
                    ),
                    text("Reviewed."),
                ],
            )
        )
        git(sample, "checkout", "-q", "-b", branch)
        (sample / "docs").mkdir()
        (sample / "docs" / "usage.md").write_text(USAGE)
        git(sample, "add", "-A")
        git(sample, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "usage")
        git(sample, "checkout", "-q", "main")

        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "claudecluster.cli",
                "review",
                branch,
                "--repo",
                str(sample),
                "--base",
                "main",
                "--forge-api-url",
                forge.api_url,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )

        assert proc.returncode == 0, proc.stderr
        assert f"### ClaudeCluster review of branch `{branch}`" in proc.stdout
        assert f"{marker} adds a usage page." in proc.stdout
        assert "`docs/usage.md:2`: Typo." in proc.stdout
        assert f"not posted: branch `{branch}` has no open pull request" in proc.stderr
        assert forge.repos[(OWNER, NAME)].pulls == {}

    def test_respond_answers_and_resolves_a_thread(
        self,
        github: tuple[ForgeServer, Path],
        model_server: ScriptedModelServer,
        marker: str,
        worktree_root: Path,
    ) -> None:
        forge, sample = github
        add_scripts(model_server, marker)
        report = run_with_pr(
            sample, forge, usage_plan(marker), worktree_root, pr="ready", review="lines"
        )
        assert report.pull_request is not None
        pull = forge.pull(OWNER, NAME, 1)
        ask = f"{marker} name the package on the first line"
        thread_id = forge.add_review_comment(
            OWNER, NAME, 1, path="docs/usage.md", line=1, body=ask, user=REVIEWER_LOGIN
        )
        model_server.add_script(
            Script(
                name=f"{marker}-respond",
                match=f"{REVIEWER_LOGIN}: {ask}",
                turns=[
                    tool_use(
                        "Edit",
                        {
                            "file_path": "docs/usage.md",
                            "old_string": "# Usage\n",
                            "new_string": "# Using inventory\n",
                        },
                    ),
                    text("Renamed the heading."),
                ],
            )
        )
        before = remote_head(forge, pull.head)

        outcome = respond(
            report.pull_request.url,
            sample,
            worktree_root=worktree_root,
            forge_api_url=forge.api_url,
        )

        assert outcome.ok and outcome.report is not None, outcome.lines
        after = remote_head(forge, pull.head)
        assert after == outcome.report.head_commit and after != before
        assert git(sample, "merge-base", "--is-ancestor", before, after) == ""  # fast-forward
        assert "# Using inventory" in git(sample, "show", f"{after}:docs/usage.md")
        thread = [
            c for c in pull.review_comments if c.id == thread_id or c.in_reply_to == thread_id
        ]
        top, reply = thread
        assert top.resolved
        assert reply.user != REVIEWER_LOGIN and REPLY_MARKER in reply.body
        assert after[:12] in reply.body
        # The reviewer's own line note (ours) was not taken for a request.
        assert all(NOTE_MARKER not in c.body for c in pull.review_comments if c.in_reply_to)
        # Answered threads are not answered twice.
        assert (
            respond(
                report.pull_request.url,
                sample,
                worktree_root=worktree_root,
                forge_api_url=forge.api_url,
            ).report
            is None
        )


class TestReviewFlow:
    def test_the_review_deployment_flow_edits_the_sticky_comment(
        self,
        github: tuple[ForgeServer, Path],
        model_server: ScriptedModelServer,
        marker: str,
        worktree_root: Path,
    ) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.sorting import ArtifactSort

        from claudecluster.flows.review import review_flow

        forge, sample = github
        add_scripts(model_server, marker)
        report = run_with_pr(sample, forge, usage_plan(marker), worktree_root, pr="draft")
        assert report.pull_request is not None
        pull = forge.pull(OWNER, NAME, 1)
        model_server.add_script(
            Script(
                name=f"{marker}-pr-review",
                match="ClaudeCluster: " + f"{marker} usage docs",
                turns=[
                    structured(
                        {
                            "summary": f"{marker} second look.",
                            "risks": [],
                            "notes": [],
                            "missing_tests": [],
                        }
                    ),
                    text("Reviewed."),
                ],
            )
        )

        state = review_flow(
            target=report.pull_request.url,
            repo=str(sample),
            forge_api_url=forge.api_url,
            return_state=True,
        )

        assert state.is_completed(), state.message
        [sticky] = pull.comments  # the run's review comment, edited by the flow
        assert REVIEW_MARKER in sticky.body and f"{marker} second look." in sticky.body
        assert "review of pull request #1" in sticky.body
        with get_client(sync_client=True) as client:
            # The newest by creation: "latest per key" pages by id, which hides new ones once
            # the session's server holds many keys.
            artifact = client.read_artifacts(sort=ArtifactSort.CREATED_DESC, limit=50)
        assert any(f"{marker} second look." in str(a.data) for a in artifact)


class TestGitea:
    def test_a_draft_with_a_sticky_review_updated_on_rerun(
        self,
        gitea: tuple[ForgeServer, Path],
        model_server: ScriptedModelServer,
        marker: str,
        worktree_root: Path,
    ) -> None:
        forge, sample = gitea
        add_scripts(model_server, marker)
        run_id = f"gitea-{marker.lower()}"
        for _ in range(2):
            report = run_with_pr(
                sample,
                forge,
                usage_plan(marker),
                worktree_root,
                pr="draft",
                review="lines",
                run_id=run_id,
            )
            assert report.status is RunStatus.SUCCEEDED, report.error

        pulls = forge.repos[(OWNER, NAME)].pulls
        assert list(pulls) == [1]
        pull = pulls[1]
        assert pull.draft and pull.title.startswith("WIP: ClaudeCluster: ")
        assert f"{forge.url}/{OWNER}/{NAME}/pulls/1" == report.pull_request.url  # type: ignore[union-attr]
        [sticky] = pull.comments
        assert REVIEW_MARKER in sticky.body
        assert [(c.path, c.line) for c in pull.review_comments] == [("docs/usage.md", 3)]


@pytest.mark.skipif(
    not (
        os.environ.get("CLAUDECLUSTER_LIVE_GITHUB_TOKEN")
        and os.environ.get("CLAUDECLUSTER_LIVE_GITHUB_REPO")
    ),
    reason="a live GitHub test needs CLAUDECLUSTER_LIVE_GITHUB_TOKEN and "
    "CLAUDECLUSTER_LIVE_GITHUB_REPO=OWNER/NAME (a scratch repository the token may push to); "
    "these machines have no internet",
)
def test_live_github_draft(
    tmp_path: Path, model_server: ScriptedModelServer, marker: str, worktree_root: Path
) -> None:
    """A draft pull request on a real GitHub repository, closed again afterwards."""
    from githubkit import GitHub

    token = os.environ["CLAUDECLUSTER_LIVE_GITHUB_TOKEN"]
    owner, name = os.environ["CLAUDECLUSTER_LIVE_GITHUB_REPO"].split("/")
    clone = tmp_path / "clone"
    subprocess.run(
        [
            "git",
            "-c",
            f"http.extraHeader=Authorization: Bearer {token}",
            "clone",
            "-q",
            f"https://github.com/{owner}/{name}.git",
            str(clone),
        ],
        check=True,
    )
    add_scripts(model_server, marker)
    os.environ["CLAUDECLUSTER_FORGE_TOKEN"] = token
    try:
        report = run_goal(
            None,
            clone,
            plan=usage_plan(marker, verify=None),
            worktree_root=worktree_root,
            pr="draft",
            review="summary",
        )
    finally:
        os.environ.pop("CLAUDECLUSTER_FORGE_TOKEN", None)
    assert report.pull_request is not None and report.pull_request.draft
    github = GitHub(token)
    github.rest.pulls.update(owner, name, report.pull_request.number or 0, state="closed")
