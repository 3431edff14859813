"""Work pools end to end: a real Prefect server, real deployments and a real process worker.

One module-wide Prefect server (``ensure_server`` in a temporary home), ``claudecluster
setup``, ``prefect deploy --all`` and ``prefect worker start --pool claudecluster-process``
are shared by every test here. The driver runs as users run it: the ``claudecluster`` CLI or
``prefect deployment run``, as subprocesses pointed at that server. Sessions are real Claude
Code CLIs talking to the session-wide scripted model server.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from claudecluster.session import MARKER_VAR
from claudecluster.testing import (
    RequestView,
    Script,
    ScriptedModelServer,
    Turn,
    hang,
    text,
    tool_use,
    tool_uses,
)
from tests.cluster import (
    DEFAULT_SESSIONS,
    FINAL_STATES,
    Cluster,
    kill_pids,
    processes_with,
    running_cluster,
    wait_for,
)
from tests.conftest import git, snapshot

pytestmark = [pytest.mark.integration, pytest.mark.prefect_server, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
POOL = "claudecluster-process"
GOAL_DEPLOYMENT = "claudecluster-goal/goal"
WORKER_DEPLOYMENT = "claudecluster-worker/process"
SWEEP_DEPLOYMENT = "claudecluster-sweep/nightly-docstrings"
SESSION_LIMIT = "claudecluster-sessions"


def session_pids(home: Path) -> list[int]:
    """Live processes of Claude Code sessions started on behalf of this module's worker."""
    return [
        pid
        for pid in processes_with(f"CLAUDECLUSTER_HOME={home}")
        if MARKER_VAR.encode() in Path(f"/proc/{pid}/environ").read_bytes()
    ]


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, model_server: ScriptedModelServer
) -> Iterator[Cluster]:
    """A real Prefect server with ClaudeCluster set up, deployed, and a process worker."""
    with running_cluster(
        tmp_path_factory.mktemp("pools-home"),
        model_server,
        pool=POOL,
        deployments=(GOAL_DEPLOYMENT, WORKER_DEPLOYMENT, SWEEP_DEPLOYMENT),
    ) as made:
        yield made


# --------------------------------------------------------------------------- scripts and plans


def docstring_script(match: str, path: str, old: str, new: str) -> Script:
    """Read ``path``, then replace ``old`` by ``new`` in it."""
    return Script(
        name=f"{match}-{path}",
        match=match,
        turns=[
            tool_use("Read", {"file_path": path}),
            tool_use("Edit", {"file_path": path, "old_string": old, "new_string": new}),
            text("Done."),
        ],
    )


CALC_DOC = 'def add(a, b):\n    """Add."""\n'
SHOUT_DOC = 'def shout(text):\n    """Shout."""\n'


def add_docstring_scripts(server: ScriptedModelServer, marker: str) -> None:
    """Scripts for the two-task docstring plan of ``marker``."""
    server.add_script(docstring_script(f"{marker}-calc", "calc.py", "def add(a, b):\n", CALC_DOC))
    server.add_script(
        docstring_script(f"{marker}-strings", "strings.py", "def shout(text):\n", SHOUT_DOC)
    )


def docstring_plan(marker: str, *, chained: bool) -> dict[str, Any]:
    """Two tasks, one per file; with ``chained`` the second depends on the first."""
    return {
        "goal": "Add docstrings",
        "verify": "python -m pytest -q",
        "tasks": [
            {
                "id": "calc-doc",
                "kind": "docs",
                "title": "Docstring for calc.py",
                "prompt": f"{marker}-calc add a docstring to calc.py",
                "paths": ["calc.py"],
            },
            {
                "id": "strings-doc",
                "kind": "docs",
                "title": "Docstring for strings.py",
                "prompt": f"{marker}-strings add a docstring to strings.py",
                "paths": ["strings.py"],
                "depends_on": ["calc-doc"] if chained else [],
            },
        ],
    }


def write_plan(path: Path, plan: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(plan))
    return path


def branches(repo: Path, prefix: str = "claudecluster") -> list[str]:
    """Local branch names under ``prefix/``."""
    out = git(repo, "for-each-ref", "--format=%(refname:short)", f"refs/heads/{prefix}/")
    return sorted(out.split())


# --------------------------------------------------------------------------- tests


