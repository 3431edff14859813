"""Money and work stay safe when things die: real processes, real kill -9, real Prefect.

Each drill runs the real ``claudecluster`` CLI and the real Claude Code CLI against the
scripted model server; the server drills use an embedded ``prefect server`` of their own,
in a fresh ClaudeCluster home, and kill it (or the driver) with SIGKILL mid-run.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from claudecluster.api import run_goal
from claudecluster.models import (
    FailureReason,
    RunReport,
    TaskSpec,
    TaskStatus,
    WorkerSettings,
    WorkUnit,
)
from claudecluster.plan import Plan
from claudecluster.testing import Entry, Script, ScriptedModelServer, structured, text, tool_use
from claudecluster.worker import execute_task
from claudecluster.workspace import new_run_id
from tests.conftest import git
from tests.drills import Drill, claude_sessions_of, drill, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def writing(task_id: str, turns: int, latency_s: float) -> list[Entry]:
    """A session that writes its file first, then looks around, then finishes."""
    entries: list[Entry] = [
        tool_use("Write", {"file_path": f"{task_id}.txt", "content": task_id}, latency_s=latency_s)
    ]
    entries += [
        tool_use("Read", {"file_path": f"{task_id}.txt"}, latency_s=latency_s)
        for _ in range(turns - 2)
    ]
    return [*entries, text("Done.", latency_s=latency_s)]


def scripted_plan(
    model_server: ScriptedModelServer,
    marker: str,
    ids: list[str],
    *,
    turns: int = 2,
    latency_s: float = 1.0,
) -> dict[str, object]:
    """A plan whose every task has its own script (matched by ``<marker:id>``)."""
    for task_id in ids:
        token = f"<{marker}:{task_id}>"
        model_server.add_script(
            Script(name=token, match=token, turns=writing(task_id, turns, latency_s))
        )
    return {
        "goal": f"{marker} drill",
        "tasks": [
            {"id": task_id, "title": task_id, "prompt": f"<{marker}:{task_id}> write"}
            for task_id in ids
        ],
    }


def requests_for(model_server: ScriptedModelServer, marker: str, since: float = 0.0) -> list[str]:
    """Task ids of the model requests made for ``marker``'s scripts after ``since``."""
    return [
        r.script.split(":", 1)[1].rstrip(">")
        for r in model_server.requests
        if r.script and r.script.startswith(f"<{marker}:") and r.started_at > since
    ]


