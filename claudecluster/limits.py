"""Cluster-wide limits on Claude Code sessions, kept by Prefect's global concurrency limits.

``claudecluster-sessions`` caps how many sessions run at once across every run, flow and
work pool that talks to the same Prefect server. It is created by ``claudecluster setup``
(and on first use with a default of 8), shows in the UI under Concurrency, and can be changed
there or with ``prefect gcl update claudecluster-sessions --limit N``.

Every session holds one slot while it runs. The slot is acquired with ``strict=True``: if
the limit does not exist, the session does not start (a missing limit must never mean
"unlimited").
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from claudecluster.errors import ConfigError

SESSION_LIMIT = "claudecluster-sessions"
DEFAULT_SESSION_SLOTS = 8


def ensure_limits(sessions: int | None = None) -> int:
    """Create the session limit if it is missing (or set it to ``sessions``); return it."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_global_concurrency_limit_by_name(SESSION_LIMIT)
        except ObjectNotFound:
            existing = None
        if existing is not None and sessions is None:
            return int(existing.limit)
        wanted = sessions or DEFAULT_SESSION_SLOTS
        client.upsert_global_concurrency_limit_by_name(SESSION_LIMIT, wanted)
        return wanted


@asynccontextmanager
async def session_slot() -> AsyncIterator[None]:
    """Hold one slot of the cluster-wide session limit while the block runs."""
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.asyncio import concurrency

    acquired = False
    try:
        async with concurrency(SESSION_LIMIT, occupy=1, strict=True):
            acquired = True
            yield
    except ConcurrencySlotAcquisitionError as exc:
        if acquired:
            raise
        raise ConfigError(
            f"cannot take a slot of the concurrency limit {SESSION_LIMIT}: {exc}",
            hint="Run `claudecluster setup` against this Prefect server.",
        ) from exc
