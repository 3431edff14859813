"""Merge conflicts resolved at integration by a resolution session, or kept and reported."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from claudecluster.models import RunStatus, TaskStatus
from claudecluster.testing import Script, ScriptedModelServer, text, tool_use
from tests.conftest import git
from tests.integration.test_driver import (
    VERIFY,
    add_script,
    edit_turns,
    make_plan,
    run,
    run_id_for,
    task,
    token,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.prefect_server,
    pytest.mark.usefixtures("prefect_backend"),
]

RESOLVED = "def add(a, b):\n    return (b) + (a)\n\n\ndef sub(a, b):\n    return a - b\n"


def resolver_script(marker: str, content: str) -> Script:
    """Answers the resolution session of ``marker``'s run by writing ``content``."""
    return Script(
        name=f"resolver-{marker}",
        match=re.compile(rf"Resolve the merge conflict.*{re.escape(marker)}", re.DOTALL),
        turns=[
            tool_use("Read", {"file_path": "calc.py"}),
            tool_use("Write", {"file_path": "calc.py", "content": content}),
            text("Kept both: swapped and parenthesised."),
        ],
    )


class TestResolution:
    """Two tasks edit the same line: a resolution session merges both intents."""

    def test_resolved_and_verified(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        model_server.add_script(resolver_script(marker, RESOLVED))
        add_script(model_server, marker, "swap", edit_turns("calc.py", "a + b", "b + a"))
        add_script(model_server, marker, "paren", edit_turns("calc.py", "a + b", "(a) + (b)"))
        plan = make_plan("rewrite add", task(marker, "swap"), task(marker, "paren"), verify=VERIFY)

        report = run(repo, worktree_root, run_id_for(marker), max_parallel=2, plan=plan)

        assert report.status is RunStatus.SUCCEEDED, report.error
        assert report.unmerged == []
        assert len(report.resolved) == 1
        assert report.integration_branch is not None
        assert git(repo, "show", f"{report.integration_branch}:calc.py") == RESOLVED
        subjects = git(repo, "log", "--first-parent", "--format=%s", report.integration_branch)
        assert "(conflict resolved)" in subjects
        resolver_sessions = [
            s for s in model_server.sessions().values() if s.script == f"resolver-{marker}"
        ]
        assert len(resolver_sessions) == 1
        # The resolution session saw both sides' intent.
        prompt = next(
            r.view.prompt for r in model_server.requests if r.script == f"resolver-{marker}"
        )
        assert token(marker, "swap") in prompt
        assert token(marker, "paren") in prompt
        assert report.final_verify is not None
        assert report.final_verify.ok

    def test_failed_resolution_keeps_the_branch(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        broken = RESOLVED.replace("return (b) + (a)", "return (b) - (a)")  # fails the tests
        model_server.add_script(resolver_script(marker, broken))
        add_script(model_server, marker, "swap", edit_turns("calc.py", "a + b", "b + a"))
        add_script(model_server, marker, "paren", edit_turns("calc.py", "a + b", "(a) + (b)"))
        plan = make_plan("rewrite add", task(marker, "swap"), task(marker, "paren"), verify=VERIFY)

        report = run(repo, worktree_root, run_id_for(marker), max_parallel=2, plan=plan)

        assert report.status is RunStatus.FAILED
        assert report.resolved == []
        (unmerged,) = report.unmerged
        assert "fails its verify command" in unmerged.reason
        results = {t.id: t for t in report.tasks}
        assert results[unmerged.id].status is TaskStatus.SUCCEEDED
        branch = f"claudecluster/{report.run_id}/{unmerged.id}"
        assert git(repo, "rev-parse", branch).strip() == results[unmerged.id].head_commit
        assert report.integration_branch is not None
        assert "(b) - (a)" not in git(repo, "show", f"{report.integration_branch}:calc.py")
        assert git(repo, "worktree", "list").count("\n") == 1  # no scratch worktree left
