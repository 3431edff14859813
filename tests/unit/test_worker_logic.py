"""The worker's and integration's logic with a fake session runner: real git, no CLI, no Prefect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from claudecluster.errors import StartRefusedError
from claudecluster.integrate import Integration, IntegrationOutcome, integrate
from claudecluster.models import (
    Dependency,
    FailureReason,
    TaskResult,
    TaskSpec,
    TaskStatus,
    WorkerSettings,
    WorkUnit,
)
from claudecluster.plan import Plan
from claudecluster.resolve import Resolution, resolve_conflict
from claudecluster.session import SessionHost, SessionRequest
from claudecluster.target import open_target
from claudecluster.testing import FakeRunner, stopped, writes
from claudecluster.worker import execute_task, result_from_branch
from tests.conftest import git, snapshot

PASSING = "python -c 'pass'"
FAILING = "python -c 'raise SystemExit(3)'"


def unit_for(repo: Path, root: Path, task_id: str = "t1", **fields: object) -> WorkUnit:
    values: dict[str, object] = {
        "run_id": "run-unit",
        "spec": TaskSpec(id=task_id, title=f"Task {task_id}", prompt=f"do {task_id}"),
        "repo": str(repo),
        "base_commit": "HEAD",
        "worktree_root": str(root),
    }
    return WorkUnit.model_validate(values | fields)


def run(unit: WorkUnit, runner: FakeRunner, **host: object) -> TaskResult:
    return asyncio.run(execute_task(unit, host=SessionHost(runner=runner, **host)))  # type: ignore[arg-type]


class TestWorker:
    """execute_task: one worktree, one session, one commit, one verify."""

    def test_changes_are_committed_on_the_task_branch(
        self, repo: Path, worktree_root: Path
    ) -> None:
        before = snapshot(repo)
        runner = FakeRunner(lambda r: writes(r, {"notes.md": "hello\n"}))

        result = run(unit_for(repo, worktree_root, verify=PASSING), runner)

        assert result.status is TaskStatus.SUCCEEDED
        assert result.branch == "claudecluster/run-unit/t1"
        assert [f.path for f in result.files] == ["notes.md"]
        assert result.test_report is not None and result.test_report.ok
        assert result.cost_usd == 0.01 and result.turns == 2
        assert git(repo, "show", f"{result.branch}:notes.md") == "hello\n"
        message = git(repo, "log", "-1", "--format=%B", result.branch)
        assert "ClaudeCluster-Task: t1" in message and "ClaudeCluster-Run: run-unit" in message
        assert not (worktree_root / "run-unit" / "t1").exists()
        assert snapshot(repo) == before

    def test_the_session_gets_the_task_frame_and_the_hosts_credentials(
        self, repo: Path, worktree_root: Path
    ) -> None:
        runner = FakeRunner()
        run(
            unit_for(repo, worktree_root, verify=PASSING),
            runner,
            env={"ANTHROPIC_API_KEY": "sk-test"},
        )
        [request] = runner.requests
        assert "Task t1 (other): Task t1" in request.prompt
        assert f"check your work with: {PASSING}" in request.prompt
        assert request.env == {"ANTHROPIC_API_KEY": "sk-test"}
        assert "sk-test" not in repr(request)
        assert request.cwd == worktree_root / "run-unit" / "t1"

    def test_nothing_changed_is_no_changes_and_leaves_no_branch(
        self, repo: Path, worktree_root: Path
    ) -> None:
        result = run(unit_for(repo, worktree_root), FakeRunner())
        assert result.status is TaskStatus.NO_CHANGES
        assert result.branch is None
        assert "claudecluster/run-unit/t1" not in git(repo, "branch", "--list")

    def test_work_of_a_session_stopped_at_a_limit_is_kept(
        self, repo: Path, worktree_root: Path
    ) -> None:
        runner = FakeRunner(
            lambda r: (
                writes(r, {"half.py": "x = 1\n"})
                and stopped(
                    FailureReason.MAX_TURNS, "stopped at the turn limit after 3 turns", turns=3
                )
            )
        )
        result = run(unit_for(repo, worktree_root, verify=PASSING), runner)
        assert result.status is TaskStatus.FAILED
        assert result.failure_reason is FailureReason.MAX_TURNS
        assert result.branch and git(repo, "show", f"{result.branch}:half.py") == "x = 1\n"
        assert result.test_report is None  # no verify after a session that did not finish

    def test_a_failing_verify_fails_the_task(self, repo: Path, worktree_root: Path) -> None:
        runner = FakeRunner(lambda r: writes(r, {"a.txt": "a\n"}))
        result = run(unit_for(repo, worktree_root, verify=FAILING), runner)
        assert result.status is TaskStatus.FAILED
        assert result.failure_reason is FailureReason.VERIFY_FAILED
        assert result.test_report is not None and result.test_report.exit_code == 3

    def test_the_tasks_own_verify_wins(self, repo: Path, worktree_root: Path) -> None:
        spec = TaskSpec(id="own", title="Own", prompt="do it", verify=PASSING)
        runner = FakeRunner(lambda r: writes(r, {"b.txt": "b\n"}))
        result = run(unit_for(repo, worktree_root, spec=spec, verify=FAILING), runner)
        assert result.status is TaskStatus.SUCCEEDED
        assert result.test_report is not None and result.test_report.command == PASSING

    def test_a_refused_start_skips_the_task_and_cleans_up(
        self, repo: Path, worktree_root: Path
    ) -> None:
        @asynccontextmanager
        async def refused() -> AsyncIterator[None]:
            raise StartRefusedError("not started: budget spent", failure_reason="goal_budget")
            yield  # pragma: no cover

        runner = FakeRunner()
        result = run(unit_for(repo, worktree_root), runner, slot=refused)
        assert result.status is TaskStatus.SKIPPED
        assert result.failure_reason is FailureReason.GOAL_BUDGET
        assert runner.requests == []  # no session ran
        assert "claudecluster/run-unit/t1" not in git(repo, "branch", "--list")
        assert not (worktree_root / "run-unit" / "t1").exists()

    def test_the_slot_hears_every_turn_and_the_cost(self, repo: Path, worktree_root: Path) -> None:
        heard: list[tuple[str, float]] = []

        class Watch:
            def turn(self, cost_usd: float) -> None:
                heard.append(("turn", cost_usd))

            def spend(self, usd: float) -> None:
                heard.append(("spend", usd))

        @asynccontextmanager
        async def slot() -> AsyncIterator[Watch]:
            yield Watch()

        run(unit_for(repo, worktree_root), FakeRunner(), slot=slot)
        assert heard == [("turn", 0.005), ("turn", 0.01), ("spend", 0.01)]

    def test_a_stop_at_a_turn_keeps_the_work_and_counts_the_attempt(
        self, repo: Path, worktree_root: Path
    ) -> None:
        class StopAtSecond:
            def turn(self, cost_usd: float) -> tuple[FailureReason, str] | None:
                if cost_usd < 0.02:
                    return None
                return (FailureReason.GOAL_BUDGET, "stopped: the goal's budget was spent")

            def spend(self, usd: float) -> None:
                pass

        @asynccontextmanager
        async def slot() -> AsyncIterator[StopAtSecond]:
            yield StopAtSecond()

        runner = FakeRunner(lambda r: writes(r, {"part.py": "x = 1\n"}, turns=4, cost_usd=0.04))
        result = run(unit_for(repo, worktree_root, verify=PASSING), runner, slot=slot)
        assert result.status is TaskStatus.FAILED
        assert result.failure_reason is FailureReason.GOAL_BUDGET
        assert result.branch and git(repo, "show", f"{result.branch}:part.py") == "x = 1\n"
        assert result.cost_usd == 0.02 and result.turns == 2
        [attempt] = result.attempts
        assert (attempt.outcome, attempt.cost_usd, attempt.turns) == ("stopped", 0.02, 2)

    def test_a_task_starts_from_its_dependencies_work(
        self, repo: Path, worktree_root: Path
    ) -> None:
        first = run(
            unit_for(repo, worktree_root, "a"), FakeRunner(lambda r: writes(r, {"a.txt": "A\n"}))
        )
        second = run(
            unit_for(repo, worktree_root, "b"), FakeRunner(lambda r: writes(r, {"b.txt": "B\n"}))
        )
        seen: list[bool] = []

        def check(request: SessionRequest) -> None:
            seen.append((request.cwd / "a.txt").exists() and (request.cwd / "b.txt").exists())

        deps = [Dependency.of(first), Dependency.of(second)]
        result = run(unit_for(repo, worktree_root, "c", dependencies=deps), FakeRunner(check))
        assert seen == [True]
        assert result.status is TaskStatus.NO_CHANGES
        assert result.base_commit != git(repo, "rev-parse", "HEAD").strip()


class TestResultFromBranch:
    """A task's result rebuilt from its branch alone (its worker ran elsewhere, its record
    was lost): what the commit's trailers say, the diff, and the verify run again."""

    def test_a_finished_session(self, repo: Path, worktree_root: Path) -> None:
        unit = unit_for(repo, worktree_root, verify=PASSING)
        runner = FakeRunner(
            lambda r: writes(r, {"notes.md": "hi\n"}, turns=3, cost_usd=0.25, duration_s=7.25)
        )
        ran = run(unit, runner)

        rebuilt = result_from_branch(unit, open_target(str(repo)), worktree_root)

        assert rebuilt is not None
        assert rebuilt.status is TaskStatus.SUCCEEDED
        assert (rebuilt.branch, rebuilt.head_commit) == (ran.branch, ran.head_commit)
        assert (rebuilt.cost_usd, rebuilt.turns, rebuilt.duration_s) == (0.25, 3, 7.2)
        assert [f.path for f in rebuilt.files] == ["notes.md"] and "+hi" in rebuilt.diff
        assert rebuilt.test_report is not None and rebuilt.test_report.command == PASSING

    def test_a_stopped_session_keeps_its_reason_and_is_not_verified(
        self, repo: Path, worktree_root: Path
    ) -> None:
        unit = unit_for(repo, worktree_root, verify=PASSING)
        runner = FakeRunner(
            lambda r: (
                writes(r, {"half.py": "x = 1\n"})
                and stopped(FailureReason.TIMEOUT, "timed out", turns=4, cost_usd=0.5)
            )
        )
        run(unit, runner)

        rebuilt = result_from_branch(unit, open_target(str(repo)), worktree_root)

        assert rebuilt is not None
        assert (rebuilt.status, rebuilt.failure_reason) == (
            TaskStatus.FAILED,
            FailureReason.TIMEOUT,
        )
        assert (rebuilt.cost_usd, rebuilt.turns) == (0.5, 4)
        assert rebuilt.test_report is None

    def test_another_units_commit_is_not_taken(self, repo: Path, worktree_root: Path) -> None:
        unit = unit_for(repo, worktree_root)
        run(unit, FakeRunner(lambda r: writes(r, {"a.txt": "a\n"})))
        changed = unit.model_copy(
            update={"spec": unit.spec.model_copy(update={"prompt": "something else"})}
        )
        assert result_from_branch(changed, open_target(str(repo)), worktree_root) is None


