"""The dispatcher with a fake session runner: real Prefect task runs and git, no CLI.

Fast checks of scheduling itself (dependencies, path leases, width, the goal budget), with
each session played by a handler; the CLI-driven runs are in test_driver.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from prefect import flow

from claudecluster.concurrency import ensure_limits
from claudecluster.dispatch import RunContext, run_tasks
from claudecluster.models import FailureReason, TaskResult, TaskSpec, TaskStatus, WorkerSettings
from claudecluster.plan import Plan, validate_plan
from claudecluster.progress import RunProgress
from claudecluster.session import SessionRequest
from claudecluster.testing import FakeRunner, finished, writes
from tests.conftest import git

pytestmark = [pytest.mark.prefect_server, pytest.mark.usefixtures("prefect_backend")]


def task_of(request: SessionRequest) -> str:
    """The task id a worker prompt frames ("Task <id> (<kind>): ...")."""
    return request.prompt.split("\nTask ", 1)[1].split(" ", 1)[0]


class Recorder:
    """Plays every session: writes ``<id>.txt``, sleeps a little, and records overlaps."""

    def __init__(self, hold_s: float = 0.3, cost_usd: float = 0.01) -> None:
        self.hold_s, self.cost_usd = hold_s, cost_usd
        self.lock = threading.Lock()
        self.running: set[str] = set()
        self.together: list[set[str]] = []
        self.saw: dict[str, set[str]] = {}

    def __call__(self, request: SessionRequest) -> object:
        task_id = task_of(request)
        with self.lock:
            self.running.add(task_id)
            self.together.append(set(self.running))
            self.saw[task_id] = {p.stem for p in request.cwd.glob("*.txt")}
        time.sleep(self.hold_s)
        with self.lock:
            self.running.discard(task_id)
        if task_id.startswith("same"):
            return writes(request, {"shared/notes.md": task_id}, cost_usd=self.cost_usd)
        return writes(request, {f"{task_id}.txt": task_id}, cost_usd=self.cost_usd)


def run_plan(
    repo: Path,
    root: Path,
    plan: Plan,
    runner: FakeRunner,
    *,
    max_parallel: int = 4,
    budget_usd: float | None = None,
) -> dict[str, TaskResult]:
    ensure_limits()
    checked = validate_plan(plan, repo)

    @flow(name="dispatch-logic")
    def driver() -> dict[str, TaskResult]:
        context = RunContext(
            run_id=f"disp-{time.time_ns()}",
            repo=str(repo),
            base_commit=git(repo, "rev-parse", "HEAD").strip(),
            settings=WorkerSettings(retries=0),
            max_parallel=max_parallel,
            worktree_root=str(root),
            runner=runner,
            budget_usd=budget_usd,
        )
        return run_tasks(checked, context, RunProgress(context.run_id))

    return driver()


def spec(task_id: str, *deps: str, paths: list[str] | None = None) -> TaskSpec:
    return TaskSpec(
        id=task_id, title=task_id, prompt=f"do {task_id}", depends_on=list(deps), paths=paths or []
    )


class TestScheduling:
    """What starts when: dependencies, leases, width, budget."""

    def test_dependencies_start_from_their_work_and_independent_tasks_overlap(
        self, repo: Path, worktree_root: Path
    ) -> None:
        recorder = Recorder()
        plan = Plan(tasks=[spec("a"), spec("b"), spec("c", "a", "b")])

        results = run_plan(repo, worktree_root, plan, FakeRunner(recorder))

        assert {t: r.status for t, r in results.items()} == dict.fromkeys(
            "abc", TaskStatus.SUCCEEDED
        )
        assert recorder.saw["c"] == {"a", "b"}  # c started from a's and b's merged work
        assert any({"a", "b"} <= group for group in recorder.together)
        assert not any("c" in group and len(group) > 1 for group in recorder.together)

    def test_overlapping_paths_never_run_together(self, repo: Path, worktree_root: Path) -> None:
        recorder = Recorder()
        plan = Plan(
            tasks=[spec("same-1", paths=["shared"]), spec("same-2", paths=["shared/notes.md"])]
        )
        run_plan(repo, worktree_root, plan, FakeRunner(recorder))
        assert all(len(group) == 1 for group in recorder.together), recorder.together

    def test_width_caps_concurrent_sessions(self, repo: Path, worktree_root: Path) -> None:
        recorder = Recorder(hold_s=0.2)
        plan = Plan(tasks=[spec(f"w{i}") for i in range(5)])
        run_plan(repo, worktree_root, plan, FakeRunner(recorder), max_parallel=2)
        assert max(len(group) for group in recorder.together) == 2

    def test_a_failed_dependency_skips_its_dependents(
        self, repo: Path, worktree_root: Path
    ) -> None:
        def handler(request: SessionRequest) -> object:
            if task_of(request) == "broken":
                return finished(ok=False, failure_reason=FailureReason.MAX_TURNS, error="limit")
            return writes(request, {f"{task_of(request)}.txt": "x"})

        plan = Plan(tasks=[spec("broken"), spec("after", "broken"), spec("free")])
        results = run_plan(repo, worktree_root, plan, FakeRunner(handler))
        assert results["broken"].status is TaskStatus.FAILED
        assert results["after"].status is TaskStatus.SKIPPED
        assert results["after"].failure_reason is FailureReason.DEPENDENCY_FAILED
        assert results["free"].status is TaskStatus.SUCCEEDED

    def test_no_session_starts_once_the_goal_budget_is_spent(
        self, repo: Path, worktree_root: Path
    ) -> None:
        # The first session runs alone (its cost is not known yet), then more while a
        # session's cost still fits: 0.01 + 0.01 of 0.025, and no third.
        runner = FakeRunner(Recorder(hold_s=0.05, cost_usd=0.01))
        plan = Plan(tasks=[spec(f"b{i}") for i in range(4)])
        results = run_plan(repo, worktree_root, plan, runner, max_parallel=4, budget_usd=0.025)
        ran = [t for t, r in results.items() if r.status is TaskStatus.SUCCEEDED]
        skipped = [t for t, r in results.items() if r.failure_reason is FailureReason.GOAL_BUDGET]
        assert len(ran) == 2 and len(skipped) == 2, results
        assert len(runner.requests) == 2
        assert sum(r.cost_usd for r in results.values()) <= 0.025
