"""A task whose worker machine died runs again on another worker, found by Prefect itself.

Every worker flow run sends Prefect's flow-run heartbeat every :data:`HEARTBEAT_SECONDS`
(``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, set in the worker deployments' job environment).
``claudecluster setup`` creates one automation, :data:`AUTOMATION_NAME`: a proactive trigger
that fires when a running ``claudecluster-worker`` flow run has sent no event for
:data:`SILENCE_SECONDS` after a heartbeat, and puts that flow run back to ``Scheduled``
(named ``AwaitingRetry``). Any worker of the pool then picks it up: same flow run, same
parent, same place in the goal's graph, the goal's driver keeps waiting on it. The new
attempt starts clean; the lost attempt's work is on the origin under
``claudecluster-attempts/...`` (the worker checkpoints a clone's worktree there after every
turn), and its cost is counted in the task's attempts.

The driver holds no session slot for a lost run (pool sessions hold their own, with a short
lease that expires with the machine), so nothing leaks. A run whose machine was lost
:data:`MAX_RUNS` times fails instead of going round again.

The automation cannot tell a dead machine from one cut off from the server for longer than
:data:`SILENCE_SECONDS`: such a run is taken again while the first may still be running
(the task branch takes the first push of the two; the other's work stays on its checkpoint).
"""

from __future__ import annotations

from datetime import timedelta

from claudecluster.pools import WORKER_FLOW_NAME

AUTOMATION_NAME = "claudecluster-lost-worker"
HEARTBEAT_SECONDS = 30  # Prefect's minimum
SILENCE_SECONDS = 75  # two missed heartbeats and some slack for a busy server
MAX_RUNS = 3
HEARTBEAT_ENV = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS)}
RESCHEDULED_MESSAGE = (
    "its worker stopped sending heartbeats (the machine or its processes died): "
    "scheduled again for another worker"
)


def ensure_automation() -> str:
    """Create or update the automation; returns 'created' or 'updated'."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    wanted = AutomationCore(
        name=AUTOMATION_NAME,
        description=(
            "ClaudeCluster: a worker flow run whose heartbeats stopped runs again on another "
            "worker (created by claudecluster setup)."
        ),
        enabled=True,
        trigger=EventTrigger(
            posture=Posture.Proactive,
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.*"},
            for_each={"prefect.resource.id"},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=ResourceSpecification(
                {"prefect.resource.role": "flow", "prefect.resource.name": WORKER_FLOW_NAME}
            ),
            threshold=1,
            within=timedelta(seconds=SILENCE_SECONDS),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.SCHEDULED,
                name="AwaitingRetry",
                message=RESCHEDULED_MESSAGE,
                force=True,
            )
        ],
    )
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(AUTOMATION_NAME)
        if not existing:
            client.create_automation(wanted)
            return "created"
        client.update_automation(existing[0].id, wanted)
        for duplicate in existing[1:]:
            client.delete_automation(duplicate.id)
        return "updated"
