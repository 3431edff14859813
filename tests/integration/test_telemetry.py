"""OpenTelemetry end to end: one trace per goal, down to each model request, and the metrics.

A goal runs through the real CLI (``claudecluster run``) with the standard ``OTEL_*``
variables pointed at :class:`claudecluster.testing.otlp_receiver.OtlpReceiver`; the sessions
are the real Claude Code CLI against the scripted model, whose own spans, metrics and events
go to the same receiver. In process and on a process pool with a real worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from claudecluster.demo import create_sample_project
from claudecluster.testing import Script, ScriptedModelServer, text, tool_use
from claudecluster.testing.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.cluster import Cluster, running_cluster

pytestmark = [pytest.mark.integration, pytest.mark.prefect_server]

CANARY_KEY = "sk-ant-api03-telemetry-canary-0123456789"
POOL = "claudecluster-process"


def plan_file(tmp_path: Path, marker: str) -> Path:
    plan = {
        "goal": f"{marker} two pages",
        "verify": "python -m pytest -q",
        "tasks": [
            {"id": "one", "title": "One", "prompt": f"{marker}-one write", "paths": ["one.md"]},
            {
                "id": "two",
                "title": "Two",
                "prompt": f"{marker}-two write",
                "paths": ["two.md"],
                "depends_on": ["one"],
            },
        ],
    }
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return path


def add_scripts(model_server: ScriptedModelServer, marker: str) -> None:
    for name in ("one", "two"):
        model_server.add_script(
            Script(
                name=f"{marker}-{name}",
                match=f"{marker}-{name}",
                turns=[
                    tool_use("Write", {"file_path": f"{name}.md", "content": "x\n"}),
                    text("Done."),
                ],
            )
        )


def wait_for_spans(receiver: OtlpReceiver, trace_id: str, names: set[str]) -> None:
    """Exporters batch: wait until the trace's spans named ``names`` have all arrived."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seen = {s.name for s in receiver.spans if s.trace_id == trace_id}
        if names <= seen:
            return
        time.sleep(0.2)


