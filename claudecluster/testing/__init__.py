"""Test support: a scripted Anthropic Messages API that the real Claude Code CLI can talk to,
and a fake session runner for unit tests that need no CLI (:mod:`claudecluster.testing.fake`).

Write :class:`Script` objects with the builders (:func:`text`, :func:`tool_use`,
:func:`tool_uses`, :func:`structured`, :func:`api_error`, :func:`hang`), register them on a
:class:`ScriptedModelServer`, and run sessions with ``env=server.env(...)``. See
:mod:`claudecluster.testing.model_server` for how requests are answered and what the CLI does
on errors, and :mod:`claudecluster.testing.script` for the script model and its JSON form.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from claudecluster.testing.fake import FakeRunner, finished, stopped, writes
from claudecluster.testing.script import (
    STRUCTURED_OUTPUT_TOOL,
    ApiError,
    Entry,
    RequestView,
    Script,
    TextBlock,
    ToolResult,
    ToolUseBlock,
    Turn,
    TurnFactory,
    api_error,
    hang,
    load_scripts,
    structured,
    text,
    tool_use,
    tool_uses,
)

if TYPE_CHECKING:
    from claudecluster.testing.model_server import (
        RecordedRequest,
        ScriptedModelServer,
        SessionSummary,
    )

__all__ = [
    "STRUCTURED_OUTPUT_TOOL",
    "ApiError",
    "Entry",
    "FakeRunner",
    "RecordedRequest",
    "RequestView",
    "Script",
    "ScriptedModelServer",
    "SessionSummary",
    "TextBlock",
    "ToolResult",
    "ToolUseBlock",
    "Turn",
    "TurnFactory",
    "api_error",
    "finished",
    "hang",
    "load_scripts",
    "stopped",
    "structured",
    "text",
    "tool_use",
    "tool_uses",
    "writes",
]

_SERVER_NAMES = frozenset({"RecordedRequest", "ScriptedModelServer", "SessionSummary"})


def __getattr__(name: str) -> Any:
    # Imported on first use, so `python -m claudecluster.testing.model_server` does not find
    # its own module already imported by this package (runpy warns about that).
    if name in _SERVER_NAMES:
        from claudecluster.testing import model_server

        return getattr(model_server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
