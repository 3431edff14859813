"""The Driver (the goal flow) end to end: real CLI, real git, a real Prefect server.

Every task's prompt carries a token ``<marker:task-id>`` that its script matches, so each
session is answered by its own script and ``model_server.sessions()`` tells them apart.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.client.schemas.objects import Artifact, FlowRun, TaskRun

from claudecluster.api import run_goal
from claudecluster.models import (
    FailureReason,
    RunReport,
    RunStatus,
    TaskResult,
    TaskSpec,
    TaskStatus,
    WorkerSettings,
    WorkUnit,
)
from claudecluster.naming import artifact_scope
from claudecluster.plan import Plan
from claudecluster.testing import (
    Entry,
    RequestView,
    Script,
    ScriptedModelServer,
    Turn,
    TurnFactory,
    structured,
    text,
    tool_use,
    tool_uses,
)
from claudecluster.testing.model_server import RecordedRequest, SessionSummary
from tests.conftest import SAMPLE_FILES, git, snapshot

# Every run must land on the session's test server: without PREFECT_API_URL, run_goal would
# start ClaudeCluster's embedded server instead (and leave it running).
pytestmark = [
    pytest.mark.integration,
    pytest.mark.prefect_server,
    pytest.mark.usefixtures("prefect_backend"),
]

VERIFY = "python -m pytest -q"
LATENCY_S = 1.5


# --------------------------------------------------------------------------- helpers


def token(marker: str, task_id: str) -> str:
    """The string a task's prompt carries and its script matches."""
    return f"<{marker}:{task_id}>"


def task(
    marker: str,
    task_id: str,
    *depends_on: str,
    paths: list[str] | None = None,
    title: str | None = None,
    kind: str = "other",
) -> dict[str, Any]:
    """A plan-file task entry whose prompt names its script."""
    return {
        "id": task_id,
        "kind": kind,
        "title": title or f"Task {task_id}",
        "prompt": f"{token(marker, task_id)} do {task_id}",
        "paths": paths or [],
        "depends_on": list(depends_on),
    }


def make_plan(goal: str, *tasks: dict[str, Any], verify: str | None = None) -> Plan:
    return Plan.model_validate({"goal": goal, "verify": verify, "tasks": list(tasks)})


def add_script(
    model_server: ScriptedModelServer, marker: str, task_id: str, turns: list[Entry]
) -> None:
    name = token(marker, task_id)
    model_server.add_script(Script(name=name, match=name, turns=turns))


def write_turns(path: str, content: str, latency_s: float | None = None) -> list[Entry]:
    """Write a new file, then finish; each of the two replies comes after ``latency_s``."""
    return [
        tool_use("Write", {"file_path": path, "content": content}, latency_s=latency_s),
        text(f"Wrote {path}.", latency_s=latency_s),
    ]


class Rendezvous:
    """Holds a reply until ``parties`` distinct sessions have asked for it, or a timeout.

    Sessions that meet here were provably talking to the model at the same time, whatever
    the machine's load does to the CLI's start-up time; sessions that never run together
    each wait ``timeout_s`` and ``met`` stays False.
    """

    def __init__(self, parties: int, timeout_s: float = 20.0) -> None:
        self.parties = parties
        self.timeout_s = timeout_s
        self._sessions: set[str | None] = set()
        self._lock = threading.Lock()
        self._all_here = threading.Event()

    @property
    def met(self) -> bool:
        """Whether all parties were here at once."""
        return self._all_here.is_set()

    def hold(self, turn: Turn) -> TurnFactory:
        """A script entry that answers ``turn`` once everyone has arrived."""

        def factory(view: RequestView) -> Turn:
            with self._lock:
                self._sessions.add(view.session_id)
                if len(self._sessions) >= self.parties:
                    self._all_here.set()
            self._all_here.wait(self.timeout_s)
            return turn

        return factory


def meet_then_write(rendezvous: Rendezvous, path: str, latency_s: float = 0.0) -> list[Entry]:
    """Wait for the other parties, write a new file, then finish after ``latency_s``."""
    return [
        rendezvous.hold(tool_use("Write", {"file_path": path, "content": "x\n"})),
        text(f"Wrote {path}.", latency_s=latency_s),
    ]


def edit_turns(path: str, old: str, new: str) -> list[Entry]:
    """Read a file, replace ``old`` by ``new`` in it, then finish."""
    return [
        tool_use("Read", {"file_path": path}),
        tool_use("Edit", {"file_path": path, "old_string": old, "new_string": new}),
        text(f"Edited {path}."),
    ]


