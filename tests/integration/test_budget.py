"""Goal budgets fail closed: once spent, no new task starts, and the report says which."""

from __future__ import annotations

from pathlib import Path

import pytest

from claudecluster.api import run_goal
from claudecluster.models import FailureReason, TaskSpec, TaskStatus, WorkerSettings
from claudecluster.plan import Plan
from claudecluster.testing import Script, ScriptedModelServer, text, tool_use

pytestmark = [pytest.mark.integration, pytest.mark.prefect_server]

# One turn at these token counts costs about $0.90 on Sonnet list prices.
PRICEY = {"input_tokens": 150_000, "output_tokens": 30_000}


@pytest.mark.usefixtures("prefect_backend")
class TestGoalBudget:
    """--budget-usd: tasks after the budget is spent are not started, and are reported."""

    def test_no_task_starts_after_the_budget(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        for name in ("one", "two", "three", "four"):
            model_server.add_script(
                Script(
                    name=f"{marker}-{name}",
                    match=f"{marker}-{name}",
                    turns=[
                        tool_use(
                            "Write",
                            {"file_path": f"{name}.txt", "content": f"{name}\n"},
                            usage=PRICEY,
                        ),
                        text("Done.", usage=PRICEY),
                    ],
                )
            )
        plan = Plan(
            goal="Spend",
            tasks=[
                TaskSpec(id=name, title=name, prompt=f"{marker}-{name} write", paths=[name])
                for name in ("one", "two", "three", "four")
            ],
        )
        per_task_cap = 5.0
        budget = 2.0

        report = run_goal(
            None,
            repo,
            plan=plan,
            max_parallel=1,
            budget_usd=budget,
            settings=WorkerSettings(max_budget_usd=per_task_cap),
            run_id=f"budget-{marker.lower()}",
            worktree_root=worktree_root,
        )

        ran = [t for t in report.tasks if t.status is TaskStatus.SUCCEEDED]
        skipped = [t for t in report.tasks if t.failure_reason is FailureReason.GOAL_BUDGET]
        assert ran, "at least one task ran before the budget was spent"
        assert skipped, "the budget stopped later tasks"
        assert len(ran) + len(skipped) == 4
        assert all(t.status is TaskStatus.SKIPPED for t in skipped)
        assert all(t.cost_usd == 0 for t in skipped)  # never started, never paid
        started_sessions = [
            s for s in model_server.sessions().values() if (s.script or "").startswith(marker)
        ]
        assert len(started_sessions) == len(ran)
        # Spending stopped once the budget was reached: at most one running task's cap over.
        assert report.totals.cost_usd <= budget + per_task_cap
        assert sum(t.cost_usd for t in ran[:-1]) < budget
        assert report.status == "failed"
        assert "budget was spent" in (report.error or "")
        for task in skipped:
            assert "goal's budget" in (task.error or "")
