"""A team's cluster on one box: the team server, three worker machines, a git URL.

The topology (``tests/team.py``): PostgreSQL and Redis; ``claudecluster server start --team``
(two API replicas and the services behind nginx); three worker machines, each a network
namespace with a private disk, running ``prefect worker start`` for the process pool and
reaching the server, the scripted model and the repository (a ``git://`` URL) only over a
bridge. The driver is ``claudecluster run`` on the server host, or ``prefect deployment
run`` (then the goal's driver runs on a worker machine too).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from claudecluster.testing import Script, text, tool_use
from tests.cluster import UUID_RE, wait_for
from tests.conftest import git
from tests.team import GOAL_DEPLOYMENT, POOL, Team, replica_killed, require_topology, team_topology

pytestmark = [
    pytest.mark.integration,
    pytest.mark.prefect_server,
    pytest.mark.slow,
    pytest.mark.timeout(900),
]


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    require_topology()
    with team_topology(tmp_path_factory.mktemp("team")) as made:
        yield made


def file_task_script(marker: str, name: str, *, turn_s: float = 0.0) -> Script:
    """Write ``<name>.py`` in two turns."""
    return Script(
        name=f"{marker}-{name}",
        match=f"{marker}-{name} ",
        turns=[
            tool_use(
                "Write",
                {"file_path": f"{name}.py", "content": f"VALUE = {name!r}\n"},
                latency_s=turn_s,
            ),
            text("Done.", latency_s=turn_s),
        ],
    )


def file_plan(marker: str, names: list[str], *, goal: str = "Add modules") -> dict[str, Any]:
    return {
        "goal": goal,
        "verify": "python -m pytest -q",
        "tasks": [
            {
                "id": name,
                "kind": "scaffold",
                "title": f"Add {name}.py",
                "prompt": f"{marker}-{name} create {name}.py",
                "paths": [f"{name}.py"],
            }
            for name in names
        ],
    }


def write_plan(path: Path, plan: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(plan))
    return path


class TestTopology:
    def test_tasks_spread_over_three_machines(
        self, team: Team, tmp_path: Path, marker: str
    ) -> None:
        names = [f"mod{i}" for i in range(9)]
        for name in names:
            team.model.add_script(file_task_script(marker, name, turn_s=1.0))
        plan = write_plan(tmp_path / "plan.yaml", file_plan(marker, names))

        proc = team.cli(
            "run",
            "--plan",
            str(plan),
            "--repo",
            team.repo_url,
            "--pool",
            POOL,
            "--max-parallel",
            "9",
            "--json",
        )

        assert proc.returncode == 0, proc.stderr[-3000:] + team.logs_tail()
        report = json.loads(proc.stdout)
        assert report["status"] == "succeeded", report["error"]
        assert all(t["status"] == "succeeded" for t in report["tasks"])
        # The integration branch is on the origin, with every task's file.
        branch = report["integration_branch"]
        for name in names:
            assert team.show(branch, f"{name}.py") == f"VALUE = {name!r}\n"
        # Every machine ran some of the tasks, from its own clone on its own disk.
        children = team.children(report["flow_run_id"])
        assert len(children) == len(names)
        where = Counter(team.machine_of(c) for c in children)
        assert set(where) == {m.name for m in team.machines}, where
        print(f"\n[figures] 9 tasks over the machines: {sorted(where.values())}")
        for machine in team.machines:
            clones = list((machine.disk() / "claudecluster").rglob("*.git"))
            worktrees = list((machine.disk() / "claudecluster").rglob(f"{report['run_id']}"))
            assert clones or worktrees, f"{machine.name} has no clone of the repository"

    def test_a_local_path_is_refused_for_workers_on_other_hosts(
        self, team: Team, tmp_path: Path, marker: str
    ) -> None:
        plan = write_plan(tmp_path / "plan.yaml", file_plan(marker, ["local"]))
        local = tmp_path / "checkout"
        git(tmp_path, "clone", "-q", str(team.origin), str(local))
        requests = len(team.model.requests)

        proc = team.cli("run", "--plan", str(plan), "--repo", str(local), "--pool", POOL)

        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "workers on other hosts" in lines[0], proc.stderr
        assert len(team.model.requests) == requests

    def test_the_pool_is_set_up_for_other_hosts(self, team: Team) -> None:
        from claudecluster.pools import SHARES_DISK_VAR
        from claudecluster.setup import TEAM_CLIENT_ENV

        pool = team.api("GET", f"/work_pools/{POOL}")
        env = pool["base_job_template"]["variables"]["properties"]["env"]["default"]
        assert env[SHARES_DISK_VAR] == "false"
        # A database restart behind the auth string answers 500: the flow runs retry it.
        assert TEAM_CLIENT_ENV.items() <= env.items()
        assert "PREFECT_LOCAL_STORAGE_PATH" not in env

    def test_the_api_wants_the_auth_string(self, team: Team) -> None:
        import urllib.error
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with pytest.raises(urllib.error.HTTPError) as refused:
            opener.open(f"{team.api_url}/flow_runs/filter", data=b"{}", timeout=10)
        assert refused.value.code == 401
        with opener.open(f"{team.api_url}/health", timeout=10) as health:  # probes need none
            assert health.read() == b"true"

    def test_a_big_request_passes_the_load_balancer(self, team: Team) -> None:
        """A 256-task goal's parameters (~100 KB) once met nginx's body temp file, which its
        workers could not write: 500 Internal Server Error. 300 KB must pass."""
        flow = team.api("POST", "/flows/", {"name": "team-big-body"})
        run = team.api(
            "POST",
            "/flow_runs/",
            {"flow_id": flow["id"], "parameters": {"plan": "x" * 300_000}},
        )
        assert len(team.flow_run(run["id"])["parameters"]["plan"]) == 300_000
        team.api("DELETE", f"/flow_runs/{run['id']}")


def run_in_background(team: Team, *args: str) -> tuple[threading.Thread, dict[str, Any]]:
    """``claudecluster`` with ``args`` in a thread; the dict gets ``proc`` when it ends."""
    out: dict[str, Any] = {}

    def target() -> None:
        out["proc"] = team.cli(*args)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def goal_run_id(team: Team, marker: str, out: dict[str, Any] | None = None) -> str:
    """The goal flow run of the run whose goal is ``marker`` (once it exists).

    ``out`` is a :func:`run_in_background` result: if that command ended without starting
    a goal, the failure says what it printed.
    """

    def describe() -> str:
        proc = (out or {}).get("proc")
        ended = f"; the command ended ({proc.returncode}): {proc.stderr[-2000:]}" if proc else ""
        return f"no goal run for {marker}{ended}"

    def find() -> str | None:
        runs = team.api(
            "POST",
            "/flow_runs/filter",
            {"flow_runs": {"tags": {"all_": [f"claudecluster-goal:{marker.lower()}"]}}},
        )
        goals = [r for r in runs if r["parent_task_run_id"] is None]
        return str(goals[0]["id"]) if goals else None

    found: str = wait_for(find, 120, describe, every=0.5)
    return found


def sessions_per_task(team: Team, marker: str) -> dict[str, int]:
    """How many Claude Code sessions each task of ``marker``'s plan had (its script's name)."""
    counts = Counter(
        s.script.removeprefix(f"{marker}-")
        for s in team.model.sessions().values()
        if s.script and s.script.startswith(f"{marker}-")
    )
    return dict(counts)


def wait_running_children(team: Team, goal_id: str, count: int) -> list[dict[str, Any]]:
    def running() -> list[dict[str, Any]] | None:
        found = [c for c in team.children(goal_id) if c["state_type"] == "RUNNING"]
        return found if len(found) >= count else None

    children: list[dict[str, Any]] = wait_for(
        running, 180, lambda: f"fewer than {count} running tasks\n" + team.logs_tail(), every=0.5
    )
    return children


def start_file_goal(
    team: Team, tmp_path: Path, marker: str, names: list[str], *, parallel: int = 4
) -> tuple[threading.Thread, dict[str, Any], str]:
    """``claudecluster run`` of one file task per name (two 3 s turns each) in the background,
    against the team's git URL on the process pool; returns once a task runs."""
    for name in names:
        team.model.add_script(file_task_script(marker, name, turn_s=3.0))
    plan = write_plan(tmp_path / "plan.yaml", file_plan(marker, names, goal=marker))
    thread, out = run_in_background(
        team, "run", "--plan", str(plan), "--repo", team.repo_url, "--pool", POOL,
        "--max-parallel", str(parallel), "--json",
    )  # fmt: skip
    goal_id = goal_run_id(team, marker, out)
    wait_running_children(team, goal_id, 1)
    assert team.flow_run(goal_id)["state_type"] == "RUNNING"
    return thread, out, goal_id