class TestRunOnPool:
    """`claudecluster run --pool`: every task is a child flow run on the process pool."""

    def test_tasks_run_as_child_flow_runs(
        self,
        cluster: Cluster,
        model_server: ScriptedModelServer,
        repo: Path,
        tmp_path: Path,
        marker: str,
    ) -> None:
        add_docstring_scripts(model_server, marker)
        plan = write_plan(tmp_path / "plan.yaml", docstring_plan(marker, chained=True))

        proc = cluster.cli(
            "run", "--plan", str(plan), "--repo", str(repo), "--pool", POOL, "--json"
        )

        assert proc.returncode == 0, proc.stderr + cluster.worker_tail()
        report = json.loads(proc.stdout)
        assert report["status"] == "succeeded", report["error"]
        assert [t["id"] for t in report["tasks"]] == ["calc-doc", "strings-doc"]
        assert all(t["status"] == "succeeded" for t in report["tasks"])
        # The dependent task started from its dependency's branch, across processes.
        branch = report["integration_branch"]
        assert CALC_DOC in git(repo, "show", f"{branch}:calc.py")
        assert SHOUT_DOC in git(repo, "show", f"{branch}:strings.py")
        strings_branch = report["tasks"][1]["branch"]
        assert CALC_DOC in git(repo, "show", f"{strings_branch}:calc.py")

        goal_run = cluster.flow_run(report["flow_run_id"])
        assert goal_run["state_type"] == "COMPLETED"
        assert goal_run["deployment_id"] is None  # the driver ran in the CLI
        children = cluster.children(goal_run["id"])
        run_id = report["run_id"]
        assert sorted(c["name"] for c in children) == [
            f"{run_id}-calc-doc",
            f"{run_id}-strings-doc",
        ]
        for child in children:
            assert child["deployment_id"] == cluster.deployment_ids[WORKER_DEPLOYMENT]
            assert child["work_pool_name"] == POOL
            assert child["state_type"] == "COMPLETED"
            parent_task_run = cluster.api("GET", f"/task_runs/{child['parent_task_run_id']}")
            assert parent_task_run["flow_run_id"] == goal_run["id"]
            assert child["parameters"]["unit"]["spec"]["id"] in child["name"]


class TestGoalDeployment:
    """`prefect deployment run claudecluster-goal/goal` with a pool: driver and workers on it."""

    def test_goal_deployment_completes_and_merges(
        self,
        cluster: Cluster,
        model_server: ScriptedModelServer,
        repo: Path,
        marker: str,
    ) -> None:
        add_docstring_scripts(model_server, marker)
        before = snapshot(repo)

        goal_id = cluster.run_deployment(
            GOAL_DEPLOYMENT,
            {
                "goal": "Add docstrings",
                "repo": str(repo),
                "plan": docstring_plan(marker, chained=False),
                "pool": POOL,
            },
        )

        goal_run = cluster.wait_final(goal_id)
        assert goal_run["state_type"] == "COMPLETED", goal_run["state"]
        assert goal_run["deployment_id"] == cluster.deployment_ids[GOAL_DEPLOYMENT]
        run_id = goal_run["name"]
        integration = f"claudecluster/{run_id}/integration"
        assert branches(repo) == sorted(
            [
                integration,
                f"claudecluster/{run_id}/calc-doc",
                f"claudecluster/{run_id}/strings-doc",
            ]
        )
        assert CALC_DOC in git(repo, "show", f"{integration}:calc.py")
        assert SHOUT_DOC in git(repo, "show", f"{integration}:strings.py")
        children = cluster.children(goal_id)
        assert sorted(c["name"] for c in children) == [
            f"{run_id}-calc-doc",
            f"{run_id}-strings-doc",
        ]
        assert all(
            c["deployment_id"] == cluster.deployment_ids[WORKER_DEPLOYMENT]
            and c["state_type"] == "COMPLETED"
            for c in children
        )
        assert snapshot(repo) == before


