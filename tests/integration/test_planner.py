"""The LLM planner against the real Claude Code CLI and the scripted model server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from claudecluster.errors import PlannerError
from claudecluster.models import WorkerSettings
from claudecluster.plan import Plan
from claudecluster.planner import run_planner
from claudecluster.session import SessionOutcome
from claudecluster.testing import (
    STRUCTURED_OUTPUT_TOOL,
    Script,
    ScriptedModelServer,
    structured,
    text,
    tool_use,
)
from claudecluster.testing.model_server import RecordedRequest
from tests.conftest import git, snapshot

pytestmark = pytest.mark.integration


def plan_tasks(*tasks: dict[str, Any]) -> dict[str, Any]:
    """A planner answer: the given tasks, with the schema's required fields filled in."""
    full = [
        {
            "kind": "other",
            "title": t["id"],
            "prompt": f"do {t['id']}",
            "paths": [],
            "depends_on": [],
        }
        | t
        for t in tasks
    ]
    return {"verify": "python -m pytest -q", "tasks": full}


def plan(
    repo: Path,
    goal: str,
    worktree_root: Path,
    *,
    verify: str | None = None,
    max_tasks: int = 12,
) -> tuple[Plan, SessionOutcome]:
    base = git(repo, "rev-parse", "HEAD").strip()
    return asyncio.run(
        run_planner(
            goal,
            repo,
            base,
            WorkerSettings(),
            max_tasks=max_tasks,
            verify=verify,
            worktree_root=worktree_root,
        )
    )


READ_ONLY_PLUS_OUTPUT = {"Read", "Grep", "Glob", STRUCTURED_OUTPUT_TOOL}

# The CLI adds this to keep deferred tool loading switched on; it is not a callable tool.
DEFERRED_PLACEHOLDER = "DeferredToolPlaceholder"


def callable_tools(tools: list[dict[str, Any]]) -> set[str]:
    """Names of the tools a request offers, without the CLI's deferred-loading placeholder."""
    for tool in tools:
        if tool["name"] == DEFERRED_PLACEHOLDER:
            assert tool.get("defer_loading") is True, tool
    return {tool["name"] for tool in tools if tool["name"] != DEFERRED_PLACEHOLDER}


def requests_of(model_server: ScriptedModelServer, script: str) -> list[RecordedRequest]:
    """The messages requests a script answered."""
    return [r for r in model_server.requests if r.script == script]