class TestServerLost:
    """kill -9 of the Prefect server: a clean stop, then a resume that pays nothing twice."""

    def test_clean_stop_then_resume(
        self, tmp_path: Path, repo: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        ids = [f"s{i}" for i in range(6)]
        plan = tmp_path / "plan.json"
        plan.write_text(json.dumps(scripted_plan(model_server, marker, ids, latency_s=1.5)))
        with drill(tmp_path / "home", model_server) as cluster:
            run = cluster.start(
                "run", "--plan", str(plan), "--repo", str(repo), "--max-parallel", "2", "--json"
            )
            # Two sessions finished, two running: four requests made, two in flight.
            wait_until(lambda: len(requests_for(model_server, marker)) >= 6, 120, "sessions")
            killed_at = time.time()
            cluster.kill_server()
            out, err = run.communicate(timeout=120)
            took = time.time() - killed_at

            assert run.returncode == 3, err
            assert took < 30, f"the driver took {took:.1f} s to stop"
            assert "Traceback" not in err
            lines = err.strip().splitlines()
            assert len(lines) == 1, lines
            report = RunReport.model_validate_json(out)
            assert report.interrupted and report.status == "failed"
            assert f"claudecluster resume {report.run_id}" in lines[0]
            assert (cluster.home / "runs" / report.run_id / "report.json").is_file()
            finished = [t.id for t in report.tasks if t.status.ok]
            assert len(finished) >= 2
            for result in report.tasks:
                if result.status.ok:  # its work is committed on its branch
                    assert git(repo, "show", f"{result.branch}:{result.id}.txt") == result.id
            # No session started once the driver knew (running ones made their next turns).
            # It knows after MISSES failed health polls; a session it started just before
            # asks the model only after the CLI's boot (up to ~3 s on two loaded cores).
            from claudecluster.server_watch import INTERVAL_S, MISSES

            knew_by = killed_at + INTERVAL_S * MISSES + 3.0
            first_turns_after = [
                r
                for r in model_server.requests
                if r.script
                and r.script.startswith(f"<{marker}:")
                and r.started_at > knew_by
                and r.view.turn_index == 0
            ]
            assert first_turns_after == []
            print(f"\nserver killed: the driver stopped {took:.1f} s later, exit 3")

            cluster.server_start()
            resumed_at = time.time()
            again = cluster.cli("resume", report.run_id, "--json")
            assert again.returncode == 0, again.stderr
            final = RunReport.model_validate_json(again.stdout)
            assert final.status == "succeeded", final.error
            re_sent = set(requests_for(model_server, marker, since=resumed_at))
            assert not re_sent & set(finished), f"finished tasks were paid again: {re_sent}"
            assert all(t.cached for t in final.tasks if t.id in finished)
            print(f"resume re-sent requests for finished tasks: {len(re_sent & set(finished))}")


class TestDriverKilled:
    """kill -9 of ``claudecluster run``: its sessions die with it; resume reuses finished work."""

    def test_sessions_die_and_resume_reuses(
        self, tmp_path: Path, repo: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        ids = [f"d{i}" for i in range(4)]
        plan = tmp_path / "plan.json"
        plan.write_text(json.dumps(scripted_plan(model_server, marker, ids, turns=3)))
        home = tmp_path / "home"
        with drill(home, model_server) as cluster:
            run = cluster.start("run", "--plan", str(plan), "--repo", str(repo), "-P", "2")
            wait_until(lambda: len(requests_for(model_server, marker)) >= 7, 120, "sessions")
            assert claude_sessions_of(home), "sessions were running"
            run.send_signal(signal.SIGKILL)
            run.wait(timeout=30)
            killed_at = time.time()
            wait_until(lambda: not claude_sessions_of(home), 5, "sessions outlived the driver")
            time.sleep(3)
            late = requests_for(model_server, marker, since=killed_at + 1)
            assert late == [], f"model requests after the driver died: {late}"
            print(f"\ndriver killed: no session left after {time.time() - killed_at - 3:.1f} s")

            (run_id,) = cluster.run_ids()
            resumed_at = time.time()
            again = cluster.cli("resume", run_id, "--json")
            assert again.returncode == 0, again.stderr
            assert "marked" in again.stderr and "Crashed" in again.stderr
            final = RunReport.model_validate_json(again.stdout)
            assert final.status == "succeeded", final.error
            reused = {t.id for t in final.tasks if t.cached}
            assert reused, "no finished task was reused"
            re_sent = set(requests_for(model_server, marker, since=resumed_at))
            assert not re_sent & reused
            for result in final.tasks:
                if result.id in re_sent:  # it was interrupted: both attempts are counted
                    assert [a.outcome for a in result.attempts] == ["interrupted", "finished"]
            # Everything the run stored is under its home.
            assert list((home / "results").rglob("*")), "no persisted results under the home"
            cleaned = cluster.cli("clean", "--older-than", "0")
            assert cleaned.returncode == 0, cleaned.stderr
            assert not [p for p in (home / "results").rglob("*") if p.is_file()]
            assert not (home / "runs" / run_id).exists()


@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_backend")
class TestGoalBudget:
    """Spend stays within budget + one task's cost at any width; stops are reported."""

    def costs(self, model_server: ScriptedModelServer, marker: str, repo: Path) -> float:
        """What one 'dear' task costs, measured."""
        plan = scripted_plan(model_server, f"{marker}c", ["dear"], turns=5, latency_s=0.2)
        report = run_goal(None, repo, plan=Plan.model_validate(plan), max_parallel=1)
        return report.tasks[0].cost_usd

    @pytest.mark.parametrize("width", [4, 8])
    def test_spend_is_bounded_and_accounted(
        self, make_repo: object, model_server: ScriptedModelServer, marker: str, width: int
    ) -> None:
        repo = make_repo(name=f"repo-{width}")  # type: ignore[operator]
        dear = self.costs(model_server, marker, repo)
        # The first task is cheap, so the run first believes every task is: more start
        # than the budget holds, and the live count must stop them.
        tag = f"{marker}w{width}"
        model_server.add_script(
            Script(name=f"<{tag}:cheap>", match=f"<{tag}:cheap>", turns=[text("Nothing to do.")])
        )
        plan = scripted_plan(model_server, tag, [f"t{i}" for i in range(8)], turns=5, latency_s=0.4)
        plan["tasks"].insert(0, {"id": "cheap", "title": "cheap", "prompt": f"<{tag}:cheap>"})  # type: ignore[union-attr]
        budget = round(2.5 * dear, 4)

        report = run_goal(
            None,
            repo,
            plan=Plan.model_validate(plan),
            max_parallel=width,
            budget_usd=budget,
            settings=WorkerSettings(retries=0),
        )

        spent = report.totals.cost_usd
        assert report.budget is not None and report.budget.spent_usd == spent
        assert spent <= budget + dear, (spent, budget, dear)
        assert report.budget.stopped or report.budget.not_started
        for result in report.tasks:
            if result.id in report.budget.stopped:
                assert result.failure_reason is FailureReason.GOAL_BUDGET
                assert result.status is TaskStatus.FAILED and result.turns >= 1
                if result.branch:  # what it wrote before it was stopped is kept
                    assert git(repo, "show", f"{result.branch}:{result.id}.txt") == result.id
                else:  # stopped before its first tool ran: nothing to keep
                    assert result.files == []
            if result.id in report.budget.not_started:
                assert result.status is TaskStatus.SKIPPED and result.turns == 0
        assert "budget" in (report.error or "")
        print(
            f"\nwidth {width}: budget ${budget:.4f}, a task ${dear:.4f}, spent ${spent:.4f} "
            f"(overshoot ${max(0.0, spent - budget):.4f}), stopped {report.budget.stopped}, "
            f"not started {report.budget.not_started}"
        )


class TestLimitsBeforeStart:
    """Inputs Prefect would refuse are refused first: exit 2, one line, no model request."""

    def test_a_prompt_too_big_for_prefect(
        self, tmp_path: Path, repo: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        plan = {
            "goal": "big",
            "tasks": [{"id": "big", "title": "big", "prompt": f"{marker} " + "x" * 900_000}],
        }
        path = tmp_path / "plan.json"
        path.write_text(json.dumps(plan))
        assert path.stat().st_size < 1_000_000
        before = len(model_server.requests)
        env_home = tmp_path / "home"
        cli = Drill(
            env_home,
            {
                **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
                **model_server.env(),
                "CLAUDECLUSTER_HOME": str(env_home),
            },
        )
        proc = cli.cli("run", "--plan", str(path), "--repo", str(repo))
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "900,0" in lines[0] and "prompt" in lines[0], lines
        assert len(model_server.requests) == before
        assert not (env_home / "server.json").exists()  # no server was even started


@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_backend")
class TestPlannerOverMaxTasks:
    """An LLM plan over --max-tasks: one line, no traceback, the planner's cost reported."""

    def test_one_line_and_the_cost(
        self, tmp_path: Path, repo: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        tasks = [
            {
                "id": f"p{i}",
                "kind": "other",
                "title": "t",
                "prompt": "p",
                "paths": [],
                "depends_on": [],
            }
            for i in range(3)
        ]
        model_server.add_script(
            Script(name=f"over-{marker}", match=marker, turns=[structured({"tasks": tasks})])
        )
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "claudecluster.cli",
                "run",
                f"{marker} plan it",
                "--repo",
                str(repo),
                "--max-tasks",
                "2",
                "--json",
            ],
            env={**os.environ, "CLAUDECLUSTER_HOME": str(tmp_path / "home")},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        report = RunReport.model_validate_json(proc.stdout)
        assert "more than --max-tasks 2" in (report.error or "")
        assert report.planner is not None and report.planner.cost_usd > 0
        assert report.totals.cost_usd == report.planner.cost_usd


class TestUnreachableModelApi:
    """Nothing answers at the model API: found once, before a session, or fast in one."""

    def test_the_run_refuses_before_any_session(self, tmp_path: Path, repo: Path) -> None:
        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        plan = tmp_path / "plan.json"
        plan.write_text(
            json.dumps({"goal": "g", "tasks": [{"id": "a", "title": "a", "prompt": "a"}]})
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            {
                "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}",
                "ANTHROPIC_API_KEY": "sk-test",
                "CLAUDECLUSTER_HOME": str(tmp_path / "home"),
            }
        )
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "claudecluster.cli",
                "run",
                "--plan",
                str(plan),
                "--repo",
                str(repo),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert "model API unreachable" in line and str(port) in line

    def test_a_session_fails_fast(
        self, repo: Path, worktree_root: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        monkeypatch.setenv("ANTHROPIC_BASE_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("CLAUDE_CODE_MAX_RETRIES", "10")  # minutes of back-off, if unchecked
        unit = WorkUnit(
            run_id=new_run_id(),
            spec=TaskSpec(id="lonely", title="Lonely", prompt="hello"),
            repo=str(repo),
            base_commit="HEAD",
            worktree_root=str(worktree_root),
        )
        started = time.monotonic()
        result = asyncio.run(execute_task(unit))
        took = time.monotonic() - started
        assert result.failure_reason is FailureReason.API_UNREACHABLE, result.error
        assert "model API unreachable" in (result.error or "")
        assert took < 30, f"{took:.1f} s"


class TestLiveCost:
    """What a running session has spent, from its usage, agrees with Claude Code's figure."""

    @pytest.mark.parametrize("model", [None, "claude-sonnet-4-5", "claude-haiku-4-5"])
    def test_the_meter_matches_the_result(
        self,
        repo: Path,
        model_server: ScriptedModelServer,
        marker: str,
        model: str | None,
    ) -> None:
        from claudecluster.permissions import permissions_for
        from claudecluster.session import SessionRequest, run_session

        model_server.add_script(
            Script(name=f"meter-{marker}", match=marker, turns=writing("m", 4, 0.0))
        )
        heard: list[float] = []

        class Listen:
            def turn(self, cost_usd: float) -> None:
                heard.append(cost_usd)

            def spend(self, usd: float) -> None:
                pass

        outcome = asyncio.run(
            run_session(
                SessionRequest(
                    prompt=f"{marker} go",
                    cwd=repo,
                    settings=WorkerSettings(model=model),
                    permissions=permissions_for("safe"),
                ),
                watch=Listen(),  # type: ignore[arg-type]
            )
        )
        assert outcome.ok and outcome.cost_usd > 0
        assert heard == sorted(heard) and len(heard) >= 4
        assert heard[-1] == pytest.approx(outcome.cost_usd, rel=0.02)