class TestUnknownPool:
    """A pool that cannot run tasks is bad input: exit 2, one line, nothing changed or started."""

    @pytest.mark.parametrize(
        ("where", "pool", "words"),
        [
            ("flag", "nope", "unknown pool 'nope'"),
            ("plan", "nope", "unknown pool 'nope'"),
            ("flag", "claudecluster-undeployed", "has no claudecluster-worker deployment"),
        ],
    )
    def test_pool_without_worker_deployment_exits_two(
        self,
        cluster: Cluster,
        repo: Path,
        tmp_path: Path,
        marker: str,
        where: str,
        pool: str,
        words: str,
    ) -> None:
        if pool == "claudecluster-undeployed":  # a real pool, but no worker deployment for it
            proc = cluster.prefect("work-pool", "create", pool, "--type", "process")
            assert proc.returncode == 0 or "already exists" in proc.stdout, proc.stdout
        plan = docstring_plan(marker, chained=False)
        if where == "plan":
            plan["pool"] = pool
        plan_file = write_plan(tmp_path / "plan.yaml", plan)
        before, refs = snapshot(repo), git(repo, "for-each-ref")
        goal_runs = {"flows": {"name": {"any_": ["claudecluster-goal"]}}}
        runs_before = cluster.api("POST", "/flow_runs/count", goal_runs)

        args = ["run", "--plan", str(plan_file), "--repo", str(repo)]
        proc = cluster.cli(*args, *(["--pool", pool] if where == "flag" else []))

        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("claudecluster: error:")
        assert words in lines[0]
        assert proc.stdout == ""
        assert snapshot(repo) == before
        assert git(repo, "for-each-ref") == refs
        assert cluster.api("POST", "/flow_runs/count", goal_runs) == runs_before


class Gate:
    """Holds each session's first reply until all ``parties`` sessions wait in it, or a timeout.

    Sessions that may run together therefore overlap for sure; under a limit of one, each
    waits alone for ``timeout_s`` (a ~4 s session) and they cannot overlap.
    """

    def __init__(self, parties: int, timeout_s: float) -> None:
        self.parties = parties
        self.timeout_s = timeout_s
        self.sessions: set[str | None] = set()
        self.condition = threading.Condition()

    def then(self, reply: Turn) -> Callable[[RequestView], Turn]:
        """A turn factory: wait at the gate, then answer ``reply``."""

        def factory(view: RequestView) -> Turn:
            with self.condition:
                self.sessions.add(view.session_id)
                self.condition.notify_all()
                self.condition.wait_for(
                    lambda: len(self.sessions) >= self.parties, timeout=self.timeout_s
                )
            return reply

        return factory


def write_file(path: str) -> Turn:
    """A turn that creates ``path``."""
    return tool_use("Write", {"file_path": path, "content": f"# {path}\n"})


class TestSessionLimit:
    """The claudecluster-sessions limit caps concurrent sessions across flow-run processes."""

    def test_limit_of_one_serialises_sessions(
        self,
        cluster: Cluster,
        model_server: ScriptedModelServer,
        repo: Path,
        tmp_path: Path,
        marker: str,
    ) -> None:
        names = [f"{marker}-slow-{n}" for n in range(3)]
        gate = Gate(parties=len(names), timeout_s=4.0)
        for n, name in enumerate(names):
            model_server.add_script(
                Script(name=name, match=name, turns=[gate.then(write_file(f"slow_{n}.py"))])
            )
        plan = {
            "goal": "Three slow tasks",
            "tasks": [
                {"id": f"slow-{n}", "title": f"Slow {n}", "prompt": f"{name} write a file"}
                for n, name in enumerate(names)
            ],
        }
        plan_file = write_plan(tmp_path / "plan.yaml", plan)

        cluster.set_sessions(1)
        try:
            proc = cluster.cli(
                "run",
                "--plan",
                str(plan_file),
                "--repo",
                str(repo),
                "--pool",
                POOL,
                "--max-parallel",
                "3",
                "--json",
            )
        finally:
            cluster.set_sessions(DEFAULT_SESSIONS)

        assert proc.returncode == 0, proc.stderr + cluster.worker_tail()
        report = json.loads(proc.stdout)
        assert [t["status"] for t in report["tasks"]] == ["succeeded"] * 3
        spans: dict[str, list[float]] = {}
        for request in model_server.requests:
            if request.script in names and request.session_id:
                assert request.ended_at is not None
                span = spans.setdefault(request.session_id, [request.started_at, 0.0])
                span[0] = min(span[0], request.started_at)
                span[1] = max(span[1], request.ended_at)
        assert len(spans) == 3
        ordered = sorted(spans.values())
        for (_, end), (start, _) in itertools.pairwise(ordered):
            assert start >= end, f"sessions overlapped: {ordered}"
        # The first two waited alone at the gate for its whole timeout.
        assert ordered[-1][1] - ordered[0][0] >= 2 * gate.timeout_s


