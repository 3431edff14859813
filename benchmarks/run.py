"""ClaudeCluster vs. the floor (plain CLI processes in a process pool), on a scripted model.

    . .venv/bin/activate
    python benchmarks/run.py --quick                 # N=8,32 at K=4 + the depth-4 DAG
    python benchmarks/run.py                         # N=8,32,128 x K=2,4,8 + DAG
    python benchmarks/run.py --cases 128x8           # chosen cases only (NxK, or dag4xK)

See benchmarks/README.md for what is measured. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import claude_agent_sdk

from claudecluster.testing import Script, ScriptedModelServer, text, tool_use

HERE = Path(__file__).resolve().parent
CLAUDE = Path(claude_agent_sdk.__file__).parent / "_bundled" / "claude"
GIT_ID = ["-c", "user.name=Bench", "-c", "user.email=bench@localhost"]


# ----------------------------------------------------------------------------- workloads


@dataclass
class Task:
    id: str
    depends_on: list[str] = field(default_factory=list)

    @property
    def marker(self) -> str:
        return f"<<bench:{self.id}>>"

    @property
    def file(self) -> str:
        return f"bench_{self.id}.txt"

    @property
    def prompt(self) -> str:
        return f"Create the file {self.file} with one line of text. {self.marker}"


@dataclass
class Case:
    name: str
    n: int
    k: int
    layers: list[list[Task]]

    @property
    def tasks(self) -> list[Task]:
        return [t for layer in self.layers for t in layer]

    @property
    def depth(self) -> int:
        return len(self.layers)


def independent(n: int, k: int) -> Case:
    return Case(f"N={n} K={k}", n, k, [[Task(f"t{i:03d}") for i in range(n)]])


def dag(k: int, depth: int = 4, width: int = 4) -> Case:
    layers: list[list[Task]] = []
    for d in range(depth):
        prev = [t.id for t in layers[-1]] if layers else []
        layers.append([Task(f"d{d}-{w}", depends_on=prev) for w in range(width)])
    return Case(f"DAG {depth}x{width} K={k}", depth * width, k, layers)


def scripts_for(tasks: list[Task]) -> list[Script]:
    return [
        Script(
            name=t.id,
            match=t.marker,
            turns=[
                tool_use("Write", {"file_path": t.file, "content": f"written by {t.id}\n"}),
                text(f"Wrote {t.file}."),
            ],
        )
        for t in tasks
    ]


def make_repo(path: Path) -> str:
    path.mkdir(parents=True)
    (path / "README.md").write_text("# bench\n")
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "base"]):
        subprocess.run(["git", *GIT_ID, *args], cwd=path, check=True)
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=path, check=True, capture_output=True, text=True
    ).stdout.strip()


# ----------------------------------------------------------------------------- helpers


class PeakRss:
    """Poll VmHWM (peak RSS) of a pid and of its whole process tree (sum of VmRSS)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid, self.interval = pid, interval
        self.hwm_kb = 0
        self.tree_peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _status(pid: int) -> dict[str, int]:
        out: dict[str, int] = {}
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(("VmHWM:", "VmRSS:")):
                    out[line.split(":")[0]] = int(line.split()[1])
        except OSError:
            pass
        return out

    def _children(self, pid: int) -> list[int]:
        kids: list[int] = []
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                raw = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
                kids.extend(int(x) for x in raw)
        except OSError:
            pass
        return kids

    def _run(self) -> None:
        while not self._stop.is_set():
            st = self._status(self.pid)
            self.hwm_kb = max(self.hwm_kb, st.get("VmHWM", 0))
            todo, total = [self.pid], 0
            while todo:
                p = todo.pop()
                total += self._status(p).get("VmRSS", 0)
                todo.extend(self._children(p))
            self.tree_peak_kb = max(self.tree_peak_kb, total)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def children_cpu_s() -> float:
    """CPU seconds used by this process's waited-for children (and theirs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def group_cpu_s(pgid: int | None) -> float:
    """CPU seconds used so far by the live processes of a process group (the Prefect server)."""
    if pgid is None:
        return 0.0
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields[2] is pgrp; utime, stime are fields[11:13]
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def database_bytes(home: Path) -> int:
    """The embedded Prefect server's SQLite database and its write-ahead log, in bytes."""
    return sum(p.stat().st_size for p in (home / "prefect").glob("prefect.db*") if p.is_file())