class TestValidPlan:
    """A plan returned through StructuredOutput becomes a validated Plan."""

    def test_plan_from_structured_output(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        answer = plan_tasks(
            {
                "id": "calc-doc",
                "kind": "docs",
                "title": "Docstrings for calc.py",
                "prompt": "Add docstrings to calc.py",
                "paths": ["./calc.py"],
            },
            {
                "id": "calc-tests",
                "kind": "test",
                "title": "More tests",
                "prompt": "Test add and sub with negatives",
                "paths": ["test_calc.py"],
                "depends_on": ["calc-doc"],
            },
        )
        name = f"planner-{marker}"
        model_server.add_script(
            Script(
                name=name,
                match=marker,
                turns=[
                    tool_use("Glob", {"pattern": "*.py"}),
                    tool_use("Read", {"file_path": "calc.py"}),
                    structured(answer),
                ],
            )
        )
        before = snapshot(repo)

        result, outcome = plan(repo, f"{marker} document calc", worktree_root)

        assert outcome.ok and outcome.turns >= 3 and outcome.cost_usd > 0
        assert result.goal == f"{marker} document calc"
        assert result.verify == "python -m pytest -q"
        assert [t.id for t in result.tasks] == ["calc-doc", "calc-tests"]
        assert [t.kind for t in result.tasks] == ["docs", "test"]
        assert result.tasks[0].paths == ["calc.py"]  # normalised by validation
        assert result.tasks[1].depends_on == ["calc-doc"]
        assert result.tasks[1].prompt == "Test add and sub with negatives"
        # The session really explored the repository: the Read returned calc.py's content.
        served = requests_of(model_server, name)
        assert len(served) == 3
        read_results = served[2].view.tool_results()
        assert read_results and "def add(a, b):" in read_results[0].content
        assert not read_results[0].is_error
        # Every request offered exactly the read-only tools plus StructuredOutput.
        for request in served:
            assert callable_tools(request.json["tools"]) == READ_ONLY_PLUS_OUTPUT
        # The goal is in the prompt; the scratch worktree is gone; the checkout is untouched.
        assert marker in served[0].view.prompt
        assert list(worktree_root.iterdir()) == []
        assert git(repo, "worktree", "list").count("\n") == 1
        assert snapshot(repo) == before

    def test_reads_the_base_commit_not_the_dirty_tree(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        (repo / "calc.py").write_text("UNCOMMITTED USER EDIT\n")
        name = f"planner-dirty-{marker}"
        model_server.add_script(
            Script(
                name=name,
                match=marker,
                turns=[
                    tool_use("Read", {"file_path": "calc.py"}),
                    structured(plan_tasks({"id": "only"})),
                ],
            )
        )

        result, _ = plan(repo, f"{marker} look", worktree_root)

        assert [t.id for t in result.tasks] == ["only"]
        served = requests_of(model_server, name)
        assert len(served) == 2
        content = served[1].view.tool_results()[0].content
        assert "def add(a, b):" in content
        assert "UNCOMMITTED USER EDIT" not in content

    def test_verify_argument_overrides_and_empty_verify_is_none(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        model_server.add_script(
            Script(
                name=f"planner-verify-{marker}",
                match=f"{marker}-given",
                turns=[structured(plan_tasks({"id": "one"}))],
            )
        )
        no_verify = plan_tasks({"id": "two"}) | {"verify": ""}
        model_server.add_script(
            Script(
                name=f"planner-noverify-{marker}",
                match=f"{marker}-empty",
                turns=[structured(no_verify)],
            )
        )

        given, _ = plan(repo, f"{marker}-given goal", worktree_root, verify="make check")
        empty, _ = plan(repo, f"{marker}-empty goal", worktree_root)

        assert [t.id for t in given.tasks] == ["one"] and given.verify == "make check"
        assert [t.id for t in empty.tasks] == ["two"] and empty.verify is None


class TestInvalidPlans:
    """No plan, or a plan that does not validate, is a PlannerError, never an empty success."""

    def test_unknown_dependency(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        answer = plan_tasks({"id": "docs", "depends_on": ["ghost"]})
        model_server.add_script(
            Script(name=f"planner-unknown-{marker}", match=marker, turns=[structured(answer)])
        )

        with pytest.raises(PlannerError, match="plan is invalid") as caught:
            plan(repo, f"{marker} go", worktree_root)

        assert "unknown task 'ghost'" in caught.value.message
        assert caught.value.cost_usd > 0 and caught.value.turns >= 1
        assert list(worktree_root.iterdir()) == []

    def test_cycle(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        answer = plan_tasks(
            {"id": "a", "depends_on": ["b"]},
            {"id": "b", "depends_on": ["a"]},
        )
        model_server.add_script(
            Script(name=f"planner-cycle-{marker}", match=marker, turns=[structured(answer)])
        )

        with pytest.raises(PlannerError, match="dependency cycle: a -> b -> a"):
            plan(repo, f"{marker} go", worktree_root)

    def test_too_many_tasks(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        answer = plan_tasks({"id": "one"}, {"id": "two"}, {"id": "three"})
        model_server.add_script(
            Script(name=f"planner-many-{marker}", match=marker, turns=[structured(answer)])
        )

        with pytest.raises(PlannerError, match="more than --max-tasks 2"):
            plan(repo, f"{marker} go", worktree_root, max_tasks=2)

    def test_path_outside_repo(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        answer = plan_tasks({"id": "escape", "paths": ["../elsewhere.py"]})
        model_server.add_script(
            Script(name=f"planner-escape-{marker}", match=marker, turns=[structured(answer)])
        )

        with pytest.raises(PlannerError, match="leaves the repository"):
            plan(repo, f"{marker} go", worktree_root)

    def test_text_only_answer(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        name = f"planner-text-{marker}"
        model_server.add_script(
            Script(name=name, match=marker, turns=[text("I would split it in two tasks.")])
        )

        with pytest.raises(PlannerError, match="produced no plan") as caught:
            plan(repo, f"{marker} go", worktree_root)

        assert "structured output" in caught.value.message
        assert requests_of(model_server, name), "the planner session never reached the model"
        assert list(worktree_root.iterdir()) == []
