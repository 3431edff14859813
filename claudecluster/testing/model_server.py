"""A scripted, Anthropic-compatible Messages API on loopback, for driving the real Claude Code CLI.

Tests start the server, register :class:`~claudecluster.testing.script.Script` objects, and
point the CLI at it through the environment::

    from claude_agent_sdk import ClaudeAgentOptions, query
    from claudecluster.testing import Script, ScriptedModelServer, text, tool_use

    with ScriptedModelServer() as server:                  # 127.0.0.1, a free port
        server.add_script(Script(name="hello", match="HELLO-MARKER", turns=[
            tool_use("Write", {"file_path": f"{tmp}/a.py", "content": "x = 1\\n"}),
            text("Done."),
        ]))
        options = ClaudeAgentOptions(
            env=server.env(config_dir=tmp_config), cwd=tmp, setting_sources=[],
            model="claude-sonnet-4-5", permission_mode="acceptEdits", allowed_tools=["Write"],
        )
        async for message in query(prompt="HELLO-MARKER please", options=options): ...
        server.requests       # every request, with timings, status, script, turn, model, body
        server.sessions()     # per X-Claude-Code-Session-Id summaries

How a request is answered (``POST /v1/messages``; the CLI adds ``?beta=true``):

* The script is the first registered one whose ``match`` is in the prompt (the last text
  block of the first user message), else the first one matching any text of that message.
  Conversations no script matches get ``default_reply`` and are recorded with
  ``script=None``.
* The turn index is the number of assistant messages in ``messages``: the CLI resends the whole
  conversation every turn, so the server keeps no per-conversation state except the count of
  scripted errors already answered for each (session, script, turn).
* The reply is streamed as server-sent events when ``stream`` is true (the CLI always asks for
  it), else returned as one JSON Message. Usage is about a token per four characters: input
  from the request body, output from the reply, so the CLI's cost (computed at list price for
  the model name) is > 0 and grows with the conversation; a turn's ``usage`` overrides it.
* ``POST /v1/messages/count_tokens`` answers ``{"input_tokens": n}``; ``GET``/``HEAD /`` is a
  health check; anything else is a 404 in the API's error format.

What Claude Code 2.1.331 does with errors (measured against this server):

* 429, 529 and 500 are all retried by the CLI itself, on the same request (the body is
  unchanged and ``X-Stainless-Retry-Count`` stays 0). Each retry is reported to the SDK as a
  ``SystemMessage`` with subtype ``api_retry`` (attempt, max_retries, retry_delay_ms,
  error_status).
* Backoff is exponential from 0.5 s, doubling, plus up to ~25 % jitter: about 0.5-0.6, 1.0-1.2,
  2.0-2.3, 4.0-4.3, 8.0-8.9 s before attempts 2..6. A ``retry-after`` of 0 is ignored (the
  backoff applies); a positive one is honoured (``retry-after: 2`` gave a 2.4 s wait).
* ``CLAUDE_CODE_MAX_RETRIES`` (default 10) is the number of retries after the first attempt.
  When they run out the session ends with a ``ResultMessage(is_error=True,
  api_error_status=429)`` and ``query()`` then raises ``claude_agent_sdk.ResultError``.
* With ``fallback_model`` set, three 529s in a row on the primary model make the CLI switch
  at once (no backoff) to the fallback model and reset its retry count; later requests carry
  the fallback's name in ``model``. 429s never trigger the fallback. Without a fallback model
  529s are just retried.
* A 400 is retried at once, without backoff: the CLI takes it for an unsupported beta and drops
  one ``anthropic-beta`` flag per retry, up to ``CLAUDE_CODE_MAX_RETRIES`` times.
* Other outcomes the SDK reports: the switch to the fallback is a ``SystemMessage`` with subtype
  ``model_fallback`` (trigger ``overloaded``); a ``structured()`` turn ends the session at once
  (no further request; ``num_turns`` 2, ``stop_reason`` ``tool_use``), while input that fails
  the schema comes back as an ``is_error`` tool result and the model is asked again; a turn whose
  usage exceeds ``max_budget_usd`` ends the session with subtype ``error_max_budget_usd``. Every
  error result makes ``query()`` raise ``ResultError`` after yielding the ``ResultMessage``.
* A hung response is bounded only by the CLI's 600 s request timeout
  (``X-Stainless-Timeout: 600``), so hang tests cancel from the outside (``anyio.fail_after``).
  Cancelling ``query()`` then takes about 5 s more: the SDK closes the CLI's stdin and waits
  5 s for it to exit (it does not, with a request in flight) before sending SIGTERM.
  ``stop()`` drops held connections at once.

Run it as its own process for demos and benchmarks (scripts in the JSON form described in
:mod:`claudecluster.testing.script`)::

    python -m claudecluster.testing.model_server --port 8089 --script scripts.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

from claudecluster.testing.script import (
    ApiError,
    RequestView,
    Script,
    TextBlock,
    ToolUseBlock,
    Turn,
    choose_script,
    load_scripts,
    text,
)

__all__ = [
    "DEFAULT_REPLY",
    "DUMMY_API_KEY",
    "RecordedRequest",
    "ScriptedModelServer",
    "SessionSummary",
    "build_message",
    "compute_usage",
    "main",
    "sse_events",
]

log = logging.getLogger(__name__)

DEFAULT_REPLY = "Nothing to do."
DUMMY_API_KEY = "sk-ant-scripted-model-server"
SESSION_HEADER = "x-claude-code-session-id"
MESSAGES_PATH = "/v1/messages"
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"
_REDACTED_HEADERS = frozenset({"x-api-key", "authorization"})
_CHARS_PER_TOKEN = 4


# --------------------------------------------------------------------------- records


@dataclass
class RecordedRequest:
    """One request the server received, and how it was answered."""

    method: str
    path: str
    """The path without the query string (``/v1/messages``)."""
    started_at: float
    """``time.time()`` once the request (line, headers and body) was read."""
    headers: dict[str, str]
    """Request headers, names lowercased, ``x-api-key`` and ``authorization`` values redacted."""
    body: bytes = b""
    ended_at: float | None = None
    """When the answer was fully sent (or the request was dropped); None while in flight."""
    session_id: str | None = None
    script: str | None = None
    """Name of the script that answered; None for unmatched conversations and other paths."""
    turn_index: int | None = None
    model: str | None = None
    status: int | None = None
    """HTTP status sent; None if the request was dropped unanswered (a hang at stop)."""
    streamed: bool = False
    error: str | None = None
    """Why the answer is not the scripted one: a failing turn factory, a lost client, a stop."""

    @property
    def json(self) -> Any:
        """The parsed request body (None if it is not JSON)."""
        try:
            return json.loads(self.body) if self.body else None
        except ValueError:
            return None

    @property
    def view(self) -> RequestView:
        """The body as a :class:`RequestView` (tools offered, prompt, tool results...)."""
        body = self.json
        return RequestView(body if isinstance(body, dict) else {}, self.session_id)

    @property
    def matched(self) -> bool:
        """Whether a script answered this request."""
        return self.script is not None


@dataclass(frozen=True)
class SessionSummary:
    """What one Claude Code session (one ``X-Claude-Code-Session-Id``) asked and got."""

    session_id: str
    script: str | None
    """The script that answered the session's first request (None: unmatched)."""
    first_started_at: float
    last_ended_at: float | None
    """None while a request of the session is still in flight."""
    requests: int
    turns_served: int
    """Successful (200) replies, i.e. turns the CLI got an answer for."""
    statuses: tuple[int | None, ...]
    models: tuple[str | None, ...]
    """The model of each request, in order: shows a switch to the fallback model."""


