"""The Prefect path as a Prefect user meets it: checked inputs, the run form, names and tags,
a graph with exactly the plan's edges, artifact history, readable logs, sweeps.

One module-wide real Prefect server (set up and deployed) and a real process worker; goals
start the way users start them: the ``claudecluster`` CLI or ``prefect deployment run``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from claudecluster.naming import artifact_scope
from claudecluster.testing import Script, ScriptedModelServer, text, tool_use
from tests.cluster import Cluster, running_cluster

pytestmark = [pytest.mark.integration, pytest.mark.prefect_server, pytest.mark.slow]

POOL = "claudecluster-process"
GOAL_DEPLOYMENT = "claudecluster-goal/goal"
WORKER_DEPLOYMENT = "claudecluster-worker/process"
SWEEP_DEPLOYMENT = "claudecluster-sweep/nightly-docstrings"
INTERNAL = ("run_id", "base_commit", "worktree_root")


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, model_server: ScriptedModelServer
) -> Iterator[Cluster]:
    with running_cluster(
        tmp_path_factory.mktemp("prefect-path-home"),
        model_server,
        pool=POOL,
        deployments=(GOAL_DEPLOYMENT, WORKER_DEPLOYMENT, SWEEP_DEPLOYMENT),
    ) as made:
        yield made


def chain_plan(model_server: ScriptedModelServer, marker: str, goal: str) -> dict[str, Any]:
    """calc-doc, then strings-doc after it, then notes (independent): one edge in all.

    calc-doc's session also reads a file, so its log has a multi-line tool result.
    """
    for task_id, path in (
        ("calc-doc", "calc.py"),
        ("strings-doc", "strings.py"),
        ("notes", "NOTES.md"),
    ):
        token = f"<{marker}:{task_id}>"
        turns = [tool_use("Read", {"file_path": "calc.py"})] if task_id == "calc-doc" else []
        turns += [
            tool_use("Write", {"file_path": f"{task_id}.txt", "content": path}),
            text("Done."),
        ]
        model_server.add_script(Script(name=token, match=token, turns=turns))
    task = {"kind": "docs", "paths": []}
    return {
        "goal": goal,
        "tasks": [
            {**task, "id": "calc-doc", "title": "Calc", "prompt": f"<{marker}:calc-doc> go"},
            {
                **task,
                "id": "strings-doc",
                "title": "Strings",
                "prompt": f"<{marker}:strings-doc> go",
                "depends_on": ["calc-doc"],
            },
            {**task, "id": "notes", "title": "Notes", "prompt": f"<{marker}:notes> go"},
        ],
    }


def run_cli(
    cluster: Cluster, tmp_path: Path, repo: Path, plan: dict[str, Any], *args: str
) -> dict[str, Any]:
    path = tmp_path / f"plan-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(plan))
    proc = cluster.cli("run", "--plan", str(path), "--repo", str(repo), "--json", *args)
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def graph_edges(cluster: Cluster, flow_run_id: str, run_id: str) -> set[tuple[str, str]]:
    """(upstream, downstream) task ids of the flow run's graph, as the UI draws it."""
    graph = cluster.api("GET", f"/flow_runs/{flow_run_id}/graph-v2")

    def task_of(label: str) -> str:  # "claudecluster-worker / <run-id>-<task-id>" on pools
        return label.split(" / ")[-1].removeprefix(f"{run_id}-")

    labels = {node_id: node["label"] for node_id, node in graph["nodes"]}
    return {
        (task_of(labels[parent["id"]]), task_of(node["label"]))
        for _, node in graph["nodes"]
        for parent in node["parents"]
    }


