"""Cluster-wide limits on Claude Code sessions, kept by Prefect's global concurrency limits.

Two limits, shared by every run, flow and work pool that talks to the same Prefect server:

- ``claudecluster-sessions`` caps how many sessions run at once (default 16). Every session
  holds one slot while it runs.
- ``claudecluster-session-starts`` is a rate limit on session starts (default: bursts of 16,
  refilled at 8 per second). Every session takes one slot before it starts; slots decay, so
  starts are spread out instead of hitting the API all at once. Tune it to your API tier:
  ``claudecluster setup --starts-per-second R --start-burst B``, or
  ``prefect gcl update claudecluster-session-starts --limit B --slot-decay-per-second R``.

Both are created by ``claudecluster setup`` (and on first use with the defaults), show in the
UI under Concurrency, and are acquired with ``strict=True``: if a limit does not exist, the
session does not start (a missing limit must never mean "unlimited").
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from claudecluster.errors import ConfigError

SESSION_LIMIT = "claudecluster-sessions"
DEFAULT_SESSION_SLOTS = 16
START_RATE_LIMIT = "claudecluster-session-starts"
# Generous enough that a run's own fan-out (up to max_parallel starts at once) is never
# refused: Prefect answers a refusal with a Retry-After that grows with every refusal it has
# counted, which cost ~3 s per task in the benchmark with a burst of 4 at 2 per second.
DEFAULT_START_BURST = 16
DEFAULT_STARTS_PER_SECOND = 8.0


@dataclass(frozen=True)
class Limits:
    """The cluster-wide limits as they stand on the server."""

    sessions: int
    start_burst: int
    starts_per_second: float


def ensure_limits(
    sessions: int | None = None,
    *,
    starts_per_second: float | None = None,
    start_burst: int | None = None,
) -> Limits:
    """Create the limits if they are missing (or set what is given); return them."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_global_concurrency_limit_by_name(SESSION_LIMIT)
        except ObjectNotFound:
            existing = None
        if existing is None or sessions is not None:
            wanted = sessions or DEFAULT_SESSION_SLOTS
            client.upsert_global_concurrency_limit_by_name(SESSION_LIMIT, wanted)
        else:
            wanted = int(existing.limit)
        try:
            rate = client.read_global_concurrency_limit_by_name(START_RATE_LIMIT)
        except ObjectNotFound:
            rate = None
        burst = start_burst or (int(rate.limit) if rate else DEFAULT_START_BURST)
        per_second = starts_per_second or (
            float(rate.slot_decay_per_second) if rate else DEFAULT_STARTS_PER_SECOND
        )
        if rate is None or starts_per_second is not None or start_burst is not None:
            client.upsert_global_concurrency_limit_by_name(
                START_RATE_LIMIT, burst, slot_decay_per_second=per_second
            )
        return Limits(sessions=wanted, start_burst=burst, starts_per_second=per_second)


@asynccontextmanager
async def session_slot() -> AsyncIterator[None]:
    """Wait for a start under the rate limit, then hold a session slot while the block runs."""
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.asyncio import concurrency, rate_limit

    acquired = False
    try:
        await rate_limit(START_RATE_LIMIT, occupy=1, strict=True)
        async with concurrency(SESSION_LIMIT, occupy=1, strict=True):
            acquired = True
            yield
    except ConcurrencySlotAcquisitionError as exc:
        if acquired:
            raise
        raise ConfigError(
            f"cannot take a slot of the ClaudeCluster session limits: {exc}",
            hint="Run `claudecluster setup` against this Prefect server.",
        ) from exc


def session_cap() -> int:
    """The current slots of the cluster-wide session limit."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return int(client.read_global_concurrency_limit_by_name(SESSION_LIMIT).limit)
        except ObjectNotFound:
            raise ConfigError(
                f"the concurrency limit {SESSION_LIMIT} is missing on the Prefect server",
                hint="Run `claudecluster setup` against this Prefect server.",
            ) from None


@contextmanager
def run_slots(slots: int) -> Iterator[None]:
    """Hold ``slots`` of the session limit for a whole run (none when ``slots`` is 0)."""
    if slots <= 0:
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(SESSION_LIMIT, occupy=slots, strict=True):
        yield


def start_slot() -> None:
    """Wait for one session start under the cluster-wide start-rate limit."""
    from prefect.concurrency.sync import rate_limit

    rate_limit(START_RATE_LIMIT, occupy=1, strict=True)
