"""``claudecluster setup``: prepare a Prefect server for ClaudeCluster in one step.

It creates (or updates) the work pools from the base job templates in ``infra/``, creates the
cluster-wide session concurrency limit, and registers ClaudeCluster's block types. It is
idempotent: run it again after upgrading. Deploy the flows afterwards from the repository
root::

    prefect deploy --all --prefect-file deployments/prefect.yaml
"""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

from pydantic import Field

from claudecluster.concurrency import SESSION_LIMIT, ensure_limits
from claudecluster.models import StrictModel

PROCESS_POOL = "claudecluster-process"
DOCKER_POOL = "claudecluster-docker"
KUBERNETES_POOL = "claudecluster-kubernetes"

# pool name -> (worker type, template path inside claudecluster.infra)
POOLS: dict[str, tuple[str, str]] = {
    PROCESS_POOL: ("process", "process/base-job-template.json"),
    DOCKER_POOL: ("docker", "docker/base-job-template.json"),
    KUBERNETES_POOL: ("kubernetes", "k8s/base-job-template.json"),
}


class SetupReport(StrictModel):
    """What setup created or updated."""

    pools: dict[str, str] = Field(description="Pool name -> 'created' or 'updated'.")
    session_limit: int = Field(description="Slots of the claudecluster-sessions limit.")
    start_burst: int = Field(description="Session starts allowed at once.")
    starts_per_second: float = Field(description="Session starts per second, sustained.")
    blocks: list[str] = Field(description="Block types registered.")


def local_results() -> str:
    """Where this machine's flow runs persist results: the user's choice, else the home's."""
    import os

    from claudecluster.workspace import results_root

    return os.environ.get("PREFECT_LOCAL_STORAGE_PATH") or str(results_root())


def base_job_template(path: str) -> dict[str, Any]:
    """A base job template shipped in ``infra/``."""
    data: dict[str, Any] = json.loads((files("claudecluster.infra") / path).read_text())
    return data


def ensure_pool(name: str, worker_type: str, template: dict[str, Any]) -> str:
    """Create the work pool, or update its template; returns 'created' or 'updated'."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type=worker_type,
                    base_job_template=template,
                    description="ClaudeCluster workers (created by `claudecluster setup`)",
                )
            )
            return "created"
        client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
        return "updated"


def register_blocks() -> list[str]:
    """Register ClaudeCluster's block types so they show in the UI."""
    from claudecluster.blocks import ClaudeCodeSettings, TargetRepository

    registered = []
    for block in (ClaudeCodeSettings, TargetRepository):
        block.register_type_and_schema(_sync=True)  # type: ignore[call-arg]
        registered.append(block.get_block_type_slug())
    return registered


def with_result_storage(template: dict[str, Any], block_slug: str) -> dict[str, Any]:
    """``template`` whose runs persist results to ``block_slug`` (e.g. an S3 bucket block).

    Containers share no disk with the driver, so their TaskResults must go to storage both
    can reach; the driver reads each result from the block its record names.
    """
    env = template["variables"]["properties"]["env"]
    env["default"] = {**env.get("default", {}), "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": block_slug}
    return template


def with_local_results(template: dict[str, Any], results: str) -> dict[str, Any]:
    """``template`` whose runs persist results under ``results`` on the worker's machine.

    Process-pool workers share the driver's disk: both must look for results in the same
    place, so the driver (which keeps them under the ClaudeCluster home) can read them.
    """
    env = template["variables"]["properties"]["env"]
    env["default"] = {**env.get("default", {}), "PREFECT_LOCAL_STORAGE_PATH": results}
    return template


def setup(
    *,
    sessions: int | None = None,
    pools: list[str] | None = None,
    result_storage: str | None = None,
    starts_per_second: float | None = None,
    start_burst: int | None = None,
) -> SetupReport:
    """Create pools, the session limit and the block types on the current Prefect server.

    ``result_storage`` is the slug of a filesystem block (``remote-file-system/NAME``,
    ``s3-bucket/NAME``, ...) that container pools persist their results to.
    """
    created = {}
    for name in pools or list(POOLS):
        worker_type, template_path = POOLS[name]
        template = base_job_template(template_path)
        if result_storage and worker_type != "process":
            template = with_result_storage(template, result_storage)
        elif worker_type == "process":
            template = with_local_results(template, local_results())
        created[name] = ensure_pool(name, worker_type, template)
    limits = ensure_limits(sessions, starts_per_second=starts_per_second, start_burst=start_burst)
    return SetupReport(
        pools=created,
        session_limit=limits.sessions,
        start_burst=limits.start_burst,
        starts_per_second=limits.starts_per_second,
        blocks=register_blocks(),
    )


__all__ = [
    "DOCKER_POOL",
    "KUBERNETES_POOL",
    "POOLS",
    "PROCESS_POOL",
    "SESSION_LIMIT",
    "SetupReport",
    "setup",
]