class TestDeploymentRunsCheckTheirInputs:
    """`prefect deployment run` meets the CLI's checks: failed at once, one line, no request."""

    def test_an_empty_goal(
        self, cluster: Cluster, repo: Path, model_server: ScriptedModelServer
    ) -> None:
        before = len(model_server.requests)
        flow_run_id = cluster.run_deployment(GOAL_DEPLOYMENT, {"goal": " ", "repo": str(repo)})
        run = cluster.wait_final(flow_run_id, 90)
        assert run["state_type"] == "FAILED"
        assert run["state"]["message"].startswith("the goal is empty")
        assert len(model_server.requests) == before
        summary = self._summary(cluster, flow_run_id)
        assert "NOT STARTED" in summary and "the goal is empty" in summary

    def test_an_unknown_pool_before_the_planner(
        self, cluster: Cluster, repo: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        before = len(model_server.requests)
        flow_run_id = cluster.run_deployment(
            GOAL_DEPLOYMENT, {"goal": f"{marker} plan me", "repo": str(repo), "pool": "nope"}
        )
        run = cluster.wait_final(flow_run_id, 90)
        assert run["state_type"] == "FAILED"
        assert "unknown pool 'nope'" in run["state"]["message"]
        assert "\n" not in run["state"]["message"]
        assert len(model_server.requests) == before  # the planner never ran

    def test_no_goal_at_all_is_refused_by_the_server(self, cluster: Cluster, repo: Path) -> None:
        proc = cluster.prefect(
            "deployment", "run", GOAL_DEPLOYMENT, "--params", json.dumps({"repo": str(repo)})
        )
        assert proc.returncode != 0
        assert "goal" in (proc.stdout + proc.stderr)

    def _summary(self, cluster: Cluster, flow_run_id: str) -> str:
        found = cluster.api(
            "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
        )
        [summary] = [a for a in found if (a["key"] or "").endswith("-summary")]
        return str(summary["data"])


class TestTheRunForm:
    """The deployments' forms: described, ordered, the goal required, internals hidden."""

    @pytest.mark.parametrize(
        ("deployment", "required", "first"),
        [
            (GOAL_DEPLOYMENT, ["goal"], "goal"),
            (SWEEP_DEPLOYMENT, ["sweep"], "sweep"),
            ("claudecluster-review/review", ["target"], "target"),
        ],
    )
    def test_form(self, cluster: Cluster, deployment: str, required: list[str], first: str) -> None:
        schema = cluster.api("GET", f"/deployments/name/{deployment}")["parameter_openapi_schema"]
        properties: dict[str, Any] = schema["properties"]
        assert schema.get("required") == required
        assert not set(INTERNAL) & set(properties)
        assert all(p.get("description") for p in properties.values()), properties
        ordered = sorted(properties, key=lambda name: properties[name]["position"])
        assert ordered[0] == first
        if deployment == GOAL_DEPLOYMENT:
            assert ordered[:4] == ["goal", "repo", "repo_block", "base"]


class TestNamesTagsAndGraph:
    """Every run tagged and named; the graph draws exactly the plan's edges."""

    def test_local_run(
        self,
        cluster: Cluster,
        repo: Path,
        tmp_path: Path,
        model_server: ScriptedModelServer,
        marker: str,
    ) -> None:
        goal = f"Chain {marker}"
        report = run_cli(cluster, tmp_path, repo, chain_plan(model_server, marker, goal))

        run = cluster.flow_run(report["flow_run_id"])
        assert {"claudecluster", f"claudecluster-run:{report['run_id']}"} <= set(run["tags"])
        assert any(tag.startswith("claudecluster-goal:chain-mark") for tag in run["tags"])
        edges = graph_edges(cluster, report["flow_run_id"], report["run_id"])
        assert {e for e in edges if e[1] != "integrate"} == {("calc-doc", "strings-doc")}
        task_runs = cluster.api(
            "POST",
            "/task_runs/filter",
            {"task_runs": {"flow_run_id": {"any_": [report["flow_run_id"]]}}},
        )
        names = {t["name"] for t in task_runs}
        assert {"calc-doc", "strings-doc", "notes", "integrate"} <= names
        # Task runs carry no tags: Prefect would take a slot of a tag concurrency limit for
        # each tag at every task run's start (a server write on the critical path).
        assert [t["tags"] for t in task_runs] == [[]] * len(task_runs)
        # Tool results keep their lines in the log.
        logs = cluster.api(
            "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [report["flow_run_id"]]}}}
        )
        results = [log["message"] for log in logs if log["message"].startswith("tool result")]
        assert any("\n" in m and "\\n" not in m for m in results), results[:3]

    def test_pool_run(
        self,
        cluster: Cluster,
        repo: Path,
        tmp_path: Path,
        model_server: ScriptedModelServer,
        marker: str,
    ) -> None:
        goal = f"Pool chain {marker}"
        report = run_cli(
            cluster, tmp_path, repo, chain_plan(model_server, marker, goal), "--pool", POOL
        )
        goal_id = report["flow_run_id"]

        edges = graph_edges(cluster, goal_id, report["run_id"])
        assert {e for e in edges if e[1] != "integrate"} == {("calc-doc", "strings-doc")}
        children = cluster.children(goal_id)
        assert len(children) == 3
        assert all(f"claudecluster-run:{report['run_id']}" in c["tags"] for c in children)
        # Every task's diff and test report is on the goal's run, not one click away.
        scope = artifact_scope(deployment=None, goal=goal)
        on_goal = cluster.api(
            "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [goal_id]}}}
        )
        keys = {a["key"] for a in on_goal}
        for task_id in ("calc-doc", "strings-doc", "notes"):
            assert f"{scope}-{task_id}-diff" in keys, keys
            assert f"{scope}-{task_id}-tests" not in keys  # one artifact per task


class TestArtifactHistory:
    """Keys are stable across runs of a goal, so Prefect keeps their history."""

    def test_two_runs_one_key(
        self,
        cluster: Cluster,
        make_repo: Any,
        tmp_path: Path,
        model_server: ScriptedModelServer,
        marker: str,
    ) -> None:
        goal = f"History {marker}"
        for attempt in range(2):
            repo = make_repo(name=f"repo-{attempt}")
            run_cli(cluster, tmp_path, repo, chain_plan(model_server, f"{marker}{attempt}", goal))
        scope = artifact_scope(deployment=None, goal=goal)
        versions = cluster.api(
            "POST", "/artifacts/filter", {"artifacts": {"key": {"any_": [f"{scope}-summary"]}}}
        )
        assert len(versions) == 2
        assert len({a["flow_run_id"] for a in versions}) == 2


class TestSweeps:
    """A sweep that matches nothing changes nothing; a missing block is one line."""

    def test_no_match_leaves_the_state_alone(
        self, cluster: Cluster, repo: Path, marker: str
    ) -> None:
        name = f"nothing-{marker.lower()}"
        flow_run_id = cluster.run_deployment(
            SWEEP_DEPLOYMENT,
            {
                "repo": str(repo),
                "repo_block": None,
                "sweep": {
                    "name": name,
                    "prompt": "x {files}",
                    "include": ["nowhere/*.py"],
                    "changed_since_last": True,
                },
            },
        )
        run = cluster.wait_final(flow_run_id, 90)
        assert run["state_type"] == "COMPLETED" and run["state"]["message"] == "nothing to sweep"
        assert run["name"].startswith(f"sweep-{name[:20]}")
        variables = cluster.api("POST", "/variables/filter", {})
        assert not [v for v in variables if v["name"] == f"claudecluster-sweep-{name}"]

    def test_a_missing_block_is_one_line(self, cluster: Cluster) -> None:
        flow_run_id = cluster.run_deployment(
            SWEEP_DEPLOYMENT, {"repo_block": f"nope-{uuid.uuid4().hex[:6]}"}
        )
        run = cluster.wait_final(flow_run_id, 90)
        assert run["state_type"] == "FAILED"
        message = run["state"]["message"]
        assert message.startswith("no repository block named") and "\n" not in message


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's headless chromium driven by Playwright (its own browser download is not used)."""
    executable = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        executable = None
    if executable is None:
        # CI sets CLAUDECLUSTER_REQUIRE_BROWSER=1: there a missing browser is a failure.
        missing = (
            pytest.fail if os.environ.get("CLAUDECLUSTER_REQUIRE_BROWSER") == "1" else pytest.skip
        )
        missing("no browser: apt-get install chromium and pip install playwright (.ci/run does)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        try:
            yield launched
        finally:
            launched.close()


class TestTheUI:
    """What a user sees in the Prefect UI: the graph with every task, the summary as a table."""

    def test_run_page_and_summary(
        self,
        cluster: Cluster,
        browser: Any,
        repo: Path,
        tmp_path: Path,
        model_server: ScriptedModelServer,
        marker: str,
    ) -> None:
        goal = f"Look {marker}"
        report = run_cli(cluster, tmp_path, repo, chain_plan(model_server, marker, goal))
        ui = cluster.api_url.removesuffix("/api")
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            with page.expect_response(lambda r: r.url.endswith("/graph-v2")) as graph_response:
                page.goto(f"{ui}/runs/flow-run/{report['flow_run_id']}", timeout=60_000)
            graph = graph_response.value.json()
            drawn = {node["label"] for _, node in graph["nodes"]}
            assert {"calc-doc", "strings-doc", "notes", "integrate"} <= drawn, drawn
            page.locator("canvas").first.wait_for(timeout=30_000)  # the graph is drawn
            page.get_by_text(f"claudecluster-run:{report['run_id']}").first.wait_for()

            scope = artifact_scope(deployment=None, goal=goal)
            [summary] = cluster.api(
                "POST",
                "/artifacts/filter",
                {
                    "artifacts": {
                        "key": {"any_": [f"{scope}-summary"]},
                        "flow_run_id": {"any_": [report["flow_run_id"]]},
                    }
                },
            )
            page.goto(f"{ui}/artifacts/artifact/{summary['id']}", timeout=60_000)
            table = page.locator("table").first
            table.wait_for(timeout=30_000)
            headers = table.locator("th").all_inner_texts()
            assert headers[:3] == ["task", "kind", "status"], headers
            rows = [row.locator("td").all_inner_texts() for row in table.locator("tbody tr").all()]
            assert sorted(row[0] for row in rows) == ["calc-doc", "notes", "strings-doc"]
            assert all(row[2] == "succeeded" for row in rows), rows
        finally:
            page.close()