def merged_branches(repo: Path, root: Path, contents: dict[str, str]) -> dict[str, TaskResult]:
    """One succeeded task per entry, each writing its content to the same file."""
    results = {}
    for task_id, content in contents.items():
        result = run(
            unit_for(repo, root, task_id),
            FakeRunner(lambda r, c=content: writes(r, {"calc.py": c})),
        )
        assert result.status is TaskStatus.SUCCEEDED
        results[task_id] = result
    return results


def plan_of(*task_ids: str) -> Plan:
    return Plan(tasks=[TaskSpec(id=t, title=f"Task {t}", prompt=f"do {t}") for t in task_ids])


def session_resolver(runner: FakeRunner) -> Callable[..., Resolution]:
    def resolver(
        worktree: Path, files: list[str], task: TaskSpec, others: list[TaskSpec], verify: str | None
    ) -> Resolution:
        return asyncio.run(
            resolve_conflict(
                worktree,
                files,
                task,
                others,
                verify,
                settings=WorkerSettings(),
                host=SessionHost(runner=runner),
            )
        )

    return resolver


def integrate_left_right(
    repo: Path,
    root: Path,
    results: dict[str, TaskResult],
    runner: FakeRunner,
    verify: str | None = None,
) -> IntegrationOutcome:
    return integrate(
        repo,
        git(repo, "rev-parse", "HEAD").strip(),
        "run-unit",
        plan_of("left", "right"),
        results,
        verify=verify,
        verify_timeout_s=60,
        worktree_root=root,
        resolver=session_resolver(runner),
    )


