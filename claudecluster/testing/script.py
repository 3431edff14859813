"""Scripts: what the scripted model says, turn by turn, to one kind of conversation.

A :class:`Script` is a named list of entries matched against the user's prompt. The
:class:`~claudecluster.testing.model_server.ScriptedModelServer` picks a script for each
request and answers with the entry for that request's *turn index* (the number of assistant
messages already in the conversation, so the server needs no per-conversation state)::

    from claudecluster.testing import Script, api_error, structured, text, tool_use

    Script(
        name="edit-two",
        match="EDIT-TWO-MARKER",          # substring of the prompt, or a compiled regex
        turns=[
            tool_use("Write", {"file_path": "a.py", "content": "x = 1\\n"}),
            api_error(429, times=2),      # the next turn is first answered with two 429s
            tool_use("Bash", {"command": "python -m pytest -q"}),
            text("Done."),
        ],
    )

Entries are built with these helpers:

* :func:`text` - a final answer (``stop_reason`` ``end_turn``).
* :func:`tool_use` / :func:`tool_uses` - one or several tool calls in one turn (``tool_use``).
* :func:`structured` - a call of the CLI's ``StructuredOutput`` tool, which it offers when
  the SDK is given ``output_format={"type": "json_schema", ...}``.
* :func:`api_error` - not a turn of its own: it is folded into the turn that follows it, which
  is then answered with that HTTP error ``times`` times (counted per session and turn, because
  the CLI resends the same request when it retries) before its real reply. ``Turn(errors=...)``
  is the same thing written as an attribute.
* :func:`hang` - hold the response open (until the server stops, or for ``seconds``).
* any callable ``(RequestView) -> Turn`` - a reply computed from the request, e.g. from the
  previous tool result (:meth:`RequestView.tool_results`) or from the model name.

The CLI really runs the tools, with its own rules: ``Edit`` (and ``Write`` over an existing
file) fails with an ``is_error`` tool result unless the file was ``Read`` earlier in the
session, and relative ``file_path`` values resolve against the session's ``cwd``.

Past the end of its entries a script answers ``final_text`` ("Done."). Every builder takes
``latency_s`` (delay before the reply, overriding the server-wide latency) and ``usage``
(token counts that replace the computed ones, e.g. ``{"output_tokens": 500_000}`` to blow a
budget deterministically).

Scripts can also be written as JSON for the standalone server (see :func:`load_scripts`)::

    [{"name": "hello", "match": "HELLO-MARKER",
      "turns": [{"tool_use": {"name": "Write", "input": {"file_path": "/tmp/x", "content": "1"}}},
                {"error": 429, "times": 2},
                {"text": "Done.", "latency_s": 0.2}]}]
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "STRUCTURED_OUTPUT_TOOL",
    "ApiError",
    "Entry",
    "RequestView",
    "Script",
    "TextBlock",
    "ToolResult",
    "ToolUseBlock",
    "Turn",
    "TurnFactory",
    "api_error",
    "hang",
    "load_scripts",
    "structured",
    "text",
    "tool_use",
    "tool_uses",
]

STRUCTURED_OUTPUT_TOOL = "StructuredOutput"
"""The tool the CLI offers (with the caller's JSON schema as input schema) for output_format."""

DEFAULT_FINAL_TEXT = "Done."

_REMINDER = re.compile(r"<system-reminder>.*?</system-reminder>", re.DOTALL)

_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


# --------------------------------------------------------------------------- turns


@dataclass(frozen=True)
class TextBlock:
    """A text content block of an assistant reply."""

    text: str


@dataclass(frozen=True)
class ToolUseBlock:
    """A tool call of an assistant reply; ``id`` is generated per session and turn if None."""

    name: str
    input: Mapping[str, Any]
    id: str | None = None


Block: TypeAlias = TextBlock | ToolUseBlock


@dataclass(frozen=True)
class ApiError:
    """Answer a request with an Anthropic-format HTTP error, ``times`` times in a row."""

    status: int = 429
    times: int = 1
    message: str | None = None
    retry_after_s: float | None = 0.0
    """Sent as the ``retry-after`` header on 429s; the CLI ignores 0 and backs off itself."""

    def __post_init__(self) -> None:
        if self.times < 1:
            raise ValueError(f"ApiError.times must be at least 1, got {self.times}")
        if not 400 <= self.status <= 599:
            raise ValueError(f"ApiError.status must be an HTTP error status, got {self.status}")

    @property
    def error_type(self) -> str:
        """The Anthropic error type for this status (``rate_limit_error``, ...)."""
        if self.status in _ERROR_TYPES:
            return _ERROR_TYPES[self.status]
        return "api_error" if self.status >= 500 else "invalid_request_error"

    def body(self) -> dict[str, Any]:
        """The JSON error body the real API sends for this status."""
        message = self.message or f"Scripted {self.status} ({self.error_type})"
        return {"type": "error", "error": {"type": self.error_type, "message": message}}


@dataclass(frozen=True)
class Turn:
    """One assistant reply, plus how it is delivered (errors first, latency, usage)."""

    blocks: tuple[Block, ...]
    errors: tuple[ApiError, ...] = ()
    """Answered, in order and each ``times`` times, before ``blocks`` are sent."""
    latency_s: float | None = None
    """Delay before the reply; None uses the server's latency; ``math.inf`` waits for stop."""
    usage: Mapping[str, int] | None = None
    """Token counts replacing the computed ones (input_tokens, output_tokens, cache_*)."""

    @property
    def stop_reason(self) -> str:
        """``tool_use`` if the reply calls a tool, else ``end_turn``."""
        if any(isinstance(block, ToolUseBlock) for block in self.blocks):
            return "tool_use"
        return "end_turn"

    def expanded_errors(self) -> list[ApiError]:
        """The errors expanded to one entry per failed attempt."""
        return [error for error in self.errors for _ in range(error.times)]


@dataclass(frozen=True)
class ToolResult:
    """A ``tool_result`` block the CLI sent back: what a tool call of ours produced."""

    tool_use_id: str
    content: str
    """The tool's output, without the ``<system-reminder>`` the CLI appends to it."""
    is_error: bool
    raw_content: str = ""
    """The text exactly as sent, reminders included."""


@dataclass(frozen=True)
class RequestView:
    """A parsed ``/v1/messages`` request, as scripts and the server see it."""

    body: Mapping[str, Any]
    session_id: str | None = None

    @property
    def model(self) -> str | None:
        """The model the CLI asked for (the fallback model after an overload switch)."""
        model = self.body.get("model")
        return model if isinstance(model, str) else None

    @property
    def messages(self) -> list[Mapping[str, Any]]:
        """The conversation so far; the CLI resends all of it every turn."""
        messages = self.body.get("messages")
        return [m for m in messages if isinstance(m, Mapping)] if isinstance(messages, list) else []

    @property
    def turn_index(self) -> int:
        """How many assistant replies the conversation already has (0 on the first turn)."""
        return sum(1 for message in self.messages if message.get("role") == "assistant")

    @property
    def tool_names(self) -> list[str]:
        """Names of the tools offered to the model."""
        tools = self.body.get("tools")
        if not isinstance(tools, list):
            return []
        return [
            t["name"] for t in tools if isinstance(t, Mapping) and isinstance(t.get("name"), str)
        ]

    @property
    def streamed(self) -> bool:
        """Whether the caller asked for server-sent events."""
        return bool(self.body.get("stream", False))

    def _first_user_texts(self) -> list[str]:
        for message in self.messages:
            if message.get("role") == "user":
                return _texts(message.get("content"))
        return []

    @property
    def prompt(self) -> str:
        """The user's prompt: the last text block of the first user message.

        The CLI puts its ``<system-reminder>`` blocks before the prompt in that message.
        """
        texts = self._first_user_texts()
        return texts[-1] if texts else ""

    @property
    def first_user_text(self) -> str:
        """All text of the first user message, reminders included."""
        return "\n".join(self._first_user_texts())

    def tool_results(self) -> list[ToolResult]:
        """The tool results in the last user message (what our previous turn's calls gave)."""
        for message in reversed(self.messages):
            if message.get("role") != "user":
                continue
            content = message.get("content")
            if not isinstance(content, list):
                return []
            results = []
            for block in content:
                if not (isinstance(block, Mapping) and block.get("type") == "tool_result"):
                    continue
                raw = "\n".join(_texts(block.get("content")))
                results.append(
                    ToolResult(
                        tool_use_id=str(block.get("tool_use_id", "")),
                        content=_REMINDER.sub("", raw).strip(),
                        is_error=bool(block.get("is_error", False)),
                        raw_content=raw,
                    )
                )
            return results
        return []


def _texts(content: object) -> list[str]:
    """Text of a message content, which the API allows as a string or a list of blocks."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return []
    return [
        block["text"]
        for block in content
        if isinstance(block, Mapping)
        and block.get("type") == "text"
        and isinstance(block.get("text"), str)
    ]


TurnFactory: TypeAlias = Callable[[RequestView], Turn]
"""A reply computed from the request at the time it arrives."""

Entry: TypeAlias = Turn | ApiError | TurnFactory
"""What a script's ``turns`` list may hold."""


# --------------------------------------------------------------------------- builders


def text(s: str, *, latency_s: float | None = None, usage: Mapping[str, int] | None = None) -> Turn:
    """A final answer: one text block, ``stop_reason`` ``end_turn``."""
    return Turn(blocks=(TextBlock(s),), latency_s=latency_s, usage=usage)


def tool_use(
    name: str,
    input: Mapping[str, Any],
    *,
    id: str | None = None,
    preamble: str | None = None,
    latency_s: float | None = None,
    usage: Mapping[str, int] | None = None,
) -> Turn:
    """One tool call (optionally after a short ``preamble`` text), ``stop_reason`` ``tool_use``."""
    blocks: tuple[Block, ...] = (ToolUseBlock(name=name, input=dict(input), id=id),)
    if preamble is not None:
        blocks = (TextBlock(preamble), *blocks)
    return Turn(blocks=blocks, latency_s=latency_s, usage=usage)


def tool_uses(
    calls: Iterable[tuple[str, Mapping[str, Any]]],
    *,
    preamble: str | None = None,
    latency_s: float | None = None,
    usage: Mapping[str, int] | None = None,
) -> Turn:
    """Several tool calls in one turn; the CLI runs them and returns all results together."""
    blocks: list[Block] = [TextBlock(preamble)] if preamble is not None else []
    blocks += [ToolUseBlock(name=name, input=dict(args)) for name, args in calls]
    if not any(isinstance(block, ToolUseBlock) for block in blocks):
        raise ValueError("tool_uses() needs at least one call")
    return Turn(blocks=tuple(blocks), latency_s=latency_s, usage=usage)


def structured(
    data: Mapping[str, Any],
    *,
    latency_s: float | None = None,
    usage: Mapping[str, int] | None = None,
) -> Turn:
    """Deliver ``data`` as structured output: a call of the CLI's ``StructuredOutput`` tool."""
    return tool_use(STRUCTURED_OUTPUT_TOOL, data, latency_s=latency_s, usage=usage)


def api_error(
    status: int = 429,
    *,
    times: int = 1,
    message: str | None = None,
    retry_after_s: float | None = 0.0,
) -> ApiError:
    """Fail the *next* turn of the script with HTTP ``status`` ``times`` times, then reply."""
    return ApiError(status=status, times=times, message=message, retry_after_s=retry_after_s)


def hang(seconds: float | None = None, *, then: Turn | None = None) -> Turn:
    """Hold the response open without a byte sent, until the server stops or ``seconds`` pass.

    After ``seconds`` the request is answered with ``then`` (default: "Done."), so a finite
    hang is simply a very slow turn. Stopping the server drops held connections at once.
    """
    reply = then if then is not None else text(DEFAULT_FINAL_TEXT)
    return replace(reply, latency_s=math.inf if seconds is None else seconds)


# --------------------------------------------------------------------------- scripts


@dataclass(frozen=True)
class Script:
    """A named conversation: the replies for prompts that ``match``."""

    name: str
    match: str | re.Pattern[str]
    """A substring of the prompt, or a compiled regex searched in it."""
    turns: Sequence[Entry] = ()
    final_text: str = DEFAULT_FINAL_TEXT
    """The reply once the turn index is past the last entry."""
    _steps: tuple[Turn | TurnFactory, ...] = field(init=False, repr=False, compare=False)
    _pending: tuple[tuple[ApiError, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # api_error() entries are folded into the turn that follows them, so the entry list
        # reads like a transcript while turn indexes still count only real replies.
        steps: list[Turn | TurnFactory] = []
        pending: list[tuple[ApiError, ...]] = []
        waiting: list[ApiError] = []
        for entry in self.turns:
            if isinstance(entry, ApiError):
                waiting.append(entry)
            elif isinstance(entry, Turn) or callable(entry):
                steps.append(entry)
                pending.append(tuple(waiting))
                waiting = []
            else:
                raise TypeError(f"script {self.name!r}: not a turn entry: {entry!r}")
        if waiting:
            steps.append(text(self.final_text))
            pending.append(tuple(waiting))
        object.__setattr__(self, "_steps", tuple(steps))
        object.__setattr__(self, "_pending", tuple(pending))

    def __len__(self) -> int:
        """The number of turns (api_error entries are not turns of their own)."""
        return len(self._steps)

    def matches(self, haystack: str) -> bool:
        """Whether this script's ``match`` is found in ``haystack``."""
        if isinstance(self.match, re.Pattern):
            return self.match.search(haystack) is not None
        return self.match in haystack

    def turn_at(self, index: int, view: RequestView) -> Turn:
        """The reply for turn ``index`` of the conversation ``view`` belongs to."""
        if index >= len(self._steps):
            return text(self.final_text)
        step = self._steps[index]
        turn = step if isinstance(step, Turn) else step(view)
        if not isinstance(turn, Turn):
            raise TypeError(f"script {self.name!r} turn {index}: factory returned {turn!r}")
        pending = self._pending[index]
        return replace(turn, errors=pending + turn.errors) if pending else turn


def choose_script(scripts: Sequence[Script], view: RequestView) -> Script | None:
    """The first script matching the prompt, else the first matching any first-message text.

    Two passes, so a script keyed on the prompt wins over an earlier one that only happens to
    match a system reminder.
    """
    prompt = view.prompt
    for script in scripts:
        if script.matches(prompt):
            return script
    everything = view.first_user_text
    for script in scripts:
        if script.matches(everything):
            return script
    return None


# --------------------------------------------------------------------------- JSON form


class ToolCallSpec(BaseModel):
    """A tool call in a JSON script."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The tool to call, e.g. Write, Edit, Bash.")
    input: dict[str, Any] = Field(default_factory=dict, description="The tool's input.")


class EntrySpec(BaseModel):
    """One entry of a JSON script: exactly one of text/tool_use/tool_uses/structured/error/hang."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(default=None, description="A final text answer.")
    tool_use: ToolCallSpec | None = Field(default=None, description="One tool call.")
    tool_uses: list[ToolCallSpec] | None = Field(
        default=None, description="Several tool calls in one turn."
    )
    structured: dict[str, Any] | None = Field(
        default=None, description="Structured output, sent as a StructuredOutput tool call."
    )
    error: int | None = Field(
        default=None, description="HTTP status to fail the next turn with (429, 529, 500...)."
    )
    times: int = Field(default=1, ge=1, description="How often the error is answered.")
    hang: bool | float | None = Field(
        default=None, description="true: hold the response until stop; a number: that long."
    )
    latency_s: float | None = Field(default=None, ge=0, description="Delay before the reply.")
    usage: dict[str, int] | None = Field(
        default=None, description="Token counts replacing the computed ones."
    )

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> EntrySpec:
        kinds = [
            name
            for name in ("text", "tool_use", "tool_uses", "structured", "error", "hang")
            if getattr(self, name) is not None
        ]
        if len(kinds) != 1:
            raise ValueError(f"an entry needs exactly one kind, got {kinds or 'none'}")
        return self

    def to_entry(self) -> Turn | ApiError:
        """The builder call this entry stands for."""
        options: dict[str, Any] = {"latency_s": self.latency_s, "usage": self.usage}
        if self.error is not None:
            return api_error(self.error, times=self.times)
        if self.text is not None:
            return text(self.text, **options)
        if self.tool_use is not None:
            return tool_use(self.tool_use.name, self.tool_use.input, **options)
        if self.tool_uses is not None:
            return tool_uses([(c.name, c.input) for c in self.tool_uses], **options)
        if self.structured is not None:
            return structured(self.structured, **options)
        seconds = None if self.hang is True else float(self.hang or 0)
        return hang(seconds)


class ScriptSpec(BaseModel):
    """A script in JSON form."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Name recorded for the sessions this script serves.")
    match: str | None = Field(default=None, description="Substring of the prompt to match.")
    match_regex: str | None = Field(default=None, description="Regex searched in the prompt.")
    turns: list[EntrySpec] = Field(default_factory=list, description="The entries, in order.")
    final_text: str = Field(default=DEFAULT_FINAL_TEXT, description="Reply past the end.")

    def to_script(self) -> Script:
        """The :class:`Script` this spec describes."""
        if (self.match is None) == (self.match_regex is None):
            raise ValueError(f"script {self.name!r} needs exactly one of match, match_regex")
        match: str | re.Pattern[str] = (
            self.match if self.match is not None else re.compile(self.match_regex or "")
        )
        return Script(
            name=self.name,
            match=match,
            turns=[entry.to_entry() for entry in self.turns],
            final_text=self.final_text,
        )


def load_scripts(source: str | Path | Sequence[Mapping[str, Any]]) -> list[Script]:
    """Scripts from a JSON file path, or from already parsed JSON (a list of script objects)."""
    data: Any = json.loads(Path(source).read_text()) if isinstance(source, str | Path) else source
    if not isinstance(data, list):
        raise ValueError("a scripts file holds a JSON list of scripts")
    return [ScriptSpec.model_validate(item).to_script() for item in data]