def server_pid(home: Path) -> int | None:
    try:
        return int(json.loads((home / "server.json").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


class CpuMeter:
    """CPU seconds of (our children, the Prefect server) between start and stop."""

    def __init__(self, server_pgid: int | None) -> None:
        self.pgid = server_pgid
        self.children0, self.server0 = children_cpu_s(), group_cpu_s(server_pgid)

    def stop(self) -> dict[str, float]:
        return {
            "children_cpu_s": children_cpu_s() - self.children0,
            "server_cpu_s": group_cpu_s(self.pgid) - self.server0,
        }


def session_stats(server: ScriptedModelServer) -> dict[str, Any]:
    msgs = [r for r in server.requests if r.path == "/v1/messages"]
    sessions = server.sessions()
    return {
        "first_request": min((r.started_at for r in msgs), default=None),
        "last_response": max((r.ended_at for r in msgs if r.ended_at), default=None),
        "requests": len(msgs),
        "unmatched": sum(1 for r in msgs if r.script is None),
        "sessions": len(sessions),
    }


def env_for_model(server: ScriptedModelServer, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("PREFECT_API_URL", "PREFECT_UI_URL"):
        env.pop(key, None)
    env.update(server.env())
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- the floor


def run_floor(
    case: Case, server: ScriptedModelServer, work: Path, prefect_home: Path | None = None
) -> dict[str, Any]:
    repo = work / "floor-repo"
    base = make_repo(repo)
    trees: dict[str, Path] = {}
    for t in case.tasks:  # untimed: worktrees made in advance
        trees[t.id] = work / "floor-wt" / t.id
        subprocess.run(
            ["git", "worktree", "add", "-q", "-b", f"floor/{t.id}", str(trees[t.id]), base],
            cwd=repo,
            check=True,
        )
    server.reset()
    durations: dict[str, float] = {}
    failures: list[str] = []

    def one(t: Task) -> None:
        cfg = tempfile.mkdtemp(prefix="floor-cfg-", dir=work)
        env = env_for_model(server, CLAUDE_CONFIG_DIR=cfg)
        t0 = time.time()
        proc = subprocess.run(
            [str(CLAUDE), "-p", t.prompt, "--permission-mode", "acceptEdits",
             "--allowedTools", "Write,Edit,Read", "--max-turns", "5", "--output-format", "json"],
            cwd=trees[t.id], env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        durations[t.id] = time.time() - t0
        if proc.returncode != 0 or not (trees[t.id] / t.file).exists():
            failures.append(
                f"{t.id}: rc={proc.returncode} {proc.stdout[-300:]} {proc.stderr[-300:]}"
            )

    cpu = CpuMeter(server_pid(prefect_home) if prefect_home else None)
    t_start = time.time()
    with ThreadPoolExecutor(case.k) as pool:
        for layer in case.layers:  # layer by layer; no merging between layers
            list(pool.map(one, layer))
    makespan = time.time() - t_start
    stats = session_stats(server)
    return {
        "makespan_s": makespan,
        "cpu": cpu.stop(),
        "session_mean_s": statistics.mean(durations.values()),
        "session_max_s": max(durations.values()),
        "first_session_after_start_s": (stats["first_request"] or t_start) - t_start,
        "failures": failures,
        "model": stats,
    }


# ----------------------------------------------------------------------------- ClaudeCluster


def plan_yaml(case: Case) -> str:
    lines = [f"goal: benchmark {case.name}", "tasks:"]
    for t in case.tasks:
        lines += [
            f"  - id: {t.id}",
            f"    title: Write {t.file}",
            f'    prompt: "{t.prompt}"',
            f"    paths: [{t.file}]",
            f"    depends_on: [{', '.join(t.depends_on)}]",
        ]
    return "\n".join(lines) + "\n"


def run_cc(
    case: Case, server: ScriptedModelServer, work: Path, home: Path, *, profile: Path | None = None
) -> dict[str, Any]:
    repo = work / "cc-repo"
    make_repo(repo)
    plan = work / "plan.yaml"
    plan.write_text(plan_yaml(case))
    timings = work / "cc-timings.json"
    server.reset()
    cmd = [sys.executable, str(HERE / "cc_driver.py"), str(timings), "run", "--plan", str(plan),
           "--repo", str(repo), "--max-parallel", str(case.k), "--json"]  # fmt: skip
    if profile is not None:
        # Collapsed stacks (one line per stack, thread names kept; only threads holding the
        # GIL, i.e. the Python CPU) for a .txt path.
        raw = ["--format", "raw", "--threads", "--gil"] if profile.suffix == ".txt" else []
        cmd = ["py-spy", "record", "--subprocesses", *raw, "-o", str(profile), "--", *cmd]
    t_start = time.time()
    env = env_for_model(server, CLAUDECLUSTER_HOME=str(home), BENCH_T_EXEC=repr(t_start))
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=work
    )
    rss = PeakRss(proc.pid)
    cpu = CpuMeter(server_pid(home))
    db_before = database_bytes(home)
    out, err = proc.communicate(timeout=3600)
    makespan = time.time() - t_start
    rss.stop()
    db_growth = database_bytes(home) - db_before
    stats = session_stats(server)
    try:
        report = json.loads(out)
    except ValueError:
        report = {"status": "no-report", "stdout": out[-2000:], "stderr": err[-4000:]}
    tim = json.loads(timings.read_text()) if timings.exists() else {"spans": []}
    tasks = report.get("tasks") or []
    timed = breakdown(tim, tasks, t_start)
    merge_end = timed["run"].get("merge_end_s")
    last_response = stats["last_response"]
    return {
        "makespan_s": makespan,
        "db_growth_bytes": db_growth,
        "last_merge_after_last_session_s": (
            merge_end - (last_response - t_start) if merge_end and last_response else None
        ),
        "cpu": cpu.stop(),
        "exit_code": proc.returncode,
        "status": report.get("status"),
        "succeeded": sum(1 for t in tasks if t.get("status") == "succeeded"),
        "merged_tasks": len(tasks) - len(report.get("unmerged") or []),
        "first_session_after_start_s": (stats["first_request"] or t_start) - t_start,
        "driver_peak_rss_mb": rss.hwm_kb / 1024,
        "tree_peak_rss_mb": rss.tree_peak_kb / 1024,
        "breakdown": timed,
        "model": stats,
        "stderr_tail": err[-1500:] if proc.returncode else "",
    }


def cli_cpu_s(cc: dict[str, Any]) -> float:
    """CPU seconds of a ClaudeCluster run's Claude Code CLIs."""
    return float(cc["breakdown"]["run"]["children_cpu_by_program_s"].get("claude", 0.0))


def breakdown(tim: dict[str, Any], tasks: list[dict[str, Any]], t_start: float) -> dict[str, Any]:
    """Per-task means of each phase (seconds) and the run-level phases."""
    spans = tim.get("spans", [])
    per: dict[str, dict[str, float]] = {}
    run: dict[str, float] = {}
    for s in spans:
        d = s["t1"] - s["t0"]
        if s["task"] is None or s["phase"] in ("run_tasks", "integrate", "run_artifacts"):
            run[s["phase"]] = run.get(s["phase"], 0.0) + d
            run[s["phase"] + "_t0"] = s["t0"] - t_start
            run[s["phase"] + "_t1"] = s["t1"] - t_start
            continue
        task = per.setdefault(s["task"], {})
        if s["phase"] in ("submit", "observed"):
            task[s["phase"]] = s["t0"] if s["phase"] == "submit" else s["t1"]
        elif s["phase"] == "combine":
            task["body_start"] = s["t0"]
            task["combine"] = task.get("combine", 0) + d
        else:
            task[s["phase"]] = task.get(s["phase"], 0.0) + d
            if s["phase"] in ("execute", "session", "slot_wait"):
                task[s["phase"] + "_t0"], task[s["phase"] + "_t1"] = s["t0"], s["t1"]
            if s["phase"] == "task_artifacts":
                task["body_end"] = s["t1"]
    rows = []
    for t in per.values():
        if "submit" not in t or "observed" not in t:
            continue
        body_start = t.get("body_start", t.get("execute_t0", t["submit"]))
        body_end = t.get("body_end", t.get("execute_t1", t["observed"]))
        # The CLI boots while its task waits for a place: that part of the session span is
        # queueing (hidden behind other sessions), the rest is the session proper.
        waited = max(
            0.0,
            min(t.get("session_t1", 0), t.get("slot_wait_t1", 0))
            - max(t.get("session_t0", 0), t.get("slot_wait_t0", 0)),
        )
        session = t.get("session", 0.0) - waited
        rows.append(
            {
                "task_wall": t["observed"] - t["submit"],
                "session": session,
                "prefect_task_run": (body_start - t["submit"]) + (t["observed"] - body_end),
                "worktree": t.get("worktree_add", 0) + t.get("worktree_remove", 0) + t.get("combine", 0),
                "commit_diff": t.get("commit", 0) + t.get("diff", 0),
                "verify": t.get("verify", 0),
                "slot_wait": t.get("slot_wait", 0),
                "sdk_boot": t.get("sdk_spawn", 0) + t.get("sdk_initialize", 0),
                "artifacts": t.get("task_artifacts", 0),
            }
        )  # fmt: skip
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0]} if rows else {}
    if mean:
        # Waiting for a session place is queueing (the task was submitted ahead), not overhead.
        mean["overhead_total"] = mean["task_wall"] - mean["session"] - mean["slot_wait"]
        mean["other_in_task"] = mean["overhead_total"] - sum(
            mean[k] for k in ("prefect_task_run", "worktree", "commit_diff", "verify", "artifacts")
        )  # logging, the worker task's own steps
    n = max(1, len(rows))
    run_level = {
        "startup_to_run_tasks_s": run.get("run_tasks_t0"),
        "run_tasks_s": run.get("run_tasks"),
        "merge_s": run.get("integrate"),
        "merge_end_s": run.get("integrate_t1"),
        "merge_per_task_s": (run.get("integrate") or 0) / n,
        "run_artifacts_s": run.get("run_artifacts"),
        "after_run_tasks_to_exit_s": (tim.get("t_end", 0) - t_start)
        - (run.get("run_tasks_t1") or 0)
        if run.get("run_tasks_t1")
        else None,
        "driver_imports_s": tim.get("t_main", t_start) - t_start if tim.get("t_main") else None,
        "driver_cpu_s": tim.get("cpu_self_s"),
        # CPU of the driver's children as they were reaped, by program: the CLIs ("claude"),
        # git, and anything else.
        "children_cpu_by_program_s": tim.get("cpu_children_by_program_s", {}),
    }
    return {"per_task_mean_s": mean, "run": run_level, "tasks_timed": len(rows)}


# ----------------------------------------------------------------------------- servers


def cc_cli(home: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CLAUDECLUSTER_HOME=str(home))
    env.pop("PREFECT_API_URL", None)
    return subprocess.run(
        [str(Path(sys.executable).parent / "claudecluster"), *args],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


# ----------------------------------------------------------------------------- integration


def integrate_bench(work: Path, branches: int = 64) -> dict[str, Any]:
    from claudecluster.integrate import integrate
    from claudecluster.models import TaskResult, TaskSpec, TaskStatus
    from claudecluster.plan import Plan

    repo = work / "integ-repo"
    base = make_repo(repo)
    run_id = "bench-integ"
    specs, results = [], {}
    for i in range(branches):
        tid = f"t{i:03d}"
        branch = f"claudecluster/{run_id}/{tid}"
        subprocess.run(["git", "checkout", "-q", "-b", branch, base], cwd=repo, check=True)
        (repo / f"bench_{tid}.txt").write_text(f"{tid}\n")
        subprocess.run(["git", *GIT_ID, "add", "-A"], cwd=repo, check=True)
        subprocess.run(["git", *GIT_ID, "commit", "-q", "-m", tid], cwd=repo, check=True)
        specs.append(TaskSpec(id=tid, title=f"Write {tid}", prompt="x", paths=[f"bench_{tid}.txt"]))
        results[tid] = TaskResult(
            id=tid, status=TaskStatus.SUCCEEDED, branch=branch, base_commit=base
        )
    subprocess.run(["git", "checkout", "-q", "main"], cwd=repo, check=True)
    plan = Plan(goal="integrate", tasks=specs)
    t0 = time.time()
    outcome = integrate(
        str(repo), base, run_id, plan, results, verify=None, verify_timeout_s=60,
        worktree_root=work / "integ-wt",
    )  # fmt: skip
    elapsed = time.time() - t0
    return {
        "branches": branches,
        "seconds": elapsed,
        "merged": len(outcome.merged),
        "unmerged": len(outcome.unmerged),
        "per_branch_s": elapsed / branches,
    }


# ----------------------------------------------------------------------------- report


def lower_bound(case: Case, work_s: float) -> float:
    return max(case.depth * work_s, case.n * work_s / case.k)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose makespan is the median (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r["makespan_s"])
    return ordered[(len(ordered) - 1) // 2]


def case_entry(
    case: Case, floors: list[dict[str, Any]], ccs: list[dict[str, Any]]
) -> dict[str, Any]:
    """One case's figures: medians over its runs, with every run kept."""
    f, cc = median_run(floors), median_run(ccs)
    floor_s = statistics.median(r["makespan_s"] for r in floors)
    cc_s = statistics.median(r["makespan_s"] for r in ccs)
    ratios = [c["makespan_s"] / fl["makespan_s"] for fl, c in zip(floors, ccs, strict=True)]
    bound = lower_bound(case, statistics.median(r["session_mean_s"] for r in floors))
    return {
        "case": case.name,
        "kind": "dag" if case.depth > 1 else "independent",
        "n": case.n,
        "k": case.k,
        "floor_makespan_s": floor_s,
        "cc_makespan_s": cc_s,
        "ratio": cc_s / floor_s,
        "ratios": ratios,
        "lower_bound_s": bound,
        "amortized_overhead_per_task_s": (cc_s - floor_s) * case.k / case.n,
        # The driver, its git children and the server: the driver's whole tree minus its CLIs
        # (each CLI's CPU recorded when it was reaped), plus the server.
        "orchestration_cpu_per_task_s": (
            cc["cpu"]["children_cpu_s"] - cli_cpu_s(cc) + cc["cpu"]["server_cpu_s"]
        )
        / case.n,
        "floor": f,
        "cc": cc,
        "floor_runs": [r["makespan_s"] for r in floors],
        "cc_runs": [r["makespan_s"] for r in ccs],
    }


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def write_outputs(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    repeat = results.get("repeat", 1)
    lines = [
        f"# ClaudeCluster benchmark ({results['started']}, latency {results['latency_s']} s, "
        f"{results['cpus']} CPUs, {repeat} run(s) of each side per case, medians)",
        "",
        "| case | floor makespan s | CC makespan s | ratio CC/floor (min–max) | lower bound s "
        "| CC/bound | floor mean session s | CC ok/merged | per-task overhead s "
        "| amortized overhead s/task | first session s (CC / floor) | driver peak RSS MB "
        "| CPU s: floor CLIs / CC CLIs / CC driver+git / CC server | orchestration CPU s/task "
        "| last merge after last session s | DB growth KB/task |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["cases"]:
        f, cc = c["floor"], c["cc"]
        m = cc["breakdown"]["per_task_mean_s"]
        spread = f"{min(c['ratios']):.2f}–{max(c['ratios']):.2f}" if len(c["ratios"]) > 1 else ""
        lines.append(
            f"| {c['case']} | {c['floor_makespan_s']:.2f} | {c['cc_makespan_s']:.2f} | "
            f"**{c['ratio']:.2f}** {spread} | {c['lower_bound_s']:.2f} | "
            f"{c['cc_makespan_s'] / c['lower_bound_s']:.2f} | "
            f"{f['session_mean_s']:.2f} | {cc['succeeded']}/{cc['merged_tasks']} of {c['n']} | "
            f"{m.get('overhead_total', float('nan')):.2f} | {c['amortized_overhead_per_task_s']:.2f} | "
            f"{cc['first_session_after_start_s']:.2f} / {f['first_session_after_start_s']:.2f} | "
            f"{cc['driver_peak_rss_mb']:.0f} | {f['cpu']['children_cpu_s']:.1f} / "
            f"{cli_cpu_s(cc):.1f} / {cc['cpu']['children_cpu_s'] - cli_cpu_s(cc):.1f} / "
            f"{cc['cpu']['server_cpu_s']:.1f} | "
            f"{c['orchestration_cpu_per_task_s']:.2f} | "
            f"{_num(cc.get('last_merge_after_last_session_s'))} | "
            f"{cc.get('db_growth_bytes', 0) / 1024 / c['n']:.1f} |"
        )  # fmt: skip
    lines += [
        "",
        "## Per-task overhead breakdown (means over the tasks of the median CC run, seconds)",
        "",
        "Overhead = task wall − session − waiting for a session place. Tasks are submitted",
        "ahead of a free place, so that wait is queueing, not cost. The CLI's boot is part of",
        "the session (it is in the floor's session too).",
        "",
        "| case | task wall | waiting for a place | session (SDK+CLI) | of which CLI boot "
        "| floor session | Prefect task run | worktree | commit+diff | verify | artifacts "
        "| other | overhead | merge/task | run startup | after run_tasks | driver CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["cases"]:
        cc, f = c["cc"], c["floor"]
        m, r = cc["breakdown"]["per_task_mean_s"], cc["breakdown"]["run"]
        if not m:
            continue
        g = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(
            f"| {c['case']} | {g(m['task_wall'])} | {g(m['slot_wait'])} | {g(m['session'])} "
            f"| {g(m['sdk_boot'])} | {g(f['session_mean_s'])} "
            f"| {g(m['prefect_task_run'])} | {g(m['worktree'])} | {g(m['commit_diff'])} "
            f"| {g(m['verify'])} | {g(m['artifacts'])} | {g(m['other_in_task'])} "
            f"| {g(m['overhead_total'])} | {g(r['merge_per_task_s'])} "
            f"| {g(r['startup_to_run_tasks_s'])} | {g(r['after_run_tasks_to_exit_s'])} "
            f"| {g(r.get('driver_cpu_s'))} |"
        )
    fs = results.get("first_session", {})
    if fs:
        lines += ["", "## Time to first session after `run` (s, to the model's first request)", ""]
        for key, value in fs.items():
            lines.append(f"- {key}: {value if isinstance(value, str) else f'{value:.2f}'}")
    ib = results.get("integrate")
    if ib:
        lines += [
            "",
            f"## Integration: {ib['branches']} branches merged in {ib['seconds']:.2f} s "
            f"({ib['per_branch_s'] * 1000:.0f} ms/branch; merged {ib['merged']}, "
            f"unmerged {ib['unmerged']})",
        ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "ratio.png")


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no ratio.png (pip install matplotlib)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    by_k: dict[int, list[tuple[int, float]]] = {}
    for c in results["cases"]:
        if c["kind"] == "independent":
            by_k.setdefault(c["k"], []).append((c["n"], c["ratio"]))
    for k, pts in sorted(by_k.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"K={k}")
    for c in results["cases"]:
        if c["kind"] == "dag":
            ax.scatter([c["n"]], [c["ratio"]], marker="x", s=60, label=f"DAG 4x4 K={c['k']}")
    ax.axhline(1.10, color="red", linestyle="--", linewidth=1, label="target 1.10")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N tasks")
    ax.set_ylabel("makespan ratio ClaudeCluster / floor")
    ax.set_title(f"latency {results['latency_s']} s per model turn")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- main


def parse_cases(spec: str) -> list[Case]:
    cases = []
    for item in spec.split(","):
        n, k = item.strip().split("x")
        cases.append(dag(int(k)) if n == "dag4" else independent(int(n), int(k)))
    return cases


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N=8,32 at K=4 plus the DAG at K=4")
    p.add_argument("--cases", help="comma list of NxK (e.g. 8x4,128x8,dag4x4)")
    p.add_argument("--latency", type=float, default=1.0, help="model latency per turn (s)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--no-cold", action="store_true", help="skip the cold-server first-session run")
    p.add_argument("--no-integrate", action="store_true", help="skip the 64-branch integration")
    p.add_argument("--profile", action="store_true", help="py-spy the largest CC case")
    p.add_argument(
        "--profile-raw", action="store_true", help="with --profile: collapsed stacks, profile.txt"
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--repeat", type=int, default=1, help="runs of each side per case (medians reported)"
    )
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)  # py-spy writes its profile there mid-run

    if args.cases:
        cases = parse_cases(args.cases)
    elif args.quick:
        cases = [independent(8, 4), independent(32, 4), dag(4)]
    else:
        cases = [independent(n, k) for n in (8, 32, 128) for k in (2, 4, 8)] + [dag(4)]

    root = Path(tempfile.mkdtemp(prefix="cc-bench-"))
    warm_home = root / "home-warm"
    all_tasks = {t.id: t for c in cases for t in c.tasks}
    all_tasks.update({t.id: t for t in independent(8, 4).tasks})
    server = ScriptedModelServer(scripts_for(list(all_tasks.values())), latency_s=args.latency)
    server.start()
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "latency_s": args.latency,
        "cpus": os.cpu_count(),
        "cases": [],
        "first_session": {},
    }
    homes: list[Path] = []
    try:
        t0 = time.time()
        r = cc_cli(warm_home, "server", "start")
        homes.append(warm_home)
        results["warm_server_start_s"] = time.time() - t0
        print(f"prefect server (warm home {warm_home}): {r.stdout.strip()} {r.stderr.strip()}")
        # Warm-up run (imports, first flow registration), not reported.
        warm = independent(2, 2)
        (root / "warmup").mkdir()
        run_cc(warm, server, root / "warmup", warm_home)

        results["repeat"] = args.repeat
        biggest = max(cases, key=lambda c: c.n * 100 + c.k)
        for i, case in enumerate(cases):
            floors: list[dict[str, Any]] = []
            ccs: list[dict[str, Any]] = []
            for rep in range(args.repeat):
                work = root / f"case{i}-{rep}"
                (work / "f").mkdir(parents=True)
                (work / "c").mkdir(parents=True)
                # Alternate which side goes first, so drift in the machine hits both alike.
                order = ["floor", "cc"] if (i + rep) % 2 == 0 else ["cc", "floor"]
                for which in order:
                    print(f"[{time.strftime('%H:%M:%S')}] {case.name}: {which} ...", flush=True)
                    if which == "floor":
                        floors.append(run_floor(case, server, work / "f", warm_home))
                    else:
                        profile = case is biggest and rep == 0 and args.profile
                        name = "profile.txt" if args.profile_raw else "profile.svg"
                        # Absolute: py-spy runs in the case's work folder.
                        prof = (args.out / name).resolve() if profile else None
                        ccs.append(run_cc(case, server, work / "c", warm_home, profile=prof))
                f, cc = floors[-1], ccs[-1]
                print(
                    f"    floor {f['makespan_s']:.2f}s  cc {cc['makespan_s']:.2f}s  "
                    f"ratio {cc['makespan_s'] / f['makespan_s']:.2f}  cc status {cc['status']} "
                    f"({cc['succeeded']}/{case.n})  floor failures {len(f['failures'])}\n"
                    f"    cpu s: floor CLIs {f['cpu']['children_cpu_s']:.1f} (server "
                    f"{f['cpu']['server_cpu_s']:.1f}), cc driver+CLIs "
                    f"{cc['cpu']['children_cpu_s']:.1f} (server {cc['cpu']['server_cpu_s']:.1f})",
                    flush=True,
                )
                if f["failures"]:
                    print("    floor failure:", f["failures"][0][:400])
                if cc["exit_code"]:
                    print("    cc stderr:", cc["stderr_tail"][-800:])
            results["cases"].append(case_entry(case, floors, ccs))
            write_outputs(results, args.out)

        for c in results["cases"]:  # each case's median run, on the warm server
            results["first_session"][f"warm server, CC {c['case']}"] = c["cc"][
                "first_session_after_start_s"
            ]
        if not args.no_cold:
            cold_home = root / "home-cold"
            homes.append(cold_home)
            work = root / "cold"
            work.mkdir()
            print(f"[{time.strftime('%H:%M:%S')}] cold server: CC N=8 K=4 ...", flush=True)
            cold = run_cc(independent(8, 4), server, work, cold_home)
            results["first_session"]["cold server (run starts it), CC N=8 K=4"] = cold[
                "first_session_after_start_s"
            ]
            results["cold_run"] = cold
        results["first_session"]["floor (bare CLI), first request after pool start"] = next(
            (c["floor"]["first_session_after_start_s"] for c in results["cases"]), float("nan")
        )
        if not args.no_integrate:
            print(f"[{time.strftime('%H:%M:%S')}] integrate 64 branches ...", flush=True)
            (root / "integ").mkdir()
            results["integrate"] = integrate_bench(root / "integ")
        write_outputs(results, args.out)
    finally:
        for home in homes:
            r = cc_cli(home, "server", "stop")
            print(f"stopped server in {home}: {r.returncode} {r.stdout.strip()}")
        server.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
