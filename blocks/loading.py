"""Loading ClaudeCluster's blocks by name, with a one-line error when one is missing."""

from __future__ import annotations

from typing import TypeVar

from prefect.blocks.core import Block

from claudecluster.errors import ConfigError

B = TypeVar("B", bound=Block)


def load_block(block_type: type[B], name: str, what: str) -> B:
    """Load the ``block_type`` block ``name`` (from synchronous code).

    A block that does not exist is bad input (ConfigError, exit code 2), not a crash.
    """
    try:
        block = block_type.load(name, _sync=True)  # type: ignore[call-arg]
    except ValueError as exc:
        raise ConfigError(
            f"no {what} block named {name!r}: {exc}",
            hint="Create it in the Prefect UI (Blocks) or with Python; see the README.",
        ) from None
    if not isinstance(block, block_type):
        raise ConfigError(
            f"block {name!r} is a {type(block).__name__}, not a {block_type.__name__}",
            hint="Name a block of the right type.",
        )
    return block