class TestSweepSchedule:
    """The nightly sweep deployment carries its cron schedule and the server schedules it."""

    def test_cron_schedule_creates_scheduled_runs(self, cluster: Cluster) -> None:
        deployment = cluster.api("GET", f"/deployments/name/{SWEEP_DEPLOYMENT}")
        assert deployment["paused"] is False
        [schedule] = deployment["schedules"]
        assert schedule["active"] is True
        assert schedule["schedule"]["cron"] == "0 3 * * *"
        assert schedule["schedule"]["timezone"] == "UTC"

        def scheduled() -> list[dict[str, Any]]:
            return cluster.flow_runs(
                deployments={"id": {"any_": [deployment["id"]]}},
                flow_runs={"state": {"type": {"any_": ["SCHEDULED"]}}},
            )

        runs = wait_for(scheduled, 60, lambda: "no scheduled run of the sweep deployment")
        for run in runs:
            start = run["expected_start_time"]
            assert re.search(r"T03:00:00(\.0+)?(Z|\+00:00)$", start), start
            assert run["auto_scheduled"] is True
            assert run["parameters"]["sweep"]["name"] == "docstrings"


SWEEP_FILES = {
    "pkg/__init__.py": "",
    "pkg/alpha.py": "def alpha():\n    return 1\n",
    "pkg/beta.py": "def beta():\n    return 2\n",
    "pkg/gamma.py": "def gamma():\n    return 3\n",
    "README.md": "a sample\n",
}


def sweep_turns(marker: str) -> list[Callable[[RequestView], Turn]]:
    """Read every file the prompt lists under ``pkg/``, then put a docstring on top of each."""

    def listed(view: RequestView) -> list[str]:
        return re.findall(r"^- (pkg/\w+\.py)$", view.prompt, flags=re.MULTILINE)

    def read(view: RequestView) -> Turn:
        return tool_uses([("Read", {"file_path": path}) for path in listed(view)])

    def edit(view: RequestView) -> Turn:
        calls = []
        for path in listed(view):
            first = SWEEP_FILES[path].splitlines(keepends=True)[0]
            doc = f'"""{marker} {path}."""\n'
            calls.append(
                ("Edit", {"file_path": path, "old_string": first, "new_string": doc + first})
            )
        return tool_uses(calls)

    return [read, edit, lambda view: text("Done.")]


class TestSweep:
    """A glob sweep through the deployment: batches, then only what changed since the last."""

    def _sweep(self, cluster: Cluster, repo: Path, marker: str, name: str) -> str | None:
        """Run the sweep deployment on ``repo``; the run id of its goal (None: no goal ran)."""
        flow_run_id = cluster.run_deployment(
            SWEEP_DEPLOYMENT,
            {
                "repo": str(repo),
                "repo_block": None,
                "sweep": {
                    "name": name,
                    "prompt": f"{marker} add module docstrings to:\n{{files}}",
                    "include": ["pkg/*.py"],
                    "exclude": ["pkg/__init__.py"],
                    "batch_size": 2,
                    "changed_since_last": True,
                    "kind": "docs",
                },
            },
        )
        sweep_run = cluster.wait_final(flow_run_id)
        assert sweep_run["state_type"] == "COMPLETED", sweep_run["state"]
        goal_runs = cluster.children(flow_run_id)
        if not goal_runs:
            return None
        [goal_run] = goal_runs
        assert goal_run["state_type"] == "COMPLETED", goal_run["state"]
        return str(goal_run["name"])

    def _task_files(self, repo: Path, run_id: str) -> dict[str, list[str]]:
        prefix = f"claudecluster/{run_id}/"
        found = {}
        for branch in branches(repo, f"claudecluster/{run_id}"):
            task = branch.removeprefix(prefix)
            if task != "integration":
                changed = git(repo, "diff", "--name-only", "main", branch)
                found[task] = sorted(changed.split())
        return found

    def test_sweep_then_only_changed_files(
        self,
        cluster: Cluster,
        model_server: ScriptedModelServer,
        make_repo: Callable[..., Path],
        marker: str,
    ) -> None:
        model_server.add_script(
            Script(name=f"sweep-{marker}", match=marker, turns=sweep_turns(marker))
        )
        repo = make_repo(SWEEP_FILES, name="swept")
        name = f"doc-{marker.lower()}"  # already a slug: task ids and the variable use it

        run_id = self._sweep(cluster, repo, marker, name)

        assert run_id is not None
        assert self._task_files(repo, run_id) == {
            f"{name}-001": ["pkg/alpha.py", "pkg/beta.py"],
            f"{name}-002": ["pkg/gamma.py"],
        }
        integration = f"claudecluster/{run_id}/integration"
        for path in ("pkg/alpha.py", "pkg/beta.py", "pkg/gamma.py"):
            assert f'"""{marker} {path}."""' in git(repo, "show", f"{integration}:{path}")
        first_base = git(repo, "rev-parse", "main").strip()
        variable = cluster.api("GET", f"/variables/name/claudecluster-sweep-{name}")
        assert list(variable["value"].values()) == [first_base]

        (repo / "pkg/beta.py").write_text(SWEEP_FILES["pkg/beta.py"] + "\n\nBETA = 2\n")
        (repo / "README.md").write_text("changed, but not swept\n")
        git(repo, "commit", "-qam", "change beta")
        second_base = git(repo, "rev-parse", "main").strip()

        second_run_id = self._sweep(cluster, repo, marker, name)

        assert second_run_id not in (None, run_id)
        assert self._task_files(repo, second_run_id) == {f"{name}-001": ["pkg/beta.py"]}
        variable = cluster.api("GET", f"/variables/name/claudecluster-sweep-{name}")
        assert list(variable["value"].values()) == [second_base]
        refs = git(repo, "for-each-ref")

        assert self._sweep(cluster, repo, marker, name) is None  # nothing changed since
        assert git(repo, "for-each-ref") == refs