class TestIntegration:
    """integrate: dependency order, conflicts resolved by a session or kept aside."""

    def test_a_conflict_is_resolved_by_the_resolution_session(
        self, repo: Path, worktree_root: Path
    ) -> None:
        results = merged_branches(repo, worktree_root, {"left": "L = 1\n", "right": "R = 2\n"})
        runner = FakeRunner(lambda r: writes(r, {"calc.py": "L = 1\nR = 2\n"}))

        outcome = integrate_left_right(repo, worktree_root, results, runner, verify=PASSING)

        assert outcome.merged == ["left", "right"] and outcome.resolved == ["right"]
        assert outcome.unmerged == []
        assert git(repo, "show", f"{outcome.branch}:calc.py") == "L = 1\nR = 2\n"
        [request] = runner.requests
        assert "Resolve the merge conflict in: calc.py" in request.prompt
        assert "task left" in request.prompt
        assert outcome.final_verify is not None and outcome.final_verify.ok

    def test_markers_left_in_place_keep_the_branch_unmerged(
        self, repo: Path, worktree_root: Path
    ) -> None:
        results = merged_branches(repo, worktree_root, {"left": "L = 1\n", "right": "R = 2\n"})
        # The resolution session changes nothing: the markers remain.
        outcome = integrate_left_right(repo, worktree_root, results, FakeRunner())
        assert outcome.merged == ["left"]
        [kept] = outcome.unmerged
        assert kept.id == "right" and kept.conflicting_files == ["calc.py"]
        assert "conflict markers remain in calc.py" in kept.reason
        assert git(repo, "rev-parse", kept.branch or "").strip() == results["right"].head_commit


