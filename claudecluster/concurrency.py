"""Cluster-wide limits on Claude Code sessions, kept by Prefect's global concurrency limits.

This module talks to the Prefect server; how one local run shares the slots it holds among
its own tasks is :mod:`claudecluster.places`.

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

A local run takes both in bulk, off its tasks' critical path (:mod:`claudecluster.places`):
:func:`run_slots` holds its ``max_parallel`` session slots for the whole run, and
:func:`acquire_starts` takes several starts per call. Each acquisition is a write to the
Prefect server; under load a SQLite server answers some of them with a 503 that Prefect's
client retries after about 2 s, and every acquisition queued behind it in the same process
waits too. Taken per session, that cost seconds on a third of the starts (benchmarks/).
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
# A pool session's slot is a lease its process renews; if the machine dies, the slot frees
# when the lease runs out (Prefect's default, 300 s, would keep it from the cluster 5 min).
SESSION_LEASE_S = 60.0


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
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError, concurrency

    acquired = False
    try:
        await _take_start()
        async with concurrency(
            SESSION_LIMIT, occupy=1, strict=True, lease_duration=SESSION_LEASE_S
        ):
            acquired = True
            yield
    except ConcurrencySlotAcquisitionError as exc:
        if acquired:
            raise
        raise _missing_limits(exc) from exc


async def _take_start() -> None:
    from prefect.concurrency.asyncio import rate_limit

    await rate_limit(START_RATE_LIMIT, occupy=1, strict=True)


def _missing_limits(exc: Exception) -> ConfigError:
    return ConfigError(
        f"cannot take a slot of the ClaudeCluster session limits: {exc}",
        hint="Run `claudecluster setup` against this Prefect server.",
    )


def current_limits() -> Limits:
    """The cluster-wide limits as they stand on the server."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        found = {}
        for name in (SESSION_LIMIT, START_RATE_LIMIT):
            try:
                found[name] = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                raise ConfigError(
                    f"the concurrency limit {name} is missing on the Prefect server",
                    hint="Run `claudecluster setup` against this Prefect server.",
                ) from None
    sessions, starts = found[SESSION_LIMIT], found[START_RATE_LIMIT]
    return Limits(
        sessions=int(sessions.limit),
        start_burst=int(starts.limit),
        starts_per_second=float(starts.slot_decay_per_second),
    )


@contextmanager
def run_slots(slots: int) -> Iterator[None]:
    """Hold ``slots`` of the session limit for a whole run (none when ``slots`` is 0)."""
    if slots <= 0:
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(SESSION_LIMIT, occupy=slots, strict=True):
        yield


def acquire_starts(count: int) -> None:
    """Take ``count`` session starts from the cluster-wide rate limit, waiting as needed."""
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import rate_limit

    try:
        rate_limit(START_RATE_LIMIT, occupy=count, strict=True)
    except ConcurrencySlotAcquisitionError as exc:
        raise _missing_limits(exc) from exc