class TestBlocks:
    """Settings and repository blocks: saved, loaded, merged with flags, used by a run."""

    @pytest.fixture
    def prefect_client_settings(self, cluster: Cluster) -> Iterator[None]:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: cluster.api_url}):
            yield

    @pytest.mark.usefixtures("prefect_client_settings")
    def test_save_load_and_precedence(self, repo: Path, marker: str) -> None:
        from pydantic import SecretStr

        from claudecluster.blocks import ClaudeCodeSettings, TargetRepository
        from claudecluster.blocks.settings import resolve_settings
        from claudecluster.models import WorkerSettings

        name = f"settings-{marker.lower()}"
        key = f"sk-canary-{uuid.uuid4().hex}"
        ClaudeCodeSettings(max_turns=2, model="claude-haiku-4-5", api_key=SecretStr(key)).save(
            name, _sync=True
        )  # type: ignore[call-arg]
        TargetRepository(location=str(repo), branch="main").save(
            f"repo-{marker.lower()}", _sync=True
        )  # type: ignore[call-arg]

        loaded = ClaudeCodeSettings.load(name, _sync=True)  # type: ignore[call-arg]
        assert isinstance(loaded, ClaudeCodeSettings)
        assert loaded.max_turns == 2
        assert loaded.model == "claude-haiku-4-5"
        assert isinstance(loaded.api_key, SecretStr)
        assert loaded.api_key.get_secret_value() == key
        assert key not in repr(loaded)
        target = TargetRepository.load(f"repo-{marker.lower()}", _sync=True)  # type: ignore[call-arg]
        assert isinstance(target, TargetRepository)
        assert (target.location, target.branch) == (str(repo), "main")

        resolved = resolve_settings(WorkerSettings(max_turns=7), name)
        settings, env = resolved.settings, resolved.env
        defaults = WorkerSettings()
        assert settings.max_turns == 7  # the flag wins over the block
        assert settings.model == "claude-haiku-4-5"  # the block wins over the default
        assert settings.model_dump(exclude={"max_turns", "model"}) == defaults.model_dump(
            exclude={"max_turns", "model"}
        )
        assert env == {"ANTHROPIC_API_KEY": key}
        settings = resolve_settings(None, name).settings
        assert (settings.max_turns, settings.model) == (2, "claude-haiku-4-5")

    @pytest.mark.usefixtures("prefect_client_settings")
    def test_cli_run_uses_blocks(
        self,
        cluster: Cluster,
        model_server: ScriptedModelServer,
        repo: Path,
        tmp_path: Path,
        marker: str,
    ) -> None:
        from pydantic import SecretStr

        from claudecluster.blocks import ClaudeCodeSettings, TargetRepository

        settings_name, repo_name = f"settings-{marker.lower()}", f"repo-{marker.lower()}"
        block = ClaudeCodeSettings(
            model="claude-haiku-4-5",
            max_turns=1,  # too few for the script below: only --max-turns 5 lets it finish
            api_key=SecretStr(f"sk-canary-{uuid.uuid4().hex}"),
        )
        block.save(settings_name, _sync=True)  # type: ignore[call-arg]
        git(repo, "checkout", "-q", "-b", "feature")
        (repo / "feature.txt").write_text("feature\n")
        git(repo, "add", "feature.txt")
        git(repo, "commit", "-qm", "feature")
        feature = git(repo, "rev-parse", "HEAD").strip()
        git(repo, "checkout", "-q", "main")
        target = TargetRepository(location=str(repo), branch="feature")
        target.save(repo_name, _sync=True)  # type: ignore[call-arg]
        script = f"{marker}-notes"
        model_server.add_script(
            Script(
                name=script,
                match=script,
                turns=[
                    tool_use("Read", {"file_path": "feature.txt"}),
                    tool_use("Write", {"file_path": "NOTES.md", "content": "notes\n"}),
                    text("Done."),
                ],
            )
        )
        plan = write_plan(
            tmp_path / "plan.yaml",
            {"goal": "Notes", "tasks": [{"id": "notes", "title": "Notes", "prompt": script}]},
        )
        # No key in the driver's environment: the sessions can only get the block's.
        env = {k: v for k, v in cluster.env.items() if k != "ANTHROPIC_API_KEY"}

        proc = cluster.cli(
            "run",
            "--plan",
            str(plan),
            "--repo-block",
            repo_name,
            "--settings-block",
            settings_name,
            "--max-turns",
            "5",
            "--json",
            env=env,
        )

        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["status"] == "succeeded", report["error"]
        assert report["repo"] == str(repo)
        assert report["base_commit"] == feature  # the block's branch
        [task] = report["tasks"]
        assert task["turns"] >= 2  # more than the block's max_turns: the flag won
        assert git(repo, "show", f"{report['integration_branch']}:NOTES.md") == "notes\n"
        models = {r.model for r in model_server.requests if r.script == script}
        assert models == {"claude-haiku-4-5"}  # the block's model


