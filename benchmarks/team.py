"""A big goal through the team topology against the same goal on the embedded server.

    . .venv/bin/activate
    python benchmarks/team.py --tasks 256 --sessions 12   # writes benchmarks/results/team.md

Both sides run one plan of ``--tasks`` independent one-file tasks (scripted model, two turns
of ``--turn-s`` seconds each, no per-task verify) with at most ``--sessions`` sessions:

- **embedded**: ``claudecluster run -P N`` on the embedded SQLite server, sessions in the
  driver (what one person runs);
- **team**: the topology of ``tests/team.py`` (PostgreSQL, Redis, two API replicas and the
  services behind nginx; three worker machines, each a network namespace with its own
  disk, ``--sessions / 3`` flow runs each), ``claudecluster run --pool claudecluster-process``
  against a ``git://`` URL.

For each: makespan (the command's wall time), tasks per second, the lag of task-run records
(how long after the goal's end the server still showed new task runs of the goal and its
children), the server's CPU (API, services, load balancer, database, Redis; the embedded
server's process tree), and database growth. Needs root (namespaces), PostgreSQL, Redis and
nginx, like the tests. Not part of the test suite; no assertion.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from claudecluster.prefect_server import ensure_server, stop_server  # noqa: E402
from claudecluster.testing import ScriptedModelServer  # noqa: E402
from tests.integration.test_team import file_plan, file_task_script  # noqa: E402
from tests.team import AUTH_HEADER, POOL, Team, team_topology  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Side:
    """One run of the plan."""

    name: str
    wall_s: float
    tasks: int
    succeeded: int
    lag_s: float
    task_runs: int
    server_cpu_s: float
    db_growth_mb: float
    driver_peak_rss_mb: float


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds of ``pids`` and of their children, live or reaped."""
    total = 0.0
    seen: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(v) for v in fields[11:15]) / _TICK  # utime stime cutime cstime
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            todo.extend(int(c) for c in children)
    return total


def _api(api_url: str, method: str, path: str, body: Any = None) -> Any:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(
        api_url + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        # The team server wants it (tests/team.py starts it with one); the embedded one ignores it.
        headers={"Content-Type": "application/json", "Authorization": AUTH_HEADER},
    )
    with opener.open(request, timeout=60) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


def _record_lag(api_url: str, goal_id: str, ended: float) -> tuple[float, int]:
    """Seconds after ``ended`` until the goal's (and its children's) task-run records stop
    appearing, and how many there are then."""
    children = _api(
        api_url,
        "POST",
        "/flow_runs/filter",
        {"flow_runs": {"parent_flow_run_id": {"any_": [goal_id]}}, "limit": 200},
    )
    offset = 200
    while len(children) == offset:
        more = _api(
            api_url,
            "POST",
            "/flow_runs/filter",
            {
                "flow_runs": {"parent_flow_run_id": {"any_": [goal_id]}},
                "limit": 200,
                "offset": offset,
            },
        )
        children += more
        offset += 200
    ids = [goal_id, *(c["id"] for c in children)]
    count, last_change = -1, time.time()
    while time.time() - last_change < 20:
        now = _api(api_url, "POST", "/task_runs/count", {"flow_runs": {"id": {"any_": ids}}})
        if now != count:
            count, last_change = now, time.time()
        time.sleep(0.5)
    return max(0.0, last_change - ended), count


class _RssWatch:
    """Peak RSS of the driver process itself (not its sessions), sampled."""

    def __init__(self) -> None:
        self.peak_kb = 0

    def sample(self, pid: int) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.peak_kb = max(self.peak_kb, int(line.split()[1]))


def _drive(
    args: list[str], env: dict[str, str], api_url: str, timeout: float
) -> tuple[float, dict[str, Any], float]:
    """Run the CLI; returns wall seconds, the report and the driver's peak RSS (MB)."""
    watch = _RssWatch()
    started = time.monotonic()
    # Files, not pipes: the report of a big run is larger than a pipe's buffer.
    with (
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
        subprocess.Popen(
            [sys.executable, "-m", "claudecluster.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=err,
            text=True,
        ) as proc,
    ):
        while proc.poll() is None:
            watch.sample(proc.pid)
            time.sleep(0.5)
            if time.monotonic() - started > timeout:
                proc.kill()
        wall = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"run failed ({proc.returncode}): {err.read()[-3000:]}")
        return wall, json.loads(out.read()), watch.peak_kb / 1024


def _plan_file(workdir: Path, marker: str, tasks: int) -> Path:
    names = [f"m{i:04d}" for i in range(tasks)]
    plan = file_plan(marker, names, goal=f"{marker} load")
    plan["verify"] = None
    path = workdir / f"{marker}.json"
    path.write_text(json.dumps(plan))
    return path


def _scripts(model: ScriptedModelServer, marker: str, tasks: int, turn_s: float) -> None:
    for i in range(tasks):
        model.add_script(file_task_script(marker, f"m{i:04d}", turn_s=turn_s))


