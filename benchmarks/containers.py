"""Per-task overhead of the Docker pool against the local pool, on the demo's five tasks.

    . .venv/bin/activate
    bash .ci/docker-setup                       # engine + claudecluster-worker:latest
    python benchmarks/containers.py --repeat 2  # writes benchmarks/results/containers.md

A throwaway Prefect server with a Docker worker (the tests' harness), the scripted model on
loopback, and the demo's plan on a fresh sample project per run: once on the local pool, once
on ``claudecluster-docker`` (single box: no result storage, results come back through git).
For every container it splits the lifetime of the task's flow run into phases, from the flow
run's record, its logs, and ``docker events``:

    queued    flow run created (the driver dispatches)  -> container created (worker polled)
    create    container created                         -> container started
    boot      container started                         -> the flow run is Running (Python,
                                                           Prefect import, flow load)
    prepare   Running                                   -> the session starts (clone,
                                                           worktree, storage probe, settings)
    session   the Claude Code session, as long as its task commit's trailer says
    finish    session end                               -> flow run ends (verify, commit,
                                                           push, result, state)
    exit      flow run ends                             -> the container dies

Not part of the test suite; no assertion. See the table's notes for how to read it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from claudecluster.demo import (  # noqa: E402
    DEMO_GOAL,
    create_sample_project,
    demo_plan,
    demo_scripts,
)
from claudecluster.testing import ScriptedModelServer  # noqa: E402
from tests.cluster import Cluster, running_cluster  # noqa: E402

POOL = "claudecluster-docker"
SETTINGS_BLOCK = "bench-docker"
VERIFY = "python -m pytest -q"
PHASES = ("queued", "create", "boot", "prepare", "session", "finish", "exit")


@dataclass
class Side:
    """One run of the demo plan on one pool."""

    pool: str
    wall_s: float
    report: dict[str, Any]
    phases: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> phase -> s


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def _save_settings(cluster: Cluster, model: ScriptedModelServer) -> None:
    script = (
        "import sys\n"
        "from pydantic import SecretStr\n"
        "from claudecluster.blocks import ClaudeCodeSettings\n"
        "ClaudeCodeSettings(api_key=SecretStr(sys.argv[1]), base_url=sys.argv[2])"
        f".save('{SETTINGS_BLOCK}', overwrite=True)\n"
    )
    proc = cluster.run(
        sys.executable, "-c", script, model.env()["ANTHROPIC_API_KEY"], model.base_url
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)


def _run(cluster: Cluster, workdir: Path, pool: str | None, parallel: int) -> Side:
    repo = create_sample_project(Path(tempfile.mkdtemp(dir=workdir)) / "sample")
    plan = workdir / "plan.json"
    plan.write_text(json.dumps({"goal": DEMO_GOAL, **demo_plan(VERIFY)}))
    args = ["run", "--plan", str(plan), "--repo", str(repo), "-P", str(parallel), "--json"]
    if pool:
        args += ["--pool", pool, "--settings-block", SETTINGS_BLOCK]
    env = {k: v for k, v in cluster.env.items() if not (pool and k.startswith("ANTHROPIC_"))}
    started = time.monotonic()
    since = int(time.time()) - 1
    proc = cluster.cli(*args, env=env)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{pool or 'local'} run failed: {proc.stderr[-2000:]}")
    side = Side(pool or "local", wall, json.loads(proc.stdout))
    if pool:
        side.phases = _container_phases(cluster, side.report, since)
    return side


def _container_phases(cluster: Cluster, report: dict[str, Any], since: int) -> dict[str, Any]:
    events = subprocess.run(
        [
            "docker", "events", "--since", str(since), "--until", str(int(time.time()) + 1),
            "--filter", "label=io.prefect.flow-run-id", "--format", "{{json .}}",
        ],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.splitlines()  # fmt: skip
    seen: dict[str, dict[str, float]] = {}
    for line in events:
        event = json.loads(line)
        flow_run_id = event["Actor"]["Attributes"].get("io.prefect.flow-run-id")
        if flow_run_id and event.get("status") in ("create", "start", "die"):
            seen.setdefault(flow_run_id, {})[event["status"]] = event["timeNano"] / 1e9
    durations = {t["id"]: t["duration_s"] for t in report["tasks"]}
    phases: dict[str, dict[str, float]] = {}
    for child in cluster.children(report["flow_run_id"]):
        task_id = child["name"].removeprefix(f"{report['run_id']}-")
        docker = seen.get(child["id"], {})
        created, running, ended = (
            _ts(child["created"]),
            _ts(child["start_time"]),
            _ts(child["end_time"]),
        )
        logs = cluster.api(
            "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [child["id"]]}}}
        )
        session_at = next(
            (_ts(log["timestamp"]) for log in logs if " started: model=" in log["message"]),
            None,
        )
        if None in (created, running, ended, session_at) or len(docker) < 3:
            continue
        assert created and running and ended and session_at
        session = durations[task_id]
        phases[task_id] = {
            "queued": docker["create"] - created,
            "create": docker["start"] - docker["create"],
            "boot": running - docker["start"],
            "prepare": session_at - running,
            "session": session,
            "finish": ended - session_at - session,
            "exit": docker["die"] - ended,
            "container": docker["die"] - docker["create"],
        }
    return phases


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _table(local: list[Side], docker: list[Side]) -> str:
    lines = [
        "# Docker pool vs local pool: the demo's 5 tasks",
        "",
        f"Runs per side: {len(local)}; medians over runs (and over tasks for phases).",
        "",
        "| | local | docker |",
        "| --- | ---: | ---: |",
        f"| goal wall time (s) | {_median([s.wall_s for s in local]):.1f} "
        f"| {_median([s.wall_s for s in docker]):.1f} |",
    ]
    for label, key in (("task time in the report (s; docker: its session)", "duration_s"),):
        loc = [t[key] for s in local for t in s.report["tasks"]]
        doc = [t[key] for s in docker for t in s.report["tasks"]]
        lines.append(f"| {label} | {_median(loc):.1f} | {_median(doc):.1f} |")
    lines += ["", "Per container (median over all tasks of all docker runs, seconds):", ""]
    all_phases = [p for s in docker for p in s.phases.values()]
    lines += ["| phase | median | max |", "| --- | ---: | ---: |"]
    for phase in (*PHASES, "container"):
        values = [p[phase] for p in all_phases]
        lines.append(f"| {phase} | {_median(values):.1f} | {max(values, default=0):.1f} |")
    overhead = [p["container"] - p["session"] for p in all_phases]
    lines += [
        "",
        f"Per-task container overhead (container lifetime - session): median "
        f"{_median(overhead):.1f} s, max {max(overhead, default=0):.1f} s "
        f"(queued, i.e. waiting for the worker's poll, excluded from the lifetime: "
        f"{_median([p['queued'] for p in all_phases]):.1f} s median).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=2, help="runs per side")
    parser.add_argument("--latency", type=float, default=0.2, help="model seconds per answer")
    parser.add_argument("-P", "--max-parallel", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "results" / "containers.md"))
    args = parser.parse_args()

    model = ScriptedModelServer(demo_scripts(VERIFY), latency_s=args.latency)
    model.start()
    try:
        with tempfile.TemporaryDirectory(prefix="cc-bench-docker-") as tmp:
            workdir = Path(tmp)
            with running_cluster(
                workdir / "home",
                model,
                pool=POOL,
                deployments=("claudecluster-worker/docker",),
                before_worker=lambda cluster: _save_settings(cluster, model),
            ) as cluster:
                local: list[Side] = []
                docker: list[Side] = []
                _run(cluster, workdir, POOL, args.max_parallel)  # warm-up, not reported
                for _ in range(args.repeat):
                    local.append(_run(cluster, workdir, None, args.max_parallel))
                    docker.append(_run(cluster, workdir, POOL, args.max_parallel))
                    print(
                        f"local {local[-1].wall_s:.1f}s docker {docker[-1].wall_s:.1f}s",
                        file=sys.stderr,
                    )
    finally:
        model.stop()
    table = _table(local, docker)
    Path(args.out).write_text(table)
    Path(args.out).with_suffix(".json").write_text(
        json.dumps(
            [{"pool": s.pool, "wall_s": s.wall_s, "phases": s.phases} for s in local + docker],
            indent=1,
        )
    )
    print(table)


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    main()
