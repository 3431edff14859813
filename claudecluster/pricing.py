"""What a session has cost so far, from the usage Claude Code reports on every turn.

Claude Code reports a session's cost only when it ends (``ResultMessage.total_cost_usd``, at
list price for the model name). While it runs, every assistant message carries the turn's
token usage; this module prices that usage at the same list prices, so a run's budget can
count a session's spend as it goes, and an attempt that died mid-session still has a cost.
Once the session ends, Claude Code's own figure replaces the estimate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from claudecluster.models import TokenUsage

PER_MILLION = 1_000_000


@dataclass(frozen=True)
class Price:
    """List prices in USD per million tokens."""

    input: float
    output: float
    cache_write: float
    cache_read: float


# The list prices Claude Code (2.1.331, the CLI bundled with claude-agent-sdk) applies, from
# its model catalog: USD per million input, output, cache-write and cache-read tokens.
_TIER_2_10 = Price(2.0, 10.0, 2.5, 0.2)
_TIER_3_15 = Price(3.0, 15.0, 3.75, 0.3)
_TIER_5_25 = Price(5.0, 25.0, 6.25, 0.5)
_TIER_10_50 = Price(10.0, 50.0, 12.5, 1.0)
_TIER_15_75 = Price(15.0, 75.0, 18.75, 1.5)
_PRICES: dict[str, Price] = {
    "claude-3-5-haiku": Price(0.8, 4.0, 1.0, 0.08),
    "claude-3-5-sonnet": _TIER_3_15,
    "claude-3-7-sonnet": _TIER_3_15,
    "claude-haiku-4-5": Price(1.0, 5.0, 1.25, 0.1),
    "claude-haiku-5-5": Price(0.1, 0.5, 0.125, 0.01),
    "claude-sonnet-4-0": _TIER_3_15,
    "claude-sonnet-4-5": _TIER_3_15,
    "claude-sonnet-4-6": _TIER_3_15,
    "claude-sonnet-4": _TIER_3_15,  # claude-sonnet-4-20250514: Sonnet 4
    "claude-sonnet-5": _TIER_2_10,
    "claude-sonnet-5-5": Price(2.0, 10.0, 2.5, 0.1),
    "claude-opus-4-0": _TIER_15_75,
    "claude-opus-4-1": _TIER_15_75,
    "claude-opus-4": _TIER_15_75,  # claude-opus-4-20250514: Opus 4
    "claude-opus-4-5": _TIER_5_25,
    "claude-opus-4-6": _TIER_5_25,
    "claude-opus-4-7": _TIER_5_25,
    "claude-opus-4-8": _TIER_5_25,
    "claude-opus-5": _TIER_5_25,
    "claude-opus-5-5": Price(4.0, 20.0, 5.0, 0.2),
    "claude-fable-5": _TIER_10_50,
    "claude-fable-5-1": Price(10.0, 50.0, 12.5, 0.25),
    "claude-fable-5-2": Price(8.0, 40.0, 10.0, 0.2),
    "claude-mythos-5": _TIER_10_50,
    "claude-mythos-5-1": Price(10.0, 50.0, 12.5, 0.25),
    "claude-mythos-5-2": Price(8.0, 40.0, 10.0, 0.2),
}
# What Claude Code charges a model it does not know.
DEFAULT_PRICE = _TIER_5_25


def price_of(model: str | None) -> Price:
    """The list price of ``model``, matched by the longest catalog name it starts with
    (dated, Bedrock and Vertex spellings included); Claude Code's default for others."""
    name = (model or "").lower().split("anthropic.", 1)[-1]  # "us.anthropic.claude-..."
    known = [key for key in _PRICES if name == key or name.startswith((f"{key}-", f"{key}@"))]
    return _PRICES[max(known, key=len)] if known else DEFAULT_PRICE


def usage_cost(model: str | None, usage: Mapping[str, Any]) -> float:
    """The list price of one API response's token ``usage`` for ``model``."""
    price = price_of(model)

    def tokens(key: str) -> int:
        value = usage.get(key) or 0
        return int(value) if isinstance(value, int | float) else 0

    return (
        tokens("input_tokens") * price.input
        + tokens("output_tokens") * price.output
        + tokens("cache_creation_input_tokens") * price.cache_write
        + tokens("cache_read_input_tokens") * price.cache_read
    ) / PER_MILLION


class CostMeter:
    """A session's spend so far, from the usage on its assistant messages.

    Claude Code sends one assistant message per content block of a response, each with the
    response's usage; the meter counts every response (message id) once, with its latest
    usage.
    """

    def __init__(self) -> None:
        self._responses: dict[str, tuple[float, Mapping[str, Any]]] = {}
        self._unnamed: list[tuple[float, Mapping[str, Any]]] = []

    def add(
        self, message_id: str | None, model: str | None, usage: Mapping[str, Any] | None
    ) -> None:
        """Count one assistant message's usage."""
        if not usage:
            return
        seen = (usage_cost(model, usage), usage)
        if message_id:
            self._responses[message_id] = seen
        else:
            self._unnamed.append(seen)

    @property
    def cost_usd(self) -> float:
        """The spend so far, in USD."""
        return round(sum(cost for cost, _ in self._seen()), 6)

    @property
    def usage(self) -> TokenUsage:
        """The tokens so far."""

        def total(key: str) -> int:
            return sum(int(u.get(key) or 0) for _, u in self._seen())

        return TokenUsage(
            input_tokens=total("input_tokens"),
            output_tokens=total("output_tokens"),
            cache_creation_input_tokens=total("cache_creation_input_tokens"),
            cache_read_input_tokens=total("cache_read_input_tokens"),
        )

    def _seen(self) -> list[tuple[float, Mapping[str, Any]]]:
        return [*self._responses.values(), *self._unnamed]