class TestEarlyMerges:
    """Integration while the run goes on: the same outcome as merging everything at the end."""

    def open(self, repo: Path, root: Path, *task_ids: str) -> Integration:
        head = git(repo, "rev-parse", "HEAD").strip()
        return Integration(repo, head, "run-unit", plan_of(*task_ids), worktree_root=root)

    def test_finished_tasks_are_merged_in_order_before_the_end(
        self, repo: Path, worktree_root: Path
    ) -> None:
        results = merged_branches(repo, worktree_root, {"a": "A = 1\n"})
        for t in ("b", "c"):
            runner = FakeRunner(lambda r, t=t: writes(r, {f"{t}.py": "x\n"}))
            results[t] = run(unit_for(repo, worktree_root, t), runner)
        with self.open(repo, worktree_root, "a", "b", "c") as integration:
            # b finished before a: nothing may be merged until a is, to keep the order.
            integration.offer({"b": results["b"]})
            integration.offer({"a": results["a"], "b": results["b"]})
            integration._stop()  # let the thread finish what it was offered
            early = git(repo, "log", "--first-parent", "--format=%s", integration.branch)
            outcome = integration.finish(results, verify=PASSING, verify_timeout_s=60)

        assert early.splitlines()[:2] == ["Merge task b: Task b", "Merge task a: Task a"]
        assert outcome.merged == ["a", "b", "c"] and outcome.unmerged == []
        assert outcome.final_verify is not None and outcome.final_verify.ok
        log = git(repo, "log", "--first-parent", "--format=%s", outcome.branch).splitlines()
        assert log[:3] == [f"Merge task {t}: Task {t}" for t in ("c", "b", "a")]
        assert not (worktree_root / "run-unit" / "integration").exists()

    def test_a_conflict_waits_for_the_end_and_is_resolved_there(
        self, repo: Path, worktree_root: Path
    ) -> None:
        results = merged_branches(repo, worktree_root, {"left": "L = 1\n", "right": "R = 2\n"})
        later = FakeRunner(lambda r: writes(r, {"later.py": "x\n"}))
        results["later"] = run(unit_for(repo, worktree_root, "later"), later)
        runner = FakeRunner(lambda r: writes(r, {"calc.py": "L = 1\nR = 2\n"}))

        with self.open(repo, worktree_root, "left", "right", "later") as integration:
            integration.offer(results)
            integration._stop()
            assert runner.requests == []  # no resolution session while the run goes on
            early = git(repo, "log", "--first-parent", "--format=%s", integration.branch)
            outcome = integration.finish(
                results, verify=None, verify_timeout_s=60, resolver=session_resolver(runner)
            )

        # Nothing after the conflict was merged early: the order is kept.
        assert early.splitlines()[0] == "Merge task left: Task left"
        assert outcome.merged == ["left", "right", "later"] and outcome.resolved == ["right"]
        assert git(repo, "show", f"{outcome.branch}:calc.py") == "L = 1\nR = 2\n"

    def test_a_branch_not_here_yet_stops_the_early_merges(
        self, repo: Path, worktree_root: Path
    ) -> None:
        results = merged_branches(repo, worktree_root, {"a": "A = 1\n"})
        elsewhere = results["a"].model_copy(update={"branch": "claudecluster/run-unit/not-fetched"})

        with self.open(repo, worktree_root, "a") as integration:
            integration.offer({"a": elsewhere})
            integration._stop()
            assert integration._next == 0  # offered again at the end, once fetched
            outcome = integration.finish(results, verify=None, verify_timeout_s=60)

        assert outcome.merged == ["a"]
