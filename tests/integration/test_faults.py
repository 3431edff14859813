"""Faults injected for real: the Claude Code process killed with SIGKILL mid-task."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from claudecluster.api import run_goal
from claudecluster.models import TaskSpec, TaskStatus, WorkerSettings
from claudecluster.plan import Plan
from claudecluster.testing import RequestView, Script, ScriptedModelServer, Turn, text, tool_use
from tests.conftest import git

pytestmark = [pytest.mark.integration, pytest.mark.prefect_server]


def cli_pids_in(directory: Path) -> list[int]:
    """Pids of processes whose working directory is ``directory`` (the session's worktree)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if Path(os.readlink(entry / "cwd")) == directory:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.usefixtures("prefect_backend")
class TestKilledSession:
    """kill -9 of the Claude Code process: Prefect retries the task from a clean worktree."""

    def test_retried_after_sigkill(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        run_id = f"kill-{marker.lower()}"
        worktree = (worktree_root / run_id / "victim").resolve()
        killed: list[int] = []

        def second_turn(view: RequestView) -> Turn:
            if not killed:  # the first attempt dies here, with its work half done
                pids = cli_pids_in(worktree)
                assert pids, "the session's CLI runs in the task's worktree"
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                killed.extend(pids)
                return text("(never delivered)")
            return tool_use("Write", {"file_path": "done.txt", "content": "done\n"})

        model_server.add_script(
            Script(
                name=f"victim-{marker}",
                match=marker,
                turns=[
                    tool_use("Write", {"file_path": "half.txt", "content": "half\n"}),
                    second_turn,
                    text("Finished."),
                ],
            )
        )
        plan = Plan(
            goal="Survive a kill",
            tasks=[TaskSpec(id="victim", title="Victim", prompt=f"{marker} work")],
        )

        report = run_goal(
            None,
            repo,
            plan=plan,
            max_parallel=1,
            run_id=run_id,
            worktree_root=worktree_root,
            settings=WorkerSettings(retries=1, retry_delay_s=0),
        )

        assert killed, "the first attempt's CLI was killed"
        assert report.status == "succeeded", report.error
        (result,) = report.tasks
        assert result.status is TaskStatus.SUCCEEDED
        sessions = [s for s in model_server.sessions().values() if s.script == f"victim-{marker}"]
        assert len(sessions) == 2
        # The retry started clean: its commit has its own files, on the base commit.
        assert sorted(f.path for f in result.files) == ["done.txt", "half.txt"]
        # The killed attempt's half-done work is kept, not lost.
        attempts = git(repo, "branch", "--list", f"claudecluster-attempts/*{run_id}/victim/*")
        (attempt,) = attempts.split()
        assert git(repo, "show", f"{attempt}:half.txt") == "half\n"
        # Both attempts are counted: the killed one with what its usage so far cost.
        first, second = result.attempts
        assert (first.number, first.outcome, first.branch) == (1, "failed", attempt)
        assert first.cost_usd > 0 and first.turns >= 1
        assert (second.number, second.outcome) == (2, "finished")
        assert result.cost_usd == pytest.approx(first.cost_usd + second.cost_usd)
        assert report.totals.cost_usd == pytest.approx(result.cost_usd)
