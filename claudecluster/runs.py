"""Who a flow run is: its run id, its flow run, its tags and the scope of its artifact keys.

A goal's run id is its flow run's name (the CLI names the run before it starts; a
deployment run gets a fresh id), so the id never needs a parameter of its own in the run
form. The tags are added to the flow run as it starts, so a deployment run carries the same
``claudecluster-run:<id>`` tag as the CLI's runs and as its own children.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from claudecluster.naming import artifact_scope, run_tags
from claudecluster.workspace import new_run_id


@dataclass(frozen=True)
class RunIdentity:
    """The names of the current goal (or sweep) run."""

    run_id: str
    flow_run_id: str | None
    scope: str
    tags: list[str]


_RUN_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{4}$")


def stable_run_name() -> str:
    """A goal flow run's name, which is its run id: kept when the run already has one.

    Prefect names a flow run again every time it runs, so a run put back to Scheduled (Retry
    in the UI, the SDK's ``resume``, a lost worker) would otherwise get a new run id, new
    branches and no reuse of the work it already paid for.
    """
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    name = context.flow_run.name if context and context.flow_run else None
    return name if name and _RUN_ID.match(name) else new_run_id()


def current_identity(*, goal: str | None = None, sweep: str | None = None) -> RunIdentity:
    """The identity of the flow run this code runs in (or a fresh one outside a run)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    flow_run = context.flow_run if context else None
    run_id = flow_run.name if flow_run else new_run_id()
    deployment = _deployment_name(flow_run.deployment_id) if flow_run else None
    return RunIdentity(
        run_id=run_id,
        flow_run_id=str(flow_run.id) if flow_run else None,
        scope=artifact_scope(deployment=deployment, goal=goal, sweep=sweep),
        tags=run_tags(run_id, goal=goal, sweep=sweep),
    )


def tag_current_run(tags: list[str]) -> None:
    """Add ``tags`` to the current flow run (keeping the ones it has)."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    have = list(context.flow_run.tags or [])
    wanted = have + [tag for tag in tags if tag not in have]
    if wanted != have:
        with get_client(sync_client=True) as client:
            client.update_flow_run(context.flow_run.id, tags=wanted)


@contextmanager
def untagged_task_runs() -> Iterator[None]:
    """Task runs started inside carry no tags (flow runs are tagged explicitly).

    Prefect takes a slot of a tag concurrency limit for every tag of every task run as it
    starts, one server write at a time through one queue: a goal's task runs would pay it on
    the critical path (and a SQLite server's "busy" answer to one held every start for 2 s).
    """
    from prefect.context import TagsContext

    with TagsContext(current_tags=set()):
        yield


def _deployment_name(deployment_id: object) -> str | None:
    if deployment_id is None:
        return None
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.read_deployment(deployment_id).name)  # type: ignore[arg-type]
