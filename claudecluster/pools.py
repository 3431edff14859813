"""Which work pool runs a task, and the worker deployment that reaches it.

``local`` (the default) runs a task as an in-process task run of the goal's flow run. Any
other name is a Prefect work pool: the task runs as a flow run of the ``claudecluster-worker``
deployment that targets that pool (``deployments/prefect.yaml`` has one per pool). The pool
is chosen per task (``pool`` in the plan), else by ``--pool``, else by the plan's ``pool``.
Every pool a plan uses is checked before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from claudecluster.errors import ConfigError, UnknownPoolError, UsageError
from claudecluster.plan import LOCAL_POOL

WORKER_FLOW_NAME = "claudecluster-worker"
# In a process pool's job environment (set by `claudecluster setup --team`): "false" when its
# workers are on other hosts and share no disk with the driver.
SHARES_DISK_VAR = "CLAUDECLUSTER_POOL_SHARES_DISK"


@dataclass(frozen=True)
class PoolTarget:
    """Where tasks of one work pool go."""

    deployment: str
    pool_type: str
    other_hosts: bool = False  # a process pool whose workers are on other hosts

    @property
    def shares_disk(self) -> bool:
        """True when the pool's workers see the driver's files (so a local path works)."""
        return self.pool_type == "process" and not self.other_hosts


def _other_hosts(base_job_template: dict[str, Any]) -> bool:
    env = base_job_template.get("variables", {}).get("properties", {}).get("env", {}).get("default")
    return isinstance(env, dict) and str(env.get(SHARES_DISK_VAR, "")).lower() == "false"


def worker_deployments(pools: set[str]) -> dict[str, PoolTarget]:
    """The worker deployment (and pool type) for every non-local pool in ``pools``.

    Raises UnknownPoolError for a pool that does not exist or that no worker deployment
    targets.
    """
    remote = sorted(p for p in pools if p != LOCAL_POOL)
    if not remote:
        return {}
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.exceptions import ObjectNotFound

    found: dict[str, PoolTarget] = {}
    types: dict[str, str] = {}
    elsewhere: dict[str, bool] = {}
    try:
        with get_client(sync_client=True) as client:
            for pool in remote:
                try:
                    work_pool = client.read_work_pool(pool)
                    types[pool] = work_pool.type
                    elsewhere[pool] = _other_hosts(work_pool.base_job_template)
                except ObjectNotFound:
                    raise UnknownPoolError(
                        f"unknown pool {pool!r}: no such work pool on the Prefect server",
                        pool=pool,
                        hint="Run `claudecluster setup`, or use --pool local.",
                    ) from None
            deployments = client.read_deployments(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[WORKER_FLOW_NAME])),
                work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=remote)),
            )
    except UsageError:
        raise
    except Exception as exc:  # an unreachable server is a setup problem, not a crash
        raise ConfigError(
            f"cannot look up work pools on the Prefect server: {exc}",
            hint="Check PREFECT_API_URL, or use --pool local.",
        ) from exc
    for deployment in deployments:
        if deployment.work_pool_name and deployment.work_pool_name not in found:
            found[deployment.work_pool_name] = PoolTarget(
                deployment=f"{WORKER_FLOW_NAME}/{deployment.name}",
                pool_type=types[deployment.work_pool_name],
                other_hosts=elsewhere[deployment.work_pool_name],
            )
    missing = [pool for pool in remote if pool not in found]
    if missing:
        raise UnknownPoolError(
            f"pool {missing[0]!r} has no {WORKER_FLOW_NAME} deployment",
            pool=missing[0],
            hint="Deploy it: prefect deploy --all --prefect-file deployments/prefect.yaml",
        )
    return found


def check_reachable(targets: dict[str, PoolTarget], *, repo_is_url: bool) -> None:
    """Refuse pools that could never reach the repository before anything starts.

    A local repository is served to container pools on this machine's loopback, which Docker
    containers with host networking reach and Kubernetes pods do not.
    """
    if repo_is_url:
        return
    for pool, target in targets.items():
        if target.pool_type == "kubernetes":
            raise UsageError(
                f"pool {pool!r} runs pods that cannot reach a local repository",
                hint="Pass a git URL the cluster can clone and push to (--repo or --repo-block).",
            )
        if target.other_hosts:
            raise UsageError(
                f"pool {pool!r} has workers on other hosts that cannot reach a local repository",
                hint="Pass a git URL every host can clone and push to (--repo or --repo-block).",
            )
