"""Forges, pull request bodies and reviews: the pure parts, without a forge or a session."""

from __future__ import annotations

from pathlib import Path

import pytest

from claudecluster.errors import ForgeAccessError
from claudecluster.forges import ForgeKind, ReviewThread, ThreadComment, locate
from claudecluster.models import (
    PullRequestInfo,
    RunReport,
    RunStatus,
    RunTotals,
    TaskResult,
    TaskStatus,
    TestReport,
    UnmergedTask,
)
from claudecluster.pr_review import REPLY_MARKER, answerable, parse_pull_url, respond_plan
from claudecluster.pull_request import (
    END,
    merge_body,
    problems,
    pull_request_body,
    pull_request_title,
    title_we_set,
)
from claudecluster.review import (
    NOTE_MARKER,
    REVIEW_MARKER,
    FileNote,
    Review,
    commentable_lines,
    line_comments,
    review_markdown,
    review_schema,
)
from claudecluster.session import session_env


class TestLocate:
    @pytest.mark.parametrize(
        "url",
        [
            "https://github.com/acme/app.git",
            "https://github.com/acme/app",
            "git@github.com:acme/app.git",
            "ssh://git@github.com/acme/app.git",
        ],
    )
    def test_github_remotes(self, url: str) -> None:
        repo = locate(url)
        assert (repo.kind, repo.api_url, repo.owner, repo.name) == (
            ForgeKind.GITHUB,
            "https://api.github.com",
            "acme",
            "app",
        )
        assert repo.web_url == "https://github.com/acme/app"

    def test_enterprise_and_gitea_by_their_api_url(self) -> None:
        ghe = locate("https://git.corp/acme/app.git", "https://git.corp/api/v3/")
        assert (ghe.kind, ghe.api_url) == (ForgeKind.GITHUB, "https://git.corp/api/v3")
        gitea = locate("git@code.example:acme/app.git", "https://code.example/api/v1")
        assert gitea.kind is ForgeKind.GITEA
        assert gitea.compare_url("main", "x") == "https://code.example/acme/app/compare/main...x"

    def test_an_unknown_host_names_both_choices(self) -> None:
        with pytest.raises(ForgeAccessError) as raised:
            locate("https://code.example/acme/app.git")
        line = raised.value.one_line()
        assert "/api/v3" in line and "/api/v1" in line and "\n" not in line

    def test_no_owner_and_name(self) -> None:
        with pytest.raises(ForgeAccessError, match="owner and name"):
            locate("https://github.com/app.git")


def report(**changes: object) -> RunReport:
    task = TaskResult(
        id="docs",
        title="Write docs",
        status=TaskStatus.SUCCEEDED,
        base_commit="a" * 40,
        cost_usd=0.05,
        turns=3,
        run_url="http://ui/runs/task-run/1",
    )
    values: dict[str, object] = {
        "run_id": "r1",
        "goal": "Document the package",
        "status": RunStatus.SUCCEEDED,
        "repo": "/x",
        "base_commit": "b" * 40,
        "integration_branch": "claudecluster/r1/integration",
        "head_commit": "c" * 40,
        "tasks": [task],
        "totals": RunTotals(cost_usd=0.05, turns=3),
        "final_verify": TestReport(command="pytest -q", exit_code=0, passed=4, failed=0),
        "ui_url": "http://ui/runs/flow-run/9",
    }
    values.update(changes)
    return RunReport.model_validate(values)


class TestBody:
    def test_from_the_run_data(self) -> None:
        body = pull_request_body(report(), "T", review="The prose.")
        assert body.startswith("<!-- claudecluster:begin run=r1 title=T -->")
        assert body.endswith(END)
        assert (
            "| `docs` | succeeded | 0 | +0/-0 | - | 3 | $0.0500 | "
            "[run](http://ui/runs/task-run/1) |" in body
        )
        assert "`pytest -q` on the integration branch: passed (4 passed, 0 failed)" in body
        assert "[the goal's run in Prefect](http://ui/runs/flow-run/9)" in body
        assert "<details><summary>Review summary</summary>\n\nThe prose." in body
        assert "Not ready" not in body

    def test_what_is_not_ready_comes_first(self) -> None:
        bad = report(
            status=RunStatus.FAILED,
            final_verify=TestReport(command="pytest -q", exit_code=1),
            unmerged=[UnmergedTask(id="docs", branch="b", reason="conflict")],
            resolved=["other"],
        )
        assert len(problems(bad)) == 2
        lines = pull_request_body(bad, "T").splitlines()
        assert lines[1] == "> [!WARNING]"
        assert "the final verify (`pytest -q`) failed" in lines[2] and "`docs`" in lines[2]
        body = "\n".join(lines)
        assert "- conflict resolved: `other`" in body
        assert "- not merged: `docs` (kept on `b`): conflict" in body

    def test_updates_keep_what_people_wrote_around_it(self) -> None:
        ours = pull_request_body(report(), "ClaudeCluster: Document the package")
        existing = "Intro by a person.\n\n" + pull_request_body(report(), "old") + "\n\nP.S."
        merged = merge_body(existing, ours)
        assert merged.startswith("Intro by a person.\n\n") and merged.endswith("\n\nP.S.")
        assert merged.count("### Goal") == 1
        assert title_we_set(merged) == "ClaudeCluster: Document the package"
        assert merge_body("", ours) == ours
        assert merge_body("Only a person's text.", ours).endswith("Only a person's text.")

    def test_the_trace_when_there_is_one(self) -> None:
        body = pull_request_body(report(trace_id="ab" * 16, trace_url="http://t/ab"), "T")
        assert f"Trace: [{'ab' * 16}](http://t/ab)." in body
        assert "Trace:" not in pull_request_body(report(), "T")

    def test_title(self) -> None:
        assert pull_request_title("Add  type hints\nto every module") == (
            "ClaudeCluster: Add type hints"
        )
        assert len(pull_request_title("x" * 200)) == 72

    def test_secrets_are_redacted(self) -> None:
        body = pull_request_body(report(goal="use sk-ant-api03-" + "x" * 40), "T")
        assert "sk-ant-api03-xxxx" not in body