def run_id_for(marker: str) -> str:
    """A run id of its own for each test (lowercase, as branch and artifact keys need)."""
    return f"t-{marker.lower()}"


def run(
    repo: Path,
    worktree_root: Path,
    run_id: str,
    *,
    max_parallel: int,
    plan: Plan | None = None,
    plan_file: Path | None = None,
    goal: str | None = None,
    verify: str | None = None,
) -> RunReport:
    return run_goal(
        goal,
        repo,
        plan=plan,
        plan_file=plan_file,
        verify=verify,
        max_parallel=max_parallel,
        run_id=run_id,
        worktree_root=worktree_root,
    )


def results(report: RunReport) -> dict[str, TaskResult]:
    return {result.id: result for result in report.tasks}


def session_of(model_server: ScriptedModelServer, marker: str, task_id: str) -> SessionSummary:
    """The one finished session a task's script answered."""
    name = token(marker, task_id)
    found = [s for s in model_server.sessions().values() if s.script == name]
    assert len(found) == 1, f"expected one session for {task_id}, got {found}"
    assert found[0].last_ended_at is not None
    assert found[0].turns_served >= 2, found[0]
    return found[0]


def overlap(a: SessionSummary, b: SessionSummary) -> bool:
    """Whether two sessions talked to the model at the same time."""
    assert a.last_ended_at is not None and b.last_ended_at is not None
    return a.first_started_at < b.last_ended_at and b.first_started_at < a.last_ended_at


def served(model_server: ScriptedModelServer, marker: str, task_id: str) -> list[RecordedRequest]:
    """The requests a task's script answered, in order."""
    return [r for r in model_server.requests if r.script == token(marker, task_id)]


def first_parent_subjects(repo: Path, branch: str) -> list[str]:
    """Commit subjects along the branch's first-parent line, oldest first."""
    return git(repo, "log", "--first-parent", "--reverse", "--format=%s", branch).splitlines()


def read_artifacts(keys: Iterable[str]) -> dict[str, Artifact]:
    """Artifacts by key, read back from the Prefect server (the latest of each key)."""

    async def read() -> list[Artifact]:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(keys)))
            )

    found: dict[str, Artifact] = {}
    for artifact in sorted(asyncio.run(read()), key=lambda a: a.created or 0):
        assert artifact.key is not None
        found[artifact.key] = artifact
    return found


def read_flow_run(flow_run_id: str) -> tuple[FlowRun, list[TaskRun]]:
    """A flow run and its task runs, read back from the Prefect server."""

    async def read() -> tuple[FlowRun, list[TaskRun]]:
        async with get_client() as client:
            flow_run = await client.read_flow_run(UUID(flow_run_id))
            task_runs = await client.read_task_runs(
                task_run_filter=TaskRunFilter(
                    flow_run_id=TaskRunFilterFlowRunId(any_=[UUID(flow_run_id)])
                )
            )
            return flow_run, task_runs

    return asyncio.run(read())


def table(artifact: Artifact) -> list[dict[str, Any]]:
    """A table artifact's rows (Prefect stores them as a JSON string)."""
    data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert isinstance(data, list)
    return data


