"""Resume: re-running a run re-runs only what failed or never ran; paid work is reused."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from claudecluster.api import run_goal
from claudecluster.models import TaskSpec, TaskStatus, WorkerSettings
from claudecluster.plan import Plan
from claudecluster.testing import RequestView, Script, ScriptedModelServer, Turn, text, tool_use
from tests.conftest import git
from tests.integration.test_cli import cli

pytestmark = [pytest.mark.integration, pytest.mark.prefect_server]


def flaky_writer(marker: str, path: str, attempts: itertools.count[int]) -> Script:
    """Writes a failing test on its first session, a passing one on every later session."""
    first_session: dict[str, bool] = {}

    def reply(view: RequestView) -> Turn:
        session = view.session_id or ""
        if session not in first_session:
            first_session[session] = next(attempts) == 0
        body = "def test_it():\n    assert " + ("False" if first_session[session] else "True")
        return tool_use("Write", {"file_path": path, "content": body + "\n"})

    return Script(name=f"{marker}-{path}", match=f"{marker}-flaky", turns=[reply, text("Done.")])


@pytest.mark.usefixtures("prefect_backend")
class TestResume:
    """A run with a failed task is resumed: done work is cached, the rest runs."""

    def test_resume_reruns_only_what_failed(
        self, repo: Path, worktree_root: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        model_server.add_script(
            Script(
                name=f"{marker}-steady",
                match=f"{marker}-steady",
                turns=[
                    tool_use("Write", {"file_path": "steady.txt", "content": "steady\n"}),
                    text("Done."),
                ],
            )
        )
        model_server.add_script(flaky_writer(marker, "test_flaky.py", itertools.count()))
        model_server.add_script(
            Script(
                name=f"{marker}-after",
                match=f"{marker}-after",
                turns=[
                    tool_use("Write", {"file_path": "after.txt", "content": "after\n"}),
                    text("Done."),
                ],
            )
        )
        plan = Plan(
            goal="Resume me",
            verify="python -m pytest -q",
            tasks=[
                TaskSpec(id="steady", title="Steady", prompt=f"{marker}-steady", paths=["s"]),
                TaskSpec(id="flaky", title="Flaky", prompt=f"{marker}-flaky", paths=["f"]),
                TaskSpec(
                    id="after",
                    title="After flaky",
                    prompt=f"{marker}-after",
                    paths=["a"],
                    depends_on=["flaky"],
                ),
            ],
        )
        run_id = f"resume-{marker.lower()}"

        first = run_goal(
            None,
            repo,
            plan=plan,
            max_parallel=2,
            run_id=run_id,
            worktree_root=worktree_root,
            settings=WorkerSettings(retries=0),
        )

        statuses = {t.id: t.status for t in first.tasks}
        assert statuses == {
            "steady": TaskStatus.SUCCEEDED,
            "flaky": TaskStatus.FAILED,
            "after": TaskStatus.SKIPPED,
        }
        steady_cost = next(t.cost_usd for t in first.tasks if t.id == "steady")

        # Resumed from the CLI, as a user would: the flow run's stored parameters (worktree
        # root included) are reused.
        proc = cli("resume", run_id, "--json")

        assert proc.returncode == 0, proc.stderr
        second = json.loads(proc.stdout)
        by_id = {t["id"]: t for t in second["tasks"]}
        assert second["status"] == "succeeded"
        assert by_id["steady"]["cached"] is True
        assert by_id["steady"]["cost_usd"] == steady_cost
        assert by_id["flaky"]["cached"] is False
        assert by_id["flaky"]["status"] == "succeeded"
        assert by_id["after"]["status"] == "succeeded"
        sessions = [s.script for s in model_server.sessions().values()]
        assert sessions.count(f"{marker}-steady") == 1  # not run, not paid, again
        assert sessions.count(f"{marker}-test_flaky.py") == 2
        assert sessions.count(f"{marker}-after") == 1
        # The failed first attempt's work was kept, under the attempts prefix.
        attempts = git(repo, "branch", "--list", f"claudecluster-attempts/*{run_id}/flaky/*")
        assert attempts.split(), "the failed attempt's branch is kept"
        merged = git(repo, "show", f"{second['integration_branch']}:test_flaky.py")
        assert "assert True" in merged


@pytest.mark.usefixtures("prefect_backend")
class TestResumeAfterKill:
    """kill -9 of the driver mid-run, then resume: finished work is reused, the rest reruns."""

    def test_kill_driver_then_resume(
        self, repo: Path, tmp_path: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        first_session_of_slow: list[str] = []

        def slow_write(view: RequestView) -> Turn:
            # The first session of `slow` never gets an answer (its driver is killed while it
            # waits); any later session gets one at once.
            if not first_session_of_slow:
                first_session_of_slow.append(view.session_id or "")
            if view.session_id == first_session_of_slow[0]:
                return tool_use("Write", {"file_path": "slow.txt", "content": "x\n"}, latency_s=600)
            return tool_use("Write", {"file_path": "slow.txt", "content": "slow\n"})

        model_server.add_script(
            Script(
                name=f"{marker}-quick",
                match=f"{marker}-quick",
                turns=[
                    tool_use("Write", {"file_path": "quick.txt", "content": "quick\n"}),
                    text("Done."),
                ],
            )
        )
        model_server.add_script(
            Script(name=f"{marker}-slow", match=f"{marker}-slow", turns=[slow_write, text("ok")])
        )
        plan_file = tmp_path / "plan.json"
        plan_file.write_text(
            json.dumps(
                {
                    "goal": "Survive the driver",
                    "tasks": [
                        {"id": "quick", "title": "Quick", "prompt": f"{marker}-quick"},
                        {"id": "slow", "title": "Slow", "prompt": f"{marker}-slow"},
                    ],
                }
            )
        )
        driver = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "claudecluster.cli",
                "run",
                "--plan",
                str(plan_file),
                "--repo",
                str(repo),
                "--max-parallel",
                "2",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                refs = git(repo, "for-each-ref", "--format=%(refname:short)", "refs/heads/")
                branches = [r for r in refs.split() if r.endswith("/quick")]
                if branches and first_session_of_slow:
                    break
                time.sleep(0.2)
            assert branches, "the quick task finished before the kill"
            run_id = branches[0].split("/")[1]
            time.sleep(1.0)  # let the quick task's result be persisted and reported
        finally:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and every session it started
            driver.wait(timeout=30)

        proc = cli("resume", run_id, "--json")

        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        by_id = {t["id"]: t for t in report["tasks"]}
        assert report["status"] == "succeeded"
        assert by_id["quick"]["cached"] is True
        assert by_id["slow"]["cached"] is False
        sessions = [s.script for s in model_server.sessions().values()]
        assert sessions.count(f"{marker}-quick") == 1
        assert sessions.count(f"{marker}-slow") == 2
        assert git(repo, "show", f"{report['integration_branch']}:slow.txt") == "slow\n"
