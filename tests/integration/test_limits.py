"""The cluster-wide rate limit on session starts, enforced by Prefect, shared by all runs."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from claudecluster.api import run_goal
from claudecluster.concurrency import (
    DEFAULT_START_BURST,
    DEFAULT_STARTS_PER_SECOND,
    START_RATE_LIMIT,
    ensure_limits,
)
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

        since = datetime.now(UTC)
        report = run_goal(
            None,
            repo,
            plan=plan,
            max_parallel=3,
            run_id=f"rate-{marker.lower()}",
            worktree_root=worktree_root,
        )

        assert report.status == "succeeded", report.error
        sessions = [
            s for s in model_server.sessions().values() if (s.script or "").startswith(marker)
        ]
        assert len(sessions) == 3
        # Each start waits for the previous one's slot to decay (2 s at 0.5 per second);
        # without the limit, three parallel sessions take their starts at once. Read from
        # the acquisitions Prefect records, not from the first model requests, whose times
        # also carry each CLI's boot (seconds apart on a loaded machine).
        starts = acquisitions(START_RATE_LIMIT, since, count=3)
        gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
        assert all(gap >= 0.75 * slow_starts for gap in gaps), gaps


def acquisitions(limit: str, since: datetime, count: int) -> list[float]:
    """When slots of ``limit`` were taken since ``since``, from the server's events (which
    arrive a moment after they happen: wait for ``count`` of them)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import (
        EventFilter,
        EventNameFilter,
        EventOccurredFilter,
        EventResourceFilter,
    )

    query = EventFilter(
        occurred=EventOccurredFilter(since=since, until=datetime.now(UTC)),
        event=EventNameFilter(name=["prefect.concurrency-limit.acquired"]),
        resource=EventResourceFilter(labels={"prefect.resource.name": limit}),
    )
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            events = client.read_events(filter=query, limit=50).events
            if len(events) >= count or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert len(events) == count, [e.occurred for e in events]
    return sorted(e.occurred.timestamp() for e in events)
