"""The cluster-wide rate limit on session starts, enforced by Prefect, shared by all runs."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from claudecluster.api import run_goal
from claudecluster.concurrency import DEFAULT_START_BURST, DEFAULT_STARTS_PER_SECOND, ensure_limits
from claudecluster.models import TaskSpec
from claudecluster.plan import Plan
from claudecluster.testing import Script, ScriptedModelServer, text, tool_use

pytestmark = [pytest.mark.integration, pytest.mark.prefect_server, pytest.mark.slow]


@pytest.fixture
def slow_starts(prefect_backend: str) -> Iterator[float]:
    """One start at a time, refilled every 2 s; the defaults come back afterwards."""
    ensure_limits(starts_per_second=0.5, start_burst=1)
    try:
        yield 2.0
    finally:
        ensure_limits(starts_per_second=DEFAULT_STARTS_PER_SECOND, start_burst=DEFAULT_START_BURST)


class TestStartRate:
    """Session starts go through the rate limit, so a fan-out does not hit the API at once."""

    def test_starts_are_spread_out(
        self,
        slow_starts: float,
        repo: Path,
        worktree_root: Path,
        model_server: ScriptedModelServer,
        marker: str,
    ) -> None:
        names = ("one", "two", "three")
        for name in names:
            model_server.add_script(
                Script(
                    name=f"{marker}-{name}",
                    match=f"{marker}-{name}",
                    turns=[
                        tool_use("Write", {"file_path": f"{name}.txt", "content": "x\n"}),
                        text("Done."),
                    ],
                )
            )
        plan = Plan(
            goal="Fan out",
            tasks=[
                TaskSpec(id=n, title=n, prompt=f"{marker}-{n} write", paths=[f"{n}.txt"])
                for n in names
            ],
        )

        report = run_goal(
            None,
            repo,
            plan=plan,
            max_parallel=3,
            run_id=f"rate-{marker.lower()}",
            worktree_root=worktree_root,
        )

        assert report.status == "succeeded", report.error
        starts = sorted(
            s.first_started_at
            for s in model_server.sessions().values()
            if (s.script or "").startswith(marker)
        )
        assert len(starts) == 3
        gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
        # Each start waits for the previous one's slot to decay (2 s at 0.5 per second);
        # without the limit, three parallel sessions start within a second of each other.
        assert min(gaps) >= 0.75 * slow_starts, gaps