class TestCancel:
    """Cancelling a goal run cancels the worker flow runs it dispatched, and their sessions."""

    def test_cancel_goal_cancels_children(
        self,
        cluster: Cluster,
        model_server: ScriptedModelServer,
        repo: Path,
        marker: str,
    ) -> None:
        model_server.add_script(Script(name=f"{marker}-hang", match=marker, turns=[hang(240)]))
        plan = {
            "goal": "Hang",
            "tasks": [
                {"id": f"hang-{n}", "title": f"Hang {n}", "prompt": f"{marker} hang {n}"}
                for n in range(2)
            ],
        }
        goal_id = cluster.run_deployment(
            GOAL_DEPLOYMENT,
            {
                "goal": "Hang",
                "repo": str(repo),
                "plan": plan,
                "pool": POOL,
                "settings": {"timeout_s": 600},
            },
        )

        def sessions_hanging() -> bool:
            children = cluster.children(goal_id)
            hanging = [
                r
                for r in model_server.requests
                if r.script == f"{marker}-hang" and r.ended_at is None
            ]
            return (
                len(children) == 2
                and all(c["state_type"] == "RUNNING" for c in children)
                and len({r.session_id for r in hanging}) == 2
            )

        wait_for(
            sessions_hanging,
            120,
            lambda: (
                f"{cluster.flow_run(goal_id)['state']} {cluster.children(goal_id)}\n"
                + cluster.worker_tail()
            ),
        )
        assert len(session_pids(cluster.home)) >= 2

        proc = cluster.prefect("flow-run", "cancel", goal_id)
        assert proc.returncode == 0, proc.stdout + proc.stderr

        try:
            goal_run = cluster.wait_final(goal_id, timeout_s=90)
            assert goal_run["state_type"] == "CANCELLED", goal_run["state"]

            def children_final() -> list[dict[str, Any]]:
                children = cluster.children(goal_id)
                return children if all(c["state_type"] in FINAL_STATES for c in children) else []

            children = wait_for(
                children_final,
                90,
                lambda: (
                    f"{[c['state'] for c in cluster.children(goal_id)]}\n" + cluster.worker_tail()
                ),
            )
            assert [c["state_type"] for c in children] == ["CANCELLED", "CANCELLED"]
            wait_for(
                lambda: not session_pids(cluster.home),
                20,
                lambda: f"Claude Code sessions still running: {session_pids(cluster.home)}",
            )
        finally:
            kill_pids(session_pids(cluster.home))