def embedded(workdir: Path, tasks: int, sessions: int, turn_s: float) -> Side:
    from tests.conftest import git

    home = workdir / "embedded-home"
    home.mkdir()
    os.environ.pop("PREFECT_API_URL", None)
    info = ensure_server(home)
    model = ScriptedModelServer().start()
    try:
        repo = workdir / "embedded-repo"
        repo.mkdir()
        git(repo, "init", "-q", "-b", "main")
        (repo / "README.md").write_text("# load\n")
        git(repo, "add", "-A")
        git(repo, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "-m", "init")
        _scripts(model, "EMB", tasks, turn_s)
        plan = _plan_file(workdir, "EMB", tasks)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
            **model.env(max_retries=2),
            "CLAUDECLUSTER_HOME": str(home),
            "PREFECT_API_URL": info.api_url,
            "PREFECT_HOME": str(home / "client"),
        }
        subprocess.run(
            [sys.executable, "-m", "claudecluster.cli", "setup", "--sessions", str(sessions)],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
        )
        db = home / "prefect" / "prefect.db"
        db_before = db.stat().st_size
        assert info.pid is not None
        cpu_before = _cpu_s([info.pid])
        wall, report, rss = _drive(
            ["run", "--plan", str(plan), "--repo", str(repo), "-P", str(sessions), "--json"],
            env,
            info.api_url,
            3600,
        )
        ended = time.time()
        lag, count = _record_lag(info.api_url, report["flow_run_id"], ended)
        cpu = _cpu_s([info.pid]) - cpu_before
        growth = (db.stat().st_size - db_before) / 1e6
        return Side(
            "embedded (SQLite, in-process sessions)",
            wall,
            tasks,
            sum(t["status"] == "succeeded" for t in report["tasks"]),
            lag,
            count,
            cpu,
            growth,
            rss,
        )
    finally:
        model.stop()
        stop_server(home)


def _team_server_pids(team: Team) -> list[int]:
    from claudecluster.team_server import TeamServer

    state = TeamServer.model_validate_json((team.home / "team" / "team-server.json").read_bytes())
    postmaster = int((team.postgres.data / "postmaster.pid").read_text().split()[0])
    return [*state.pids, postmaster, team.redis.process.pid]


def team_side(workdir: Path, tasks: int, sessions: int, turn_s: float) -> Side:
    with team_topology(workdir / "team", worker_limit=max(1, sessions // 3)) as team:
        proc = team.cli("setup", "--team", "--sessions", str(sessions))
        if proc.returncode != 0:
            raise SystemExit(proc.stderr)
        _scripts(team.model, "TEAM", tasks, turn_s)
        plan = _plan_file(workdir, "TEAM", tasks)
        pids = _team_server_pids(team)
        size_before = team.postgres.size_bytes()
        cpu_before = _cpu_s(pids)
        wall, report, rss = _drive(
            [
                "run",
                "--plan",
                str(plan),
                "--repo",
                team.repo_url,
                "--pool",
                POOL,
                "-P",
                str(sessions),
                "--json",
            ],
            team.env,
            team.api_url,
            3600,
        )
        ended = time.time()
        lag, count = _record_lag(team.api_url, report["flow_run_id"], ended)
        cpu = _cpu_s(pids) - cpu_before
        growth = (team.postgres.size_bytes() - size_before) / 1e6
        return Side(
            "team (PostgreSQL + Redis, 2 replicas, 3 machines)",
            wall,
            tasks,
            sum(t["status"] == "succeeded" for t in report["tasks"]),
            lag,
            count,
            cpu,
            growth,
            rss,
        )


def render(sides: list[Side], args: argparse.Namespace) -> str:
    lines = [
        f"# Team topology vs embedded server ({args.tasks} tasks, {args.sessions} sessions, "
        f"{args.turn_s:g} s per turn)",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on this machine "
        f"({os.cpu_count()} cores), `python benchmarks/team.py --tasks {args.tasks} "
        f"--sessions {args.sessions} --turn-s {args.turn_s:g}`.",
        "",
        "| side | makespan s | tasks/s | succeeded | task-run lag s | task runs | "
        "server CPU s | DB growth MB | driver peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in sides:
        lines.append(
            f"| {s.name} | {s.wall_s:.1f} | {s.tasks / s.wall_s:.2f} | {s.succeeded}/{s.tasks} "
            f"| {s.lag_s:.1f} | {s.task_runs} | {s.server_cpu_s:.1f} | {s.db_growth_mb:.1f} "
            f"| {s.driver_peak_rss_mb:.0f} |"
        )
    lines += [
        "",
        "Server CPU: the embedded server's process tree; for the team, the API replicas, the "
        "services, nginx, PostgreSQL and Redis. Task-run lag: seconds after the goal ended "
        "until no new task-run record of the goal or its worker flow runs appeared (polled "
        "every 0.5 s until 20 s without change). The team side also pays a Python process "
        "per task on the workers (Prefect's process worker), which the embedded side does "
        "not: on two cores that CPU competes with the sessions.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=256)
    parser.add_argument("--sessions", type=int, default=12)
    parser.add_argument("--turn-s", type=float, default=1.0)
    parser.add_argument("--sides", default="embedded,team")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "team.md")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="cc-team-bench-"))
    sides = []
    for side in args.sides.split(","):
        run = embedded if side == "embedded" else team_side
        sides.append(run(workdir, args.tasks, args.sessions, args.turn_s))
        print(render(sides, args), flush=True)
    args.out.write_text(render(sides, args))
    (args.out.with_suffix(".json")).write_text(json.dumps([s.__dict__ for s in sides], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