DIFF = """\
diff --git a/docs/usage.md b/docs/usage.md
new file mode 100644
--- /dev/null
+++ b/docs/usage.md
@@ -0,0 +1,3 @@
+# Usage
+
+Text.
diff --git a/app.py b/app.py
--- a/app.py
+++ b/app.py
@@ -10,3 +10,4 @@ def f():
     a = 1
-    b = 2
+    b = 3
+    c = 4
     return a
"""


class TestReview:
    def test_commentable_lines_are_added_and_context_lines(self) -> None:
        assert commentable_lines(DIFF) == {"docs/usage.md": {1, 2, 3}, "app.py": {10, 11, 12, 13}}

    def test_only_notes_on_diff_lines_become_line_comments(self) -> None:
        review = Review(
            summary="s",
            risks=[],
            notes=[
                FileNote(path="app.py", line=12, note="why 4?"),
                FileNote(path="app.py", line=40, note="outside"),
                FileNote(path="other.py", line=1, note="not in the diff"),
                FileNote(path="app.py", note="the whole file"),
            ],
            missing_tests=[],
        )
        [comment] = line_comments(review, DIFF)
        assert (comment.path, comment.line) == ("app.py", 12)
        assert comment.body.startswith("why 4?") and NOTE_MARKER in comment.body

    def test_markdown_folds_the_details(self) -> None:
        review = Review(
            summary="Adds docs.",
            risks=["none really"],
            notes=[FileNote(path="a.py", line=3, note="n")],
            missing_tests=["t"],
        )
        text = review_markdown(review, subject="run `r1`", cost_usd=0.01)
        assert text.startswith(REVIEW_MARKER)
        assert text.index("Adds docs.") < text.index("<details><summary>2 notes</summary>")
        assert "- `a.py:3`: n" in text and "$0.0100" in text

    def test_the_schema_is_closed_and_complete(self) -> None:
        schema = review_schema()
        assert schema["required"] == ["summary", "risks", "notes", "missing_tests"]
        assert schema["additionalProperties"] is False
        note = schema["properties"]["notes"]["items"]
        assert note["required"] == ["path", "line", "note"] and "$ref" not in str(schema)


class TestRespond:
    def test_pull_urls(self) -> None:
        assert parse_pull_url("https://github.com/acme/app/pull/12") == (
            "https://github.com/acme/app",
            12,
        )
        assert parse_pull_url("http://127.0.0.1:9/acme/app/pulls/3/") == (
            "http://127.0.0.1:9/acme/app",
            3,
        )
        assert parse_pull_url("feature/x") is None

    def test_threads_become_one_task_per_file(self) -> None:
        def thread(n: int, path: str, body: str, *more: ThreadComment) -> ReviewThread:
            return ReviewThread(str(n), path, n, [ThreadComment(n, "alice", body), *more])

        threads = [
            thread(1, "a/b.py", "rename x"),
            thread(2, "a/b.py", "and y"),
            thread(3, "c.md", "typo"),
            thread(4, "c.md", "ours\n" + NOTE_MARKER),
            thread(5, "c.md", "done", ThreadComment(9, "bot", "Done " + REPLY_MARKER)),
        ]
        open_ones = answerable(threads)
        assert [t.id for t in open_ones] == ["1", "2", "3"]
        plan, by_task = respond_plan(open_ones, number=7, verify="pytest")
        assert [(t.id, t.paths) for t in plan.tasks] == [("a-b-py", ["a/b.py"]), ("c-md", ["c.md"])]
        assert [t.id for t in by_task["a-b-py"]] == ["1", "2"]
        assert "- line 1: alice: rename x" in plan.tasks[0].prompt
        assert plan.verify == "pytest" and "#7" in plan.goal


def test_sessions_never_see_a_forge_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_secret")
    env = session_env(Path("/tmp/cfg"), "m", {"ANTHROPIC_API_KEY": "k"})
    for name in ("GITHUB_TOKEN", "GH_TOKEN", "GITEA_TOKEN", "CLAUDECLUSTER_FORGE_TOKEN"):
        assert env[name] == ""
    assert env["ANTHROPIC_API_KEY"] == "k"


def test_pull_request_info_round_trips() -> None:
    info = PullRequestInfo(url="u", number=1, draft=True, head="h", base="main")
    assert RunReport.model_validate(report(pull_request=info).model_dump()).pull_request == info


def test_pull_request_options_come_from_flags_over_the_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from claudecluster.blocks import settings as settings_blocks
    from claudecluster.models import PullRequestMode, ReviewMode

    block = settings_blocks.ClaudeCodeSettings(pull_request="draft", review="lines")
    monkeypatch.setattr(settings_blocks, "load_settings_block", lambda name: block)
    resolve = settings_blocks.resolve_pull_request
    assert resolve(None, None, None, "team").mode is PullRequestMode.DRAFT
    assert resolve(None, None, None, "team").review is ReviewMode.LINES
    explicit = resolve(PullRequestMode.READY, ReviewMode.NONE, "http://f/api/v1", "team")
    assert (explicit.mode, explicit.review, explicit.forge_api_url) == (
        PullRequestMode.READY,
        ReviewMode.NONE,
        "http://f/api/v1",
    )
    default = resolve(None, None, None, None)
    assert (default.mode, default.review, default.wanted) == (
        PullRequestMode.OFF,
        ReviewMode.SUMMARY,
        False,
    )