def by_id(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {s.span_id: s for s in spans}


def ancestors(span: ReceivedSpan, spans: dict[str, ReceivedSpan]) -> list[ReceivedSpan]:
    found = []
    while span.parent_span_id in spans:
        span = spans[span.parent_span_id]
        found.append(span)
    return found


def check_trace(receiver: OtlpReceiver, report: dict[str, Any], task_span: dict[str, str]) -> None:
    """The whole tree of one goal: ``task_span`` maps a task id to the name of the span that
    stands for it under the goal's root (a task run, or a pool's worker flow run)."""
    trace_id = report["trace_id"]
    assert trace_id and len(trace_id) == 32
    wait_for_spans(receiver, trace_id, {"claude_code.llm_request", "integrate", report["run_id"]})
    tree = receiver.tree(trace_id)
    # One trace per goal: every span this goal made is in it.
    assert {s.trace_id for s in receiver.spans} == {trace_id}, tree
    spans = by_id(receiver.spans)
    [root] = [s for s in receiver.spans if s.parent_span_id not in spans]
    assert root.name == report["run_id"], tree
    assert root.attributes["claudecluster.run_id"] == report["run_id"]
    assert root.attributes["claudecluster.goal"] == report["goal"]
    assert root.resource["service.name"] == "claudecluster"
    interactions = [s for s in receiver.spans if s.name == "claude_code.interaction"]
    assert len(interactions) == len(task_span), tree
    for task_id, name in task_span.items():
        [task] = [s for s in receiver.spans if s.name == name]
        assert task.parent_span_id == root.span_id, tree
        [interaction] = [s for s in interactions if s.resource["claudecluster.task_id"] == task_id]
        assert interaction.resource["claudecluster.run_id"] == report["run_id"]
        assert task in ancestors(interaction, spans), tree
        requests = [s for s in receiver.spans if s.parent_span_id == interaction.span_id]
        assert any(s.name == "claude_code.llm_request" for s in requests), tree
        steps = {s.name for s in receiver.spans if task in ancestors(s, spans)}
        assert {"claudecluster.worktree", "claudecluster.commit", "claudecluster.verify"} <= steps
    [integrate] = [s for s in receiver.spans if s.name == "integrate"]
    merges = [s for s in receiver.spans if s.name == "claudecluster.merge"]
    # Merged while other sessions ran (under the goal) or at the end (under integrate).
    assert {s.parent_span_id for s in merges} <= {root.span_id, integrate.span_id}, tree
    assert sorted(s.attributes.get("claudecluster.task_id", "") for s in merges) == sorted(
        task_span
    )


def check_metrics_and_secrets(receiver: OtlpReceiver, report: dict[str, Any]) -> None:
    total = report["totals"]["cost_usd"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and abs(receiver.total("claudecluster.cost") - total) > 1e-6:
        time.sleep(0.5)
    assert receiver.total("claudecluster.cost") == pytest.approx(total)
    assert receiver.total("claude_code.cost.usage") == pytest.approx(total)
    assert receiver.total("claudecluster.sessions.started") == len(report["tasks"])
    assert receiver.total("claudecluster.merges", outcome="merged") == len(report["tasks"])
    assert not any(CANARY_KEY.encode() in body for body in receiver.raw)


class TestInProcess:
    def test_one_trace_from_the_goal_to_each_model_request(
        self,
        prefect_backend: str,
        model_server: ScriptedModelServer,
        marker: str,
        tmp_path: Path,
    ) -> None:
        sample = create_sample_project(tmp_path / "sample")
        add_scripts(model_server, marker)
        with OtlpReceiver() as receiver:
            env = {
                **os.environ,
                **receiver.env(),
                "ANTHROPIC_API_KEY": CANARY_KEY,
                "CLAUDECLUSTER_TRACE_URL": "http://tracing.invalid/trace/{trace_id}",
            }
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "claudecluster.cli",
                    "run",
                    "--repo",
                    str(sample),
                    "--plan",
                    str(plan_file(tmp_path, marker)),
                    "--json",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            report = json.loads(proc.stdout)
            assert report["trace_url"] == f"http://tracing.invalid/trace/{report['trace_id']}"
            check_trace(receiver, report, {"one": "one", "two": "two"})
            check_metrics_and_secrets(receiver, report)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as made:
        yield made


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    model_server: ScriptedModelServer,
    receiver: OtlpReceiver,
) -> Iterator[Cluster]:
    with running_cluster(
        tmp_path_factory.mktemp("telemetry-home"),
        model_server,
        pool=POOL,
        deployments=("claudecluster-worker/process",),
        worker_env={**receiver.env(), "ANTHROPIC_API_KEY": CANARY_KEY},
    ) as made:
        yield made


class TestOnAPool:
    def test_the_trace_context_travels_with_the_unit_of_work(
        self,
        cluster: Cluster,
        receiver: OtlpReceiver,
        model_server: ScriptedModelServer,
        marker: str,
        tmp_path: Path,
    ) -> None:
        sample = create_sample_project(tmp_path / "sample")
        add_scripts(model_server, marker)
        receiver.spans.clear()
        receiver.points.clear()
        proc = cluster.cli(
            "run",
            "--repo",
            str(sample),
            "--plan",
            str(plan_file(tmp_path, marker)),
            "--pool",
            POOL,
            "--json",
            env={**cluster.env, **receiver.env(), "ANTHROPIC_API_KEY": CANARY_KEY},
        )
        assert proc.returncode == 0, proc.stderr[-3000:] + cluster.worker_tail()
        report = json.loads(proc.stdout)
        run_id = report["run_id"]
        check_trace(receiver, report, {"one": f"{run_id}-one", "two": f"{run_id}-two"})
        worker_spans = [s for s in receiver.spans if s.name in ("one", "two")]
        assert {s.attributes["claudecluster.pool"] for s in worker_spans} == {POOL}
        check_metrics_and_secrets(receiver, report)