# --------------------------------------------------------------------------- wire format


def compute_usage(
    request_chars: int, content: Sequence[Mapping[str, Any]], override: Mapping[str, int] | None
) -> dict[str, int]:
    """Token usage for a reply: about one token per four characters, at least one each way."""
    output_chars = 0
    for block in content:
        if block.get("type") == "text":
            output_chars += len(str(block.get("text", "")))
        else:
            output_chars += len(str(block.get("name", ""))) + len(json.dumps(block.get("input")))
    usage = {
        "input_tokens": max(1, request_chars // _CHARS_PER_TOKEN),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": max(1, output_chars // _CHARS_PER_TOKEN),
    }
    usage.update(override or {})
    return usage


def build_message(turn: Turn, *, model: str | None, request_chars: int) -> dict[str, Any]:
    """The Anthropic Message object for ``turn`` (the non-streaming response body)."""
    content: list[dict[str, Any]] = []
    for block in turn.blocks:
        if isinstance(block, TextBlock):
            content.append({"type": "text", "text": block.text})
        elif isinstance(block, ToolUseBlock):
            content.append(
                {
                    "type": "tool_use",
                    "id": block.id or f"toolu_{uuid.uuid4().hex[:24]}",
                    "name": block.name,
                    "input": dict(block.input),
                }
            )
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": model or "claude-scripted",
        "content": content,
        "stop_reason": turn.stop_reason,
        "stop_sequence": None,
        "usage": compute_usage(request_chars, content, turn.usage),
    }