def markdown_rows(text: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in ``text``, by column header."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(lines) >= 2, text

    def cells(line: str) -> list[str]:
        return [cell.strip() for cell in line.strip().strip("|").split("|")]

    header = cells(lines[0])
    return [dict(zip(header, cells(line), strict=True)) for line in lines[2:]]


# --------------------------------------------------------------------------- scheduling


class TestParallelism:
    """Independent tasks run at the same time, up to max_parallel."""

    IDS = ("one", "two", "three")

    def test_three_tasks_overlap(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        rendezvous = Rendezvous(parties=3)
        for task_id in self.IDS:
            add_script(
                model_server,
                marker,
                task_id,
                meet_then_write(rendezvous, f"{task_id}.txt", LATENCY_S),
            )
        plan = make_plan("three files", *(task(marker, t) for t in self.IDS))

        report = run(repo, worktree_root, run_id_for(marker), max_parallel=3, plan=plan)

        assert report.status is RunStatus.SUCCEEDED, report.error
        assert rendezvous.met, "the three sessions never ran at the same time"
        sessions = [session_of(model_server, marker, t) for t in self.IDS]
        # All three were talking to the model at one moment.
        latest_start = max(s.first_started_at for s in sessions)
        earliest_end = min(s.last_ended_at or 0 for s in sessions)
        assert latest_start < earliest_end, [
            (s.first_started_at, s.last_ended_at) for s in sessions
        ]

    def test_max_parallel_one_never_overlaps(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        for task_id in self.IDS:
            add_script(model_server, marker, task_id, write_turns(f"{task_id}.txt", "x\n", 0.75))
        plan = make_plan("three files", *(task(marker, t) for t in self.IDS))

        report = run(repo, worktree_root, run_id_for(marker), max_parallel=1, plan=plan)

        assert report.status is RunStatus.SUCCEEDED, report.error
        sessions = [session_of(model_server, marker, t) for t in self.IDS]
        for i, a in enumerate(sessions):
            for b in sessions[i + 1 :]:
                assert not overlap(a, b), (a, b)
        # One at a time, in plan order.
        starts = [s.first_started_at for s in sessions]
        assert starts == sorted(starts)


class TestLeases:
    """Tasks whose paths overlap never run at the same time; unrelated ones still do."""

    @pytest.mark.parametrize(
        ("first", "second"),
        [(["calc.py"], ["calc.py"]), (["pkg"], ["pkg/util.py"])],
        ids=["same-file", "folder-and-file"],
    )
    def test_overlapping_paths_are_serialised(
        self,
        make_repo: Callable[..., Path],
        worktree_root: Path,
        model_server: ScriptedModelServer,
        marker: str,
        first: list[str],
        second: list[str],
    ) -> None:
        repo = make_repo({**SAMPLE_FILES, "pkg/util.py": "def util():\n    return 1\n"})
        # "first" and "other" must meet; "second" must wait for "first" to end.
        rendezvous = Rendezvous(parties=2)
        add_script(
            model_server, marker, "first", meet_then_write(rendezvous, "first.txt", LATENCY_S)
        )
        add_script(model_server, marker, "other", meet_then_write(rendezvous, "other.txt"))
        add_script(model_server, marker, "second", write_turns("second.txt", "x\n", LATENCY_S))
        plan = make_plan(
            "leases",
            task(marker, "first", paths=first),
            task(marker, "second", paths=second),
            task(marker, "other", paths=["strings.py"]),
        )

        report = run(repo, worktree_root, run_id_for(marker), max_parallel=3, plan=plan)

        assert report.status is RunStatus.SUCCEEDED, report.error
        a, b, other = (session_of(model_server, marker, t) for t in ("first", "second", "other"))
        assert not overlap(a, b), (a, b)
        assert a.last_ended_at is not None and b.first_started_at >= a.last_ended_at
        assert rendezvous.met, "the unrelated task did not run beside the first one"
        assert overlap(other, a)


class TestDependencies:
    """A task runs after its dependencies, on top of their work."""

    def test_dependent_starts_after_and_sees_the_work(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        add_script(model_server, marker, "make", write_turns("feature.py", "FEATURE = 'from-a'\n"))
        add_script(model_server, marker, "extend", edit_turns("feature.py", "from-a", "from-b"))
        plan = make_plan(
            "feature",
            task(marker, "extend", "make", paths=["feature.py"]),
            task(marker, "make", paths=["feature.py"]),
        )

        report = run(repo, worktree_root, run_id_for(marker), max_parallel=3, plan=plan)

        assert report.status is RunStatus.SUCCEEDED, report.error
        made, extended = (
            session_of(model_server, marker, "make"),
            session_of(model_server, marker, "extend"),
        )
        assert made.last_ended_at is not None
        assert extended.first_started_at >= made.last_ended_at
        # The dependent's Read saw the file its dependency wrote, and its Edit applied.
        requests = served(model_server, marker, "extend")
        read_result = requests[1].view.tool_results()[0]
        assert "FEATURE = 'from-a'" in read_result.content and not read_result.is_error
        edit_result = requests[2].view.tool_results()[0]
        assert not edit_result.is_error, edit_result.content
        by_id = results(report)
        assert by_id["extend"].base_commit == by_id["make"].head_commit
        assert "-FEATURE = 'from-a'" in by_id["extend"].diff
        assert "+FEATURE = 'from-b'" in by_id["extend"].diff
        assert report.integration_branch is not None
        assert git(repo, "show", f"{report.integration_branch}:feature.py") == (
            "FEATURE = 'from-b'\n"
        )

    def test_two_dependencies_are_combined(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        add_script(model_server, marker, "left", write_turns("left.txt", "LEFT\n"))
        add_script(model_server, marker, "right", write_turns("right.txt", "RIGHT\n"))
        add_script(
            model_server,
            marker,
            "top",
            [
                tool_uses(
                    [("Read", {"file_path": "left.txt"}), ("Read", {"file_path": "right.txt"})]
                ),
                tool_use("Write", {"file_path": "top.txt", "content": "TOP\n"}),
                text("Done."),
            ],
        )
        plan = make_plan(
            "diamond",
            task(marker, "left"),
            task(marker, "right"),
            task(marker, "top", "left", "right"),
        )

        report = run(repo, worktree_root, run_id_for(marker), max_parallel=3, plan=plan)

        assert report.status is RunStatus.SUCCEEDED, report.error
        top = session_of(model_server, marker, "top")
        for dep in ("left", "right"):
            ended = session_of(model_server, marker, dep).last_ended_at
            assert ended is not None and top.first_started_at >= ended
        reads = served(model_server, marker, "top")[1].view.tool_results()
        assert len(reads) == 2 and not any(r.is_error for r in reads)
        contents = " ".join(r.content for r in reads)
        assert "LEFT" in contents and "RIGHT" in contents
        assert report.integration_branch is not None
        tree = git(repo, "ls-tree", "-r", "--name-only", report.integration_branch).split()
        assert {"left.txt", "right.txt", "top.txt"} <= set(tree)
        assert [f.path for f in results(report)["top"].files] == ["top.txt"]

    def test_dependencies_that_do_not_combine(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        add_script(model_server, marker, "swap", edit_turns("calc.py", "a + b", "b + a"))
        add_script(model_server, marker, "paren", edit_turns("calc.py", "a + b", "(a) + (b)"))
        add_script(model_server, marker, "both", write_turns("both.txt", "x\n"))
        plan = make_plan(
            "clash",
            task(marker, "swap"),
            task(marker, "paren"),
            task(marker, "both", "swap", "paren"),
        )

        report = run(repo, worktree_root, run_id_for(marker), max_parallel=3, plan=plan)

        assert report.status is RunStatus.FAILED
        by_id = results(report)
        assert by_id["swap"].status is TaskStatus.SUCCEEDED
        assert by_id["paren"].status is TaskStatus.SUCCEEDED
        assert by_id["both"].status is TaskStatus.ERROR
        assert by_id["both"].failure_reason is FailureReason.DEPENDENCY_FAILED
        assert "does not combine" in (by_id["both"].error or "")
        assert "calc.py" in (by_id["both"].error or "")
        assert served(model_server, marker, "both") == []  # no session was paid for
        # The attempt to combine them left no worktree behind.
        assert git(repo, "worktree", "list").count("\n") == 1
        assert [u.id for u in report.unmerged] == ["paren"]

    def test_failed_dependency_skips_dependents(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        add_script(model_server, marker, "break", edit_turns("calc.py", "a + b", "a * b"))
        add_script(model_server, marker, "after", write_turns("after.txt", "x\n"))
        add_script(model_server, marker, "later", write_turns("later.txt", "x\n"))
        add_script(model_server, marker, "apart", write_turns("apart.txt", "x\n"))
        plan = make_plan(
            "break things",
            task(marker, "break"),
            task(marker, "after", "break"),
            task(marker, "later", "after"),
            task(marker, "apart"),
            verify=VERIFY,
        )

        report = run(repo, worktree_root, run_id_for(marker), max_parallel=3, plan=plan)

        assert report.status is RunStatus.FAILED
        by_id = results(report)
        assert by_id["break"].status is TaskStatus.FAILED
        assert by_id["break"].failure_reason is FailureReason.VERIFY_FAILED
        for skipped in ("after", "later"):
            assert by_id[skipped].status is TaskStatus.SKIPPED
            assert by_id[skipped].failure_reason is FailureReason.DEPENDENCY_FAILED
            assert served(model_server, marker, skipped) == []  # its session never started
        assert "break" in (by_id["after"].error or "")
        assert "after" in (by_id["later"].error or "")
        # The independent task still ran and was merged; the failed one was kept aside.
        assert by_id["apart"].status is TaskStatus.SUCCEEDED
        assert report.integration_branch is not None
        assert git(repo, "show", f"{report.integration_branch}:apart.txt") == "x\n"
        assert [u.id for u in report.unmerged] == ["break"]
        assert "verify_failed" in report.unmerged[0].reason
        assert report.error and "break" in report.error


class TestConcurrentWorktrees:
    """Parallel workers create and remove their worktrees at the same moment, safely."""

    def test_parallel_worktree_add_and_remove(self, repo: Path, worktree_root: Path) -> None:
        # What the goal flow's parallel workers do to the one repository when tasks start and
        # finish together (gitops.add_worktree, then remove_worktree with its prune), without
        # the sessions in between, so the race is hit every time instead of now and then.
        from claudecluster import gitops

        git_repo = gitops.open_repo(repo)
        base = gitops.resolve_commit(git_repo)
        errors: list[str] = []

        def worker(run_id: str, task_id: str) -> None:
            try:
                worktree = gitops.add_worktree(
                    git_repo,
                    worktree_root / run_id / task_id,
                    gitops.task_branch(run_id, task_id),
                    base,
                )
                gitops.remove_worktree(git_repo, worktree.path)
            except Exception as exc:
                errors.append(f"{task_id}: {exc}")

        for round_ in range(40):
            threads = [
                threading.Thread(target=worker, args=(f"race-{round_}", f"t{i}")) for i in range(8)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        assert errors == [], f"{len(errors)} of 320 worktree operations failed: {errors[:3]}"
        assert len(git(repo, "branch", "--list", "claudecluster/race-*").splitlines()) == 320


# --------------------------------------------------------------------------- integration


class TestMergeOrder:
    """Task branches are merged onto the integration branch in dependency order."""

    def test_merge_commits_in_dependency_order(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        for task_id in ("top", "solo", "middle", "bottom"):
            add_script(model_server, marker, task_id, write_turns(f"{task_id}.txt", "x\n"))
        plan = make_plan(
            "layers",
            task(marker, "top", "middle", title="Top layer"),
            task(marker, "solo", title="Solo"),
            task(marker, "middle", "bottom", title="Middle layer"),
            task(marker, "bottom", title="Bottom layer"),
        )

        report = run(repo, worktree_root, run_id_for(marker), max_parallel=2, plan=plan)

        assert report.status is RunStatus.SUCCEEDED, report.error
        assert report.integration_branch == f"claudecluster/{report.run_id}/integration"
        assert first_parent_subjects(repo, report.integration_branch) == [
            "initial commit",
            "Merge task solo: Solo",
            "Merge task bottom: Bottom layer",
            "Merge task middle: Middle layer",
            "Merge task top: Top layer",
        ]
        assert git(repo, "rev-parse", report.integration_branch).strip() == report.head_commit
        # The report lists tasks in plan order, whatever order they ran in.
        assert [t.id for t in report.tasks] == ["top", "solo", "middle", "bottom"]


class TestConflicts:
    """A conflicting branch is kept, reported with its files, and fails the run."""

    def test_conflict_is_reported_and_both_branches_kept(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        add_script(model_server, marker, "swap", edit_turns("calc.py", "a + b", "b + a"))
        add_script(model_server, marker, "paren", edit_turns("calc.py", "a + b", "(a) + (b)"))
        add_script(model_server, marker, "on-paren", write_turns("on_paren.txt", "p\n"))
        plan = make_plan(
            "rewrite add",
            task(marker, "swap"),
            task(marker, "paren"),
            task(marker, "on-paren", "paren"),
            verify=VERIFY,
        )

        report = run(repo, worktree_root, run_id_for(marker), max_parallel=2, plan=plan)

        assert report.status is RunStatus.FAILED
        by_id = results(report)
        assert by_id["swap"].status is TaskStatus.SUCCEEDED
        assert by_id["paren"].status is TaskStatus.SUCCEEDED
        assert by_id["on-paren"].status is TaskStatus.SUCCEEDED
        assert [u.id for u in report.unmerged] == ["paren", "on-paren"]
        unmerged, dependent = report.unmerged
        assert unmerged.conflicting_files == ["calc.py"]
        assert "conflict" in unmerged.reason and "swap" in unmerged.reason
        assert unmerged.branch == f"claudecluster/{report.run_id}/paren"
        # Work built on the conflicting branch is kept aside too, saying why.
        assert dependent.reason == "depends on unmerged task(s) paren"
        assert dependent.branch == f"claudecluster/{report.run_id}/on-paren"
        assert dependent.conflicting_files == []
        # Both task branches still exist with their commits.
        for task_id, line in (("swap", "return b + a"), ("paren", "return (a) + (b)")):
            branch = f"claudecluster/{report.run_id}/{task_id}"
            assert by_id[task_id].branch == branch
            assert git(repo, "rev-parse", branch).strip() == by_id[task_id].head_commit
            assert line in git(repo, "show", f"{branch}:calc.py")
        # The integration branch holds the first one only, and it still verifies.
        assert report.integration_branch is not None
        merged = git(repo, "show", f"{report.integration_branch}:calc.py")
        assert "return b + a" in merged and "(a) + (b)" not in merged
        tree = git(repo, "ls-tree", "-r", "--name-only", report.integration_branch).split()
        assert "on_paren.txt" not in tree
        assert report.final_verify is not None and report.final_verify.ok
        assert report.error and "not merged: paren, on-paren" in report.error
        # No half-done merge is left anywhere.
        assert "integration" not in git(repo, "worktree", "list")

    def test_failing_final_verify_fails_the_run(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        # Each file alone is fine; both together are not.
        verify = (
            'python -c "import os, sys; '
            "sys.exit(os.path.exists('left.txt') and os.path.exists('right.txt'))\""
        )
        add_script(model_server, marker, "left", write_turns("left.txt", "l\n"))
        add_script(model_server, marker, "right", write_turns("right.txt", "r\n"))
        # The plan's own verify passes everywhere; run_goal's verify replaces it.
        plan = make_plan("both", task(marker, "left"), task(marker, "right"), verify="true")

        report = run(
            repo, worktree_root, run_id_for(marker), max_parallel=2, plan=plan, verify=verify
        )

        by_id = results(report)
        for task_id in ("left", "right"):
            assert by_id[task_id].status is TaskStatus.SUCCEEDED
            test_report = by_id[task_id].test_report
            assert test_report is not None and test_report.ok
            assert test_report.command == verify
        assert report.unmerged == []
        assert report.final_verify is not None
        assert report.final_verify.ok is False and report.final_verify.exit_code == 1
        assert report.final_verify.command == verify
        assert report.status is RunStatus.FAILED
        assert report.error and "final verify failed" in report.error


# --------------------------------------------------------------------------- report, artifacts


@dataclass
class FinishedRun:
    """One two-task run from a plan file, on a dirty checkout, shared by a class's tests."""

    repo: Path
    marker: str
    before: dict[str, object]
    report: RunReport
    model_server: ScriptedModelServer


@pytest.fixture(scope="class")
def finished_run(
    tmp_path_factory: pytest.TempPathFactory,
    model_server: ScriptedModelServer,
    prefect_backend: str,
) -> FinishedRun:
    marker = f"MARK-{uuid.uuid4().hex[:10]}"
    base = tmp_path_factory.mktemp("finished-run")
    repo = base / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    for rel, content in SAMPLE_FILES.items():
        (repo / rel).write_text(content)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "initial commit")
    # The user's checkout: an uncommitted edit, a staged new file, an untracked file.
    (repo / "calc.py").write_text("USER'S UNCOMMITTED EDIT\n")
    (repo / "staged.txt").write_text("staged\n")
    git(repo, "add", "staged.txt")
    (repo / "untracked.txt").write_text("untracked\n")
    before = snapshot(repo)

    add_script(
        model_server,
        marker,
        "calc-doc",
        edit_turns("calc.py", "def add(a, b):\n", 'def add(a, b):\n    """Add two numbers."""\n'),
    )
    add_script(
        model_server,
        marker,
        "strings-doc",
        edit_turns(
            "strings.py", "def shout(text):\n", 'def shout(text):\n    """Upper-case text."""\n'
        ),
    )
    plan_file = base / "plan.yaml"
    plan_file.write_text(
        yaml.safe_dump(
            {
                "goal": f"Docstrings {marker}",
                "verify": VERIFY,
                "tasks": [
                    task(marker, "calc-doc", paths=["calc.py"], title="Doc calc", kind="docs"),
                    task(
                        marker,
                        "strings-doc",
                        "calc-doc",
                        paths=["strings.py"],
                        title="Doc strings",
                        kind="docs",
                    ),
                ],
            }
        )
    )
    report = run(repo, base / "worktrees", run_id_for(marker), max_parallel=2, plan_file=plan_file)
    return FinishedRun(repo, marker, before, report, model_server)


class TestFinishedRun:
    """The report, the artifacts and the user's checkout after a successful run."""

    def test_json_report(self, finished_run: FinishedRun) -> None:
        report = finished_run.report
        assert report.status is RunStatus.SUCCEEDED, report.error

        data = report.model_dump(mode="json")

        assert data["run_id"] == run_id_for(finished_run.marker)
        assert data["goal"] == f"Docstrings {finished_run.marker}"
        assert data["status"] == "succeeded"
        assert data["error"] is None
        repo = finished_run.repo
        assert data["base_commit"] == git(repo, "rev-parse", "main").strip()
        assert data["integration_branch"] == f"claudecluster/{data['run_id']}/integration"
        assert data["head_commit"] == git(repo, "rev-parse", data["integration_branch"]).strip()
        assert data["final_verify"]["command"] == VERIFY
        assert data["final_verify"]["exit_code"] == 0 and data["final_verify"]["passed"] == 2
        assert [t["id"] for t in data["tasks"]] == ["calc-doc", "strings-doc"]
        assert [t["status"] for t in data["tasks"]] == ["succeeded", "succeeded"]
        assert [t["branch"] for t in data["tasks"]] == [
            f"claudecluster/{data['run_id']}/calc-doc",
            f"claudecluster/{data['run_id']}/strings-doc",
        ]
        assert data["unmerged"] == []
        assert data["planner"] is None
        totals = data["totals"]
        assert totals["cost_usd"] > 0 and totals["tokens"] > 0 and totals["duration_s"] > 0
        assert totals["cost_usd"] == pytest.approx(sum(t["cost_usd"] for t in data["tasks"]))
        assert totals["turns"] == sum(t["turns"] for t in data["tasks"]) >= 6
        assert totals["files_changed"] == 2 and totals["added"] == 2
        assert data["flow_run_id"]
        json.dumps(data)  # really JSON-serialisable

    def test_flow_run_and_graph_on_the_server(self, finished_run: FinishedRun) -> None:
        report = finished_run.report
        assert report.flow_run_id is not None
        assert report.ui_url is not None
        assert report.ui_url.endswith(f"/runs/flow-run/{report.flow_run_id}")

        flow_run, task_runs = read_flow_run(report.flow_run_id)

        assert flow_run.name == report.run_id
        assert flow_run.state is not None and flow_run.state.is_completed()
        by_name = {run.name: run for run in task_runs}
        assert {"calc-doc", "strings-doc"} <= set(by_name)
        assert any(name.startswith("integrate") for name in by_name)
        # The dependent's task run has an edge from its dependency's task run.
        upstream = {
            getattr(item, "id", None)
            for inputs in by_name["strings-doc"].task_inputs.values()
            for item in inputs
        }
        assert by_name["calc-doc"].id in upstream

    def test_task_artifacts(self, finished_run: FinishedRun) -> None:
        report = finished_run.report
        run_id = report.run_id
        scope = artifact_scope(deployment=None, goal=report.goal)  # stable across runs
        keys = [f"{scope}-{t}-diff" for t in ("calc-doc", "strings-doc")]

        found = read_artifacts([*keys, f"{scope}-calc-doc-tests"])

        assert sorted(found) == sorted(keys)  # one artifact per task: diff and test report
        diff = found[f"{scope}-calc-doc-diff"]
        assert diff.type == "markdown"
        assert isinstance(diff.data, str)
        assert '+    """Add two numbers."""' in diff.data
        assert "```diff" in diff.data and "| `calc.py` | modified | 1 | 0 |" in diff.data
        assert f"claudecluster/{run_id}/calc-doc" in diff.data
        assert "USER'S UNCOMMITTED EDIT" not in diff.data
        assert str(diff.flow_run_id) == report.flow_run_id and diff.task_run_id is not None
        strings_diff = found[f"{scope}-strings-doc-diff"].data
        assert isinstance(strings_diff, str) and '"""Upper-case text."""' in strings_diff
        tests = diff.data.split("## Test report", 1)[1].split("## Diff", 1)[0]
        [row] = markdown_rows(tests)
        assert row["command"] == f"`{VERIFY}`" and row["exit code"] == "0"
        assert row["result"] == "passed" and row["passed"] == "2" and row["failed"] == "0"
        assert "2 passed" in tests  # the output's tail

    def test_run_artifacts(self, finished_run: FinishedRun) -> None:
        report = finished_run.report
        run_id = report.run_id
        scope = artifact_scope(deployment=None, goal=report.goal)
        keys = [f"{scope}-tasks", f"{scope}-summary", f"{scope}-progress"]

        found = read_artifacts(keys)

        assert sorted(found) == sorted(keys)
        rows = table(found[f"{scope}-tasks"])
        assert [row["task"] for row in rows] == ["calc-doc", "strings-doc"]
        assert [row["status"] for row in rows] == ["succeeded", "succeeded"]
        assert all(row["tests"] == "2 passed, 0 failed" and row["files"] == 1 for row in rows)
        summary = found[f"{scope}-summary"].data
        assert isinstance(summary, str)
        assert f"# ClaudeCluster run {run_id}: succeeded" in summary
        assert f"`claudecluster/{run_id}/integration`" in summary
        assert (report.head_commit or "")[:12] in summary
        assert f"`{VERIFY}` passed (2 passed, 0 failed)" in summary
        assert "`strings-doc` docs: Doc strings (after calc-doc)" in summary
        assert float(found[f"{scope}-progress"].data) == 100.0  # type: ignore[arg-type]

    def test_plan_artifact_for_a_plan_file(self, finished_run: FinishedRun) -> None:
        # The README promises the plan as a per-run artifact, planner or plan file alike.
        scope = artifact_scope(deployment=None, goal=finished_run.report.goal)

        found = read_artifacts([f"{scope}-plan"])

        assert f"{scope}-plan" in found, "a run from a plan file has no plan artifact"
        plan_md = found[f"{scope}-plan"].data
        assert isinstance(plan_md, str)
        assert "| `strings-doc` | docs | Doc strings | strings.py | calc-doc |" in plan_md

    def test_user_checkout_untouched(self, finished_run: FinishedRun) -> None:
        report = finished_run.report
        repo = finished_run.repo
        assert report.status is RunStatus.SUCCEEDED, report.error
        assert finished_run.model_server.sessions(), "no session ran"

        assert snapshot(repo) == finished_run.before
        # The work went to the integration branch, built from the commit, not the dirty tree.
        assert report.integration_branch is not None
        merged = git(repo, "show", f"{report.integration_branch}:calc.py")
        assert '"""Add two numbers."""' in merged and "UNCOMMITTED" not in merged
        tree = git(repo, "ls-tree", "-r", "--name-only", report.integration_branch).split()
        assert "staged.txt" not in tree and "untracked.txt" not in tree
        # No worktree of the run is left registered.
        assert git(repo, "worktree", "list").count("\n") == 1


class TestPlannedRun:
    """Without a plan, the planner plans; its plan is an artifact and its cost is counted."""

    def test_planner_then_workers(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        add_script(model_server, marker, "alpha", write_turns("alpha.txt", "a\n"))
        add_script(model_server, marker, "beta", write_turns("beta.txt", "b\n"))
        answer = {
            "verify": VERIFY,
            "tasks": [
                task(marker, "alpha", paths=["alpha.txt"]),
                task(marker, "beta", "alpha", paths=["beta.txt"]),
            ],
        }
        goal_token = f"{marker}-goal"
        model_server.add_script(
            Script(name=goal_token, match=goal_token, turns=[structured(answer)])
        )
        run_id = run_id_for(marker)

        report = run(repo, worktree_root, run_id, max_parallel=2, goal=f"{goal_token} two files")

        assert report.status is RunStatus.SUCCEEDED, report.error
        assert [t.id for t in report.tasks] == ["alpha", "beta"]
        assert report.planner is not None and report.planner.cost_usd > 0
        assert report.totals.cost_usd == pytest.approx(
            report.planner.cost_usd + sum(t.cost_usd for t in report.tasks), abs=1e-5
        )
        assert report.final_verify is not None and report.final_verify.ok
        scope = artifact_scope(deployment=None, goal=report.goal)
        plan_md = read_artifacts([f"{scope}-plan"])[f"{scope}-plan"].data
        assert isinstance(plan_md, str)
        assert "| `beta` | other | Task beta | beta.txt | alpha |" in plan_md


class TestSingleTask:
    """The single-task flow publishes the worker's artifacts too."""

    def test_single_task_artifacts(
        self,
        repo: Path,
        worktree_root: Path,
        model_server: ScriptedModelServer,
        marker: str,
    ) -> None:
        from claudecluster.flows.single_task import single_task_flow

        add_script(
            model_server,
            marker,
            "lonely",
            edit_turns("strings.py", "text.upper()", "text.upper() + '!'"),
        )
        spec = TaskSpec(id="lonely", title="Exclaim", prompt=f"{token(marker, 'lonely')} do it")
        run_id = run_id_for(marker)
        base = git(repo, "rev-parse", "HEAD").strip()

        async def go() -> TaskResult:
            return await single_task_flow(
                WorkUnit(
                    run_id=run_id,
                    spec=spec,
                    repo=str(repo),
                    base_commit=base,
                    verify=VERIFY,
                    settings=WorkerSettings(),
                    worktree_root=str(worktree_root),
                )
            )

        result = anyio.run(go)

        assert result.status is TaskStatus.SUCCEEDED, result.error
        found = read_artifacts([f"{run_id}-lonely-diff", f"{run_id}-lonely-tests"])
        assert sorted(found) == [f"{run_id}-lonely-diff"]
        diff = found[f"{run_id}-lonely-diff"].data
        assert isinstance(diff, str)
        assert "+    return text.upper() + '!'" in diff
        assert f"claudecluster/{run_id}/lonely" in diff
        [row] = markdown_rows(diff.split("## Test report", 1)[1].split("## Diff", 1)[0])
        assert row["command"] == f"`{VERIFY}`" and row["result"] == "passed"
        assert row["passed"] == "2"
        assert found[f"{run_id}-lonely-diff"].task_run_id is not None