class TestFaults:
    def test_run_completes_through_the_other_replica(
        self, team: Team, tmp_path: Path, marker: str
    ) -> None:
        names = [f"{marker.lower()[-6:]}r{i}" for i in range(6)]
        thread, out, _ = start_file_goal(team, tmp_path, marker, names)
        with replica_killed(team, 0):
            killed_at = time.monotonic()
            thread.join(600)
            proc = out["proc"]
            print(
                f"\n[figures] replica killed: the run ended {time.monotonic() - killed_at:.1f} s "
                f"later, exit {proc.returncode}"
            )
        assert proc.returncode == 0, proc.stderr[-3000:] + team.logs_tail()
        report = json.loads(proc.stdout)
        assert report["status"] == "succeeded", report["error"]
        assert [t["status"] for t in report["tasks"]] == ["succeeded"] * len(names)
        assert sessions_per_task(team, marker) == dict.fromkeys(names, 1)
        for name in names:
            assert team.show(report["integration_branch"], f"{name}.py")

    def test_postgres_restart_mid_run(self, team: Team, tmp_path: Path, marker: str) -> None:
        names = [f"{marker.lower()[-6:]}p{i}" for i in range(6)]
        thread, out, _ = start_file_goal(team, tmp_path, marker, names)
        team.postgres.restart()
        thread.join(600)
        proc = out["proc"]
        report = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else None
        outcome = "completed" if proc.returncode == 0 else f"stopped ({proc.returncode}), resumed"
        print(f"\n[figures] PostgreSQL restarted mid-run: the run {outcome}")
        if proc.returncode != 0:
            # A clean stop: exit 3, one line saying what happened; resume finishes the run.
            assert proc.returncode == 3, proc.stderr[-3000:]
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
            run_id = report["run_id"] if report else None
            assert run_id, proc.stderr
            resumed = team.cli("resume", run_id, "--json")
            assert resumed.returncode == 0, resumed.stderr[-3000:]
            report = json.loads(resumed.stdout)
        assert report is not None
        assert report["status"] == "succeeded", report["error"]
        for name in names:
            assert team.show(report["integration_branch"], f"{name}.py")
        # No finished task was paid twice: one session per task.
        assert sessions_per_task(team, marker) == dict.fromkeys(names, 1)

    def test_lost_machine_task_runs_again_elsewhere(
        self, team: Team, tmp_path: Path, marker: str
    ) -> None:
        from claudecluster.lost_workers import HEARTBEAT_SECONDS, SILENCE_SECONDS

        names = [f"{marker.lower()[-6:]}k{i}" for i in range(3)]
        victim = names[0]
        for name in names[1:]:
            team.model.add_script(file_task_script(marker, name, turn_s=1.0))
        # The victim writes its file, then thinks for a long time: killed mid-session.
        team.model.add_script(
            Script(
                name=f"{marker}-{victim}",
                match=f"{marker}-{victim} ",
                turns=[
                    tool_use(
                        "Write",
                        {"file_path": f"{victim}.py", "content": f"VALUE = {victim!r}\n"},
                        latency_s=0.5,
                    ),
                    tool_use("Read", {"file_path": f"{victim}.py"}, latency_s=0.5),
                    text("Done.", latency_s=60.0),
                ],
            )
        )
        plan = write_plan(tmp_path / "plan.yaml", file_plan(marker, names, goal=marker))
        thread, out = run_in_background(
            team,
            "run",
            "--plan",
            str(plan),
            "--repo",
            team.repo_url,
            "--pool",
            POOL,
            "--max-parallel",
            "3",
            "--json",
        )
        goal_id = goal_run_id(team, marker, out)
        run_name = team.flow_run(goal_id)["name"]
        checkpoint = f"claudecluster-attempts/claudecluster/{run_name}/{victim}/1"
        # Its work so far reached the origin (a checkpoint after its second turn: the first
        # one, before its Write ran, holds only what it had spent).

        def file_checkpointed() -> bool:
            if not team.origin_branches(checkpoint):
                return False
            return f"{victim}.py" in git(team.origin, "ls-tree", "--name-only", checkpoint)

        wait_for(
            file_checkpointed,
            120,
            lambda: f"no checkpoint of {victim}.py on {checkpoint}\n" + team.logs_tail(),
        )
        # The other two finish first: finished work must not be paid again, wherever it ran.
        for name in names[1:]:
            wait_for(
                lambda name=name: any(
                    c["name"].endswith(name) and c["state_type"] == "COMPLETED"
                    for c in team.children(goal_id)
                ),
                120,
                lambda: "the other tasks did not finish\n" + team.logs_tail(),
            )
        victim_run = next(c for c in team.children(goal_id) if c["name"].endswith(victim))
        where = team.machine_of(victim_run)
        machine = next(m for m in team.machines if m.name == where)
        killed = machine.kill_processes()
        killed_at = time.time()
        assert killed, f"nothing ran on {machine.name}"
        try:
            thread.join(600)
            proc = out["proc"]
            assert proc.returncode == 0, proc.stderr[-3000:] + team.logs_tail()
            report = json.loads(proc.stdout)
            assert report["status"] == "succeeded", report["error"]
            # Prefect noticed the silence and scheduled the same flow run again, in bounded time.
            states = team.states(victim_run["id"])
            again = [s for s in states if s["name"] == "AwaitingRetry"]
            assert again, [s["name"] for s in states]
            noticed = datetime.fromisoformat(again[0]["timestamp"]).timestamp() - killed_at
            assert noticed <= HEARTBEAT_SECONDS + SILENCE_SECONDS + 30, noticed
            print(f"\n[figures] lost machine noticed after {noticed:.1f} s")
            final = team.flow_run(victim_run["id"])
            assert final["state_type"] == "COMPLETED" and final["run_count"] == 2
            # ... on another machine.
            took = team.machines_of(final)
            assert machine.name in took and len(took) == 2, took
            # Nothing lost: every file merged; the killed attempt's work kept on the origin.
            for name in names:
                assert team.show(report["integration_branch"], f"{name}.py")
            assert team.show(checkpoint, f"{victim}.py") == f"VALUE = {victim!r}\n"
            victim_result = next(t for t in report["tasks"] if t["id"] == victim)
            attempts = victim_result["attempts"]
            assert [a["outcome"] for a in attempts] == ["interrupted", "finished"], attempts
            assert attempts[0]["branch"] == checkpoint and attempts[0]["cost_usd"] > 0
            assert victim_result["cost_usd"] == pytest.approx(
                sum(a["cost_usd"] for a in attempts), abs=1e-6
            )
            # No finished task was paid twice; only the killed one ran twice.
            assert sessions_per_task(team, marker) == {victim: 2, names[1]: 1, names[2]: 1}
            # The dead machine's disk still holds the attempt's worktree.
            assert list((machine.disk() / "claudecluster").rglob(f"{victim}.py"))
        finally:
            machine.start_worker(limit=6)