def _sse(event: str, data: Mapping[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def sse_events(message: Mapping[str, Any]) -> Iterator[bytes]:
    """``message`` as the event stream the Messages API sends when ``stream`` is true."""
    usage: dict[str, int] = dict(message["usage"])
    # Like the real API: input usage up front, output tokens in the closing message_delta
    # (which is where the CLI takes them from for its cost).
    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    yield _sse("message_start", {"type": "message_start", "message": start})
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            opening: dict[str, Any] = {"type": "text", "text": ""}
            delta: dict[str, Any] = {"type": "text_delta", "text": block["text"]}
        else:
            opening = {**block, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        yield _sse(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": opening},
        )
        yield _sse(
            "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        )
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
    yield _sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": usage["output_tokens"]},
        },
    )
    yield _sse("message_stop", {"type": "message_stop"})


def _error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


def _session_id(headers: Mapping[str, str], body: Mapping[str, Any]) -> str | None:
    """The CLI's session id: its header, else the one inside ``metadata.user_id``."""
    if SESSION_HEADER in headers:
        return headers[SESSION_HEADER]
    metadata = body.get("metadata")
    user_id = metadata.get("user_id") if isinstance(metadata, Mapping) else None
    if isinstance(user_id, str):
        try:
            parsed = json.loads(user_id)
        except ValueError:
            return None
        session = parsed.get("session_id") if isinstance(parsed, dict) else None
        return session if isinstance(session, str) else None
    return None


# --------------------------------------------------------------------------- server


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Sixteen CLIs opening connections at once overflow the default backlog of 5.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], owner: ScriptedModelServer) -> None:
        super().__init__(address, _Handler)
        self.owner = owner


