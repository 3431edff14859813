"""``claudecluster setup``: prepare a Prefect server for ClaudeCluster in one step.

It creates (or updates) the work pools from the base job templates in ``infra/``, creates the
cluster-wide session concurrency limit, and registers ClaudeCluster's block types. It is
idempotent: run it again after upgrading. Deploy the flows afterwards from the repository
root::

    prefect deploy --all --prefect-file deployments/prefect.yaml
"""

from __future__ import annotations

import copy
import json
from importlib.resources import files
from typing import Any

from pydantic import Field

from claudecluster.concurrency import SESSION_LIMIT, ensure_limits
from claudecluster.lost_workers import HEARTBEAT_ENV, ensure_automation
from claudecluster.models import StrictModel
from claudecluster.pools import SHARES_DISK_VAR

# A team server has an auth string, and Prefect 3.9's auth middleware turns the database
# errors it would answer with a retryable 503 into a 500: the pool's flow runs retry those too,
# or a database restart fails whatever task was talking to the server at that moment.
TEAM_CLIENT_ENV = {"PREFECT_CLIENT_RETRY_EXTRA_CODES": "500"}

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
    lost_worker_automation: str = Field(
        description="'created' or 'updated': the automation that runs a task whose worker "
        "died again on another worker (claudecluster.lost_workers)."
    )


def local_results() -> str:
    """Where this machine's flow runs persist results: the user's choice, else the home's."""
    import os

    from claudecluster.workspace import results_root

    return os.environ.get("PREFECT_LOCAL_STORAGE_PATH") or str(results_root())


def base_job_template(path: str) -> dict[str, Any]:
    """A base job template shipped in ``infra/``."""
    data: dict[str, Any] = json.loads((files("claudecluster.infra") / path).read_text())
    return data


def ensure_pool(
    name: str,
    worker_type: str,
    template: dict[str, Any],
    overrides: dict[str, Any] | None = None,
    *,
    drop_env: tuple[str, ...] = (),
) -> str:
    """Create the work pool, or update its template; returns 'created' or 'updated'.

    An existing pool keeps what was set on it (in the UI, by an earlier ``setup``, with
    ``prefect work-pool update``): its variables' defaults win over the shipped template's,
    environment variables merge key by key. Only ``overrides`` (variable name to default,
    ``env`` merged) replace what is there: what this ``setup`` was explicitly asked to set;
    ``drop_env`` names environment variables it was asked to remove.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(name)
        except ObjectNotFound:
            template = _without_env(_with_defaults(template, overrides or {}), drop_env)
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type=worker_type,
                    base_job_template=template,
                    description="ClaudeCluster workers (created by `claudecluster setup`)",
                )
            )
            return "created"
        merged = _without_env(
            _with_defaults(merged_template(template, existing.base_job_template), overrides or {}),
            drop_env,
        )
        client.update_work_pool(name, WorkPoolUpdate(base_job_template=merged))
        return "updated"


def merged_template(ours: dict[str, Any], theirs: dict[str, Any] | None) -> dict[str, Any]:
    """The shipped template ``ours`` with the variable defaults an existing pool has."""
    merged = copy.deepcopy(ours)
    have = ((theirs or {}).get("variables") or {}).get("properties") or {}
    for name, variable in merged["variables"]["properties"].items():
        if name not in have or "default" not in have[name]:
            continue
        if name == "env":
            variable["default"] = {**variable.get("default", {}), **(have[name]["default"] or {})}
        else:
            variable["default"] = have[name]["default"]
    return merged


def _with_defaults(template: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``template`` with these variables' defaults set (``env`` merged into its own)."""
    result = copy.deepcopy(template)
    variables = result["variables"]["properties"]
    for name, value in defaults.items():
        if name not in variables:
            continue
        if name == "env":
            variables[name]["default"] = {**variables[name].get("default", {}), **value}
        else:
            variables[name]["default"] = value
    return result


def _without_env(template: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    env = template["variables"]["properties"].get("env", {})
    for name in names:
        env.get("default", {}).pop(name, None)
    return template


def register_blocks() -> list[str]:
    """Register ClaudeCluster's block types so they show in the UI."""
    from claudecluster.blocks import ClaudeCodeSettings, TargetRepository

    registered = []
    for block in (ClaudeCodeSettings, TargetRepository):
        block.register_type_and_schema(_sync=True)  # type: ignore[call-arg]
        registered.append(block.get_block_type_slug())
    return registered


def result_storage_env(block_slug: str) -> dict[str, str]:
    """The job environment that makes flow runs persist results to ``block_slug``."""
    return {"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": block_slug}


def with_result_storage(template: dict[str, Any], block_slug: str) -> dict[str, Any]:
    """``template`` whose runs persist results to ``block_slug`` (e.g. an S3 bucket block).

    Containers share no disk with the driver, so their TaskResults must go to storage both
    can reach; the driver reads each result from the block its record names.
    """
    env = template["variables"]["properties"]["env"]
    env["default"] = {**env.get("default", {}), "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": block_slug}
    return template


def with_env_defaults(template: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """``template`` whose runs get ``env`` unless a deployment or run says otherwise."""
    properties = template["variables"]["properties"]["env"]
    properties["default"] = {**env, **properties.get("default", {})}
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
    image: str | None = None,
    team: bool = False,
) -> SetupReport:
    """Create pools, the session limit and the block types on the current Prefect server.

    ``result_storage`` is the slug of a filesystem block (``remote-file-system/NAME``,
    ``s3-bucket/NAME``, ...) that container pools persist their results to; without one
    they need none on a single machine (the driver rebuilds a result from the task branch).
    ``image`` is the worker image for the container pools (for example one pushed to a
    registry); they then pull it when a host does not have it. A pool that exists keeps
    every setting these do not name. With ``team`` the process pool's workers are on hosts
    that share no disk with the driver: runs keep results on their own host (they come back
    through git) and get repositories by URL; a local path is refused before a run starts.
    """
    created = {}
    for name in pools or list(POOLS):
        worker_type, template_path = POOLS[name]
        template = base_job_template(template_path)
        overrides: dict[str, Any] = {}
        template = with_env_defaults(template, HEARTBEAT_ENV)
        drop: tuple[str, ...] = ()
        if worker_type == "process" and team:
            # Workers on other hosts: results stay on each host, repositories go by URL.
            overrides["env"] = {SHARES_DISK_VAR: "false", **TEAM_CLIENT_ENV}
            if result_storage:
                overrides["env"].update(result_storage_env(result_storage))
            drop = ("PREFECT_LOCAL_STORAGE_PATH",)
        elif worker_type == "process":
            template = with_local_results(template, local_results())
        else:
            if result_storage:
                overrides["env"] = result_storage_env(result_storage)
            if image:
                overrides["image"] = image
                overrides["image_pull_policy"] = "IfNotPresent"
        created[name] = ensure_pool(name, worker_type, template, overrides, drop_env=drop)
    limits = ensure_limits(sessions, starts_per_second=starts_per_second, start_burst=start_burst)
    return SetupReport(
        pools=created,
        lost_worker_automation=ensure_automation(),
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