class TestManyPeople:
    def test_ten_goals_at_once_share_the_sessions(
        self, team: Team, tmp_path: Path, marker: str
    ) -> None:
        """Ten people start a goal each with ``prefect deployment run``, wanting 20 sessions
        at once (2 per goal) from a limit of 6: every goal gets its turn."""
        limit = 6
        goals = {
            f"{marker}-g{g}": [f"{marker.lower()[-6:]}g{g}t{t}" for t in range(3)]
            for g in range(10)
        }
        for goal_marker, names in goals.items():
            for name in names:
                team.model.add_script(file_task_script(goal_marker, name, turn_s=1.0))
        assert team.cli("setup", "--team", "--sessions", str(limit)).returncode == 0
        ids: dict[str, str] = {}
        lock = threading.Lock()

        def submit(goal_marker: str) -> None:
            params = {
                "goal": goal_marker,
                "repo": team.repo_url,
                "pool": POOL,
                "max_parallel": 2,
                "plan": file_plan(goal_marker, goals[goal_marker], goal=goal_marker),
            }
            proc = team.prefect(
                "deployment", "run", GOAL_DEPLOYMENT, "--params", json.dumps(params)
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr
            found = UUID_RE.findall(proc.stdout)
            with lock:
                ids[goal_marker] = found[-1]

        try:
            threads = [threading.Thread(target=submit, args=(g,)) for g in goals]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert len(ids) == len(goals)
            runs = {g: team.wait_final(run_id, timeout_s=800) for g, run_id in ids.items()}
        finally:
            assert team.cli("setup", "--team", "--sessions", "12").returncode == 0
        assert {g: r["state_type"] for g, r in runs.items()} == dict.fromkeys(goals, "COMPLETED")

        # Each integration branch holds its own goal's work and nothing else.
        for goal_marker, run in runs.items():
            branch = f"claudecluster/{run['name']}/integration"
            changed = git(team.origin, "diff", "--name-only", f"main...{branch}").split()
            assert sorted(changed) == sorted(f"{n}.py" for n in goals[goal_marker]), changed

        # Never more sessions at once than the limit ...
        sessions = {
            s.script: s
            for s in team.model.sessions().values()
            if s.script and s.script.startswith(marker)
        }
        assert len(sessions) == 30
        edges = sorted(
            [(s.first_started_at, 1) for s in sessions.values()]
            + [(s.last_ended_at or time.time(), -1) for s in sessions.values()]
        )
        running = peak = 0
        for _, step in edges:
            running += step
            peak = max(peak, running)
        assert peak <= limit, peak
        # ... and no goal starved: how long a goal's tasks waited for a session after their
        # goal dispatched them is about the same for every goal.
        waits: dict[str, float] = {}
        for goal_marker, run in runs.items():
            queued = []
            for child in team.children(run["id"]):
                task = child["name"].removeprefix(f"{run['name']}-")
                session = sessions[f"{goal_marker}-{task}"]
                created = datetime.fromisoformat(child["created"]).timestamp()
                queued.append(session.first_started_at - created)
            waits[goal_marker] = sum(queued) / len(queued)
        mean = sum(waits.values()) / len(waits)
        print(f"\n[figures] ten goals: peak {peak} sessions, waits {sorted(waits.values())}")
        assert max(waits.values()) <= 2 * mean + 15, sorted(waits.values())