class _DroppedError(Exception):
    """The server is stopping: abandon the request without answering."""


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # One connection per request keeps threads from idling in keep-alive reads after a test.
    def _begin(self) -> RecordedRequest:
        self.close_connection = True
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        headers = {
            name.lower(): "[redacted]" if name.lower() in _REDACTED_HEADERS else value
            for name, value in self.headers.items()
        }
        record = RecordedRequest(
            method=self.command,
            path=urlsplit(self.path).path,
            started_at=time.time(),
            headers=headers,
            body=body,
        )
        self.server.owner._add_record(record)
        return record

    def _send_json(self, record: RecordedRequest, status: int, payload: Any, **extra: str) -> None:
        data = json.dumps(payload).encode()
        record.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.send_header("request-id", f"req_{uuid.uuid4().hex[:24]}")
        for name, value in extra.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _finish(self, record: RecordedRequest) -> None:
        self.server.owner._end_record(record)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        record = self._begin()
        try:
            if record.path == "/":
                self._send_json(record, 200, {"status": "ok"})
            else:
                self._not_found(record)
        finally:
            self._finish(record)

    def do_POST(self) -> None:
        record = self._begin()
        try:
            if record.path == MESSAGES_PATH:
                self._messages(record)
            elif record.path == COUNT_TOKENS_PATH:
                tokens = max(1, len(record.body) // _CHARS_PER_TOKEN)
                self._send_json(record, 200, {"input_tokens": tokens})
            else:
                self._not_found(record)
        except _DroppedError:
            record.error = "server stopped before the reply"
        except (BrokenPipeError, ConnectionResetError) as exc:
            record.error = f"client went away: {exc.__class__.__name__}"
        finally:
            self._finish(record)

    def _not_found(self, record: RecordedRequest) -> None:
        message = f"{record.method} {record.path} is not served by the scripted model server"
        self._send_json(record, 404, _error_body("not_found_error", message))

    def _messages(self, record: RecordedRequest) -> None:
        owner = self.server.owner
        try:
            body = json.loads(record.body)
            if not isinstance(body, dict):
                raise ValueError("the body is not a JSON object")
        except ValueError as exc:
            invalid = _error_body("invalid_request_error", f"invalid JSON body: {exc}")
            self._send_json(record, 400, invalid)
            return
        record.session_id = _session_id(record.headers, body)
        view = RequestView(body, record.session_id)
        record.model, record.streamed, record.turn_index = (
            view.model,
            view.streamed,
            view.turn_index,
        )
        script = owner._choose(view)
        record.script = script.name if script else None
        try:
            turn = script.turn_at(view.turn_index, view) if script else text(owner.default_reply)
        except Exception as exc:
            # A 400 gets no backoff from the CLI (only a few immediate retries), so a broken
            # factory fails the session at once, with this message in its error result.
            log.exception("script %r turn %d failed", record.script, view.turn_index)
            record.error = f"turn factory failed: {exc!r}"
            self._send_json(record, 400, _error_body("invalid_request_error", record.error))
            return
        error = owner._next_error(record, turn)
        # Errors come at the server-wide pace; a turn's latency delays only its real reply.
        owner._wait(None if error else turn.latency_s)
        if error is not None:
            self._send_error(record, error)
        else:
            self._send_reply(record, turn, view)

    def _send_error(self, record: RecordedRequest, error: ApiError) -> None:
        extra: dict[str, str] = {}
        if error.status == 429 and error.retry_after_s is not None:
            extra["retry_after"] = f"{error.retry_after_s:g}"
        self._send_json(record, error.status, error.body(), **extra)

    def _send_reply(self, record: RecordedRequest, turn: Turn, view: RequestView) -> None:
        message = build_message(turn, model=view.model, request_chars=len(record.body))
        if not view.streamed:
            self._send_json(record, 200, message)
            return
        record.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_header("request-id", f"req_{uuid.uuid4().hex[:24]}")
        self.end_headers()
        for event in sse_events(message):
            self.wfile.write(event)
        self.wfile.flush()


class ScriptedModelServer:
    """An Anthropic Messages API answering from scripts; see the module docstring."""

    def __init__(
        self,
        scripts: Iterable[Script] = (),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_s: float = 0.0,
        default_reply: str = DEFAULT_REPLY,
    ) -> None:
        """Configure the server; ``port=0`` picks a free port at :meth:`start`."""
        self.host = host
        self.latency_s = latency_s
        self.default_reply = default_reply
        self._requested_port = port
        self._scripts: list[Script] = list(scripts)
        self._records: list[RecordedRequest] = []
        self._errors_sent: dict[tuple[str | None, str | None, int | None], int] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> Self:
        """Bind and serve in a daemon thread; returns self so ``server = X().start()`` works."""
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = _HTTPServer((self.host, self._requested_port), self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"scripted-model-server:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop held (hung or delayed) responses; returns promptly."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._httpd = self._thread = None
        # Held requests wake on the stop event; give them a moment to record how they ended.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            with self._lock:
                if all(record.ended_at is not None for record in self._records):
                    break
            time.sleep(0.01)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (only meaningful once started)."""
        if self._httpd is None:
            raise RuntimeError("the scripted model server is not running")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://host:port``, the value for ``ANTHROPIC_BASE_URL``."""
        return f"http://{self.host}:{self.port}"

    def env(
        self, *, config_dir: str | os.PathLike[str] | None = None, max_retries: int | None = None
    ) -> dict[str, str]:
        """Environment that points a Claude Code CLI at this server.

        Pass a fresh ``config_dir`` per session so no user settings or history leak in, and
        a small ``max_retries`` (``CLAUDE_CODE_MAX_RETRIES``) to keep error tests short.
        """
        env = {
            "ANTHROPIC_BASE_URL": self.base_url,
            "ANTHROPIC_API_KEY": DUMMY_API_KEY,
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        }
        if config_dir is not None:
            env["CLAUDE_CONFIG_DIR"] = os.fspath(config_dir)
        if max_retries is not None:
            env["CLAUDE_CODE_MAX_RETRIES"] = str(max_retries)
        return env

    # -- scripts and records

    def add_script(self, script: Script) -> None:
        """Register a script; earlier scripts win when several match."""
        with self._lock:
            self._scripts.append(script)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request so far, in arrival order."""
        with self._lock:
            return [replace(record, headers=dict(record.headers)) for record in self._records]

    def sessions(self) -> dict[str, SessionSummary]:
        """Messages requests grouped by the CLI's session id, in order of first request."""
        grouped: dict[str, list[RecordedRequest]] = {}
        for record in self.requests:
            if record.path == MESSAGES_PATH and record.session_id is not None:
                grouped.setdefault(record.session_id, []).append(record)
        summaries: dict[str, SessionSummary] = {}
        for session_id, records in grouped.items():
            ends = [r.ended_at for r in records]
            summaries[session_id] = SessionSummary(
                session_id=session_id,
                script=records[0].script,
                first_started_at=min(r.started_at for r in records),
                last_ended_at=None if None in ends else max(e for e in ends if e is not None),
                requests=len(records),
                turns_served=sum(1 for r in records if r.status == 200),
                statuses=tuple(r.status for r in records),
                models=tuple(r.model for r in records),
            )
        return summaries

    def wait_for_requests(self, count: int, timeout_s: float = 10.0) -> bool:
        """Wait until at least ``count`` requests have arrived; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if len(self._records) >= count:
                    return True
            time.sleep(0.01)
        return False

    def reset(self) -> None:
        """Forget recorded requests and error counts (scripts stay registered)."""
        with self._lock:
            self._records.clear()
            self._errors_sent.clear()

    # -- used by the request handler

    def _add_record(self, record: RecordedRequest) -> None:
        with self._lock:
            self._records.append(record)

    def _end_record(self, record: RecordedRequest) -> None:
        with self._lock:
            record.ended_at = time.time()

    def _choose(self, view: RequestView) -> Script | None:
        with self._lock:
            scripts = list(self._scripts)
        return choose_script(scripts, view)

    def _next_error(self, record: RecordedRequest, turn: Turn) -> ApiError | None:
        """The scripted error for this attempt at the turn, counting attempts per session."""
        errors = turn.expanded_errors()
        if not errors:
            return None
        key = (record.session_id, record.script, record.turn_index)
        with self._lock:
            attempt = self._errors_sent.get(key, 0)
            if attempt >= len(errors):
                return None
            self._errors_sent[key] = attempt + 1
        return errors[attempt]

    def _wait(self, latency_s: float | None) -> None:
        delay = self.latency_s if latency_s is None else latency_s
        if delay <= 0:
            if self._stopping.is_set():
                raise _DroppedError
            return
        if self._stopping.wait(None if math.isinf(delay) else delay):
            raise _DroppedError


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Serve scripts from JSON files until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m claudecluster.testing.model_server",
        description="Serve a scripted Anthropic Messages API for the Claude Code CLI.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback)")
    parser.add_argument("--port", type=int, default=8089, help="port to bind; 0 picks one")
    parser.add_argument(
        "--script", action="append", default=[], help="JSON file with a list of scripts"
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each reply")
    parser.add_argument("--default-reply", default=DEFAULT_REPLY, help="reply when none match")
    args = parser.parse_args(argv)
    scripts = [script for path in args.script for script in load_scripts(path)]
    server = ScriptedModelServer(
        scripts,
        host=args.host,
        port=args.port,
        latency_s=args.latency,
        default_reply=args.default_reply,
    )

    def _terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    with server:
        print(f"scripted model server on {server.base_url} ({len(scripts)} scripts)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
        served = server.requests
    print(f"stopped after {len(served)} requests", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
