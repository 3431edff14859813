"""Unit tests of the scripted model server's logic: scripts, matching, errors, usage, SSE."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest
from pydantic import ValidationError

from claudecluster.testing import (
    ApiError,
    RequestView,
    Script,
    ScriptedModelServer,
    TextBlock,
    ToolUseBlock,
    Turn,
    api_error,
    hang,
    load_scripts,
    structured,
    text,
    tool_use,
    tool_uses,
)
from claudecluster.testing.model_server import (
    RecordedRequest,
    _session_id,
    build_message,
    compute_usage,
    sse_events,
)
from claudecluster.testing.script import choose_script


def user(*texts: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": t} for t in texts]}


def assistant(name: str = "Bash") -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": name}]}


def tool_result(content: str, *, is_error: bool = False) -> dict[str, Any]:
    block = {"type": "tool_result", "tool_use_id": "t1", "content": content, "is_error": is_error}
    return {"role": "user", "content": [block]}


def view(*messages: dict[str, Any], **body: Any) -> RequestView:
    return RequestView({"model": "claude-sonnet-4-5", "messages": list(messages), **body}, "s1")


class TestBuilders:
    """The builders produce turns with the right blocks and stop reasons."""

    def test_text_ends_the_turn(self) -> None:
        turn = text("hi", latency_s=0.5, usage={"output_tokens": 9})
        assert turn.blocks == (TextBlock("hi"),)
        assert turn.stop_reason == "end_turn"
        assert (turn.latency_s, turn.usage) == (0.5, {"output_tokens": 9})

    def test_tool_use_with_preamble(self) -> None:
        turn = tool_use("Bash", {"command": "ls"}, preamble="Listing.")
        assert turn.blocks == (TextBlock("Listing."), ToolUseBlock("Bash", {"command": "ls"}))
        assert turn.stop_reason == "tool_use"

    def test_tool_uses_holds_every_call(self) -> None:
        turn = tool_uses([("Read", {"file_path": "a"}), ("Read", {"file_path": "b"})])
        assert [b.input for b in turn.blocks if isinstance(b, ToolUseBlock)] == [
            {"file_path": "a"},
            {"file_path": "b"},
        ]
        with pytest.raises(ValueError, match="at least one"):
            tool_uses([])

    def test_structured_calls_the_structured_output_tool(self) -> None:
        (block,) = structured({"ok": True}).blocks
        assert block == ToolUseBlock("StructuredOutput", {"ok": True})

    def test_hang_waits_forever_or_for_seconds(self) -> None:
        assert hang().latency_s == math.inf
        assert hang().blocks == (TextBlock("Done."),)
        slow = hang(2.0, then=text("late"))
        assert (slow.latency_s, slow.blocks) == (2.0, (TextBlock("late"),))

    def test_api_error_validates_and_describes_itself(self) -> None:
        assert api_error(429).body()["error"]["type"] == "rate_limit_error"
        assert api_error(529).error_type == "overloaded_error"
        assert api_error(503).error_type == "api_error"
        assert api_error(418).error_type == "invalid_request_error"
        assert api_error(500, message="boom").body() == {
            "type": "error",
            "error": {"type": "api_error", "message": "boom"},
        }
        with pytest.raises(ValueError, match="times"):
            api_error(429, times=0)
        with pytest.raises(ValueError, match="status"):
            api_error(200)


class TestScriptTurns:
    """Turn selection, error folding and the reply past the end of a script."""

    def test_turn_index_counts_assistant_messages(self) -> None:
        assert view(user("go")).turn_index == 0
        assert view(user("go"), assistant(), tool_result("ok")).turn_index == 1
        assert view(user("go"), assistant(), tool_result("a"), assistant()).turn_index == 2

    def test_turns_are_served_in_order_then_done(self) -> None:
        script = Script(name="s", match="M", turns=[tool_use("Bash", {}), text("end")])
        v = view(user("M"))
        assert script.turn_at(0, v).stop_reason == "tool_use"
        assert script.turn_at(1, v) == text("end")
        assert script.turn_at(2, v) == text("Done.")
        assert Script(name="s", match="M", final_text="Bye.").turn_at(0, v) == text("Bye.")

    def test_api_errors_fold_into_the_next_turn(self) -> None:
        script = Script(
            name="s",
            match="M",
            turns=[
                api_error(429, times=2),
                api_error(529),
                text("first"),
                text("second"),
                api_error(500),
            ],
        )
        v = view(user("M"))
        assert len(script) == 3  # error entries are not turns; the trailing one gets "Done."
        first = script.turn_at(0, v)
        assert first.blocks == (TextBlock("first"),)
        assert [e.status for e in first.expanded_errors()] == [429, 429, 529]
        assert script.turn_at(1, v).errors == ()
        last = script.turn_at(2, v)
        assert (last.blocks, [e.status for e in last.expanded_errors()]) == (
            (TextBlock("Done."),),
            [500],
        )

    def test_errors_as_a_turn_attribute_combine_with_folded_ones(self) -> None:
        own = Turn(blocks=(TextBlock("x"),), errors=(ApiError(529),))
        script = Script(name="s", match="M", turns=[api_error(429), own])
        statuses = [e.status for e in script.turn_at(0, view(user("M"))).expanded_errors()]
        assert statuses == [429, 529]

    def test_factory_sees_the_request(self) -> None:
        def reply(v: RequestView) -> Turn:
            (result,) = v.tool_results()
            return text(f"{v.model}: {result.content}")

        script = Script(name="s", match="M", turns=[tool_use("Bash", {}), api_error(429), reply])
        turn = script.turn_at(1, view(user("M"), assistant(), tool_result("42")))
        assert turn.blocks == (TextBlock("claude-sonnet-4-5: 42"),)
        assert [e.status for e in turn.errors] == [429]

    def test_factory_must_return_a_turn(self) -> None:
        script = Script(name="s", match="M", turns=[lambda v: "not a turn"])  # type: ignore[list-item, return-value]
        with pytest.raises(TypeError, match="factory returned"):
            script.turn_at(0, view(user("M")))

    def test_unknown_entries_are_rejected(self) -> None:
        with pytest.raises(TypeError, match="not a turn entry"):
            Script(name="s", match="M", turns=["text"])  # type: ignore[list-item]


class TestMatching:
    """A conversation is matched on its prompt first, then on any first-message text."""

    def test_prompt_is_the_last_text_block_of_the_first_user_message(self) -> None:
        v = view(user("<system-reminder>env</system-reminder>", "do it"), assistant(), user("x"))
        assert v.prompt == "do it"
        assert v.first_user_text == "<system-reminder>env</system-reminder>\ndo it"
        assert view({"role": "user", "content": "plain string"}).prompt == "plain string"
        assert view().prompt == ""

    def test_first_registered_match_wins(self) -> None:
        scripts = [Script(name="a", match="MARK"), Script(name="b", match="MARK")]
        chosen = choose_script(scripts, view(user("MARK")))
        assert chosen is not None
        assert chosen.name == "a"

    def test_prompt_match_beats_an_earlier_reminder_match(self) -> None:
        scripts = [Script(name="env", match="Platform"), Script(name="task", match="TASK-1")]
        v = view(user("<system-reminder>Platform: linux</system-reminder>", "TASK-1 now"))
        chosen = choose_script(scripts, v)
        assert chosen is not None
        assert chosen.name == "task"
        fallback = choose_script(scripts, view(user("Platform: linux", "hello")))
        assert fallback is not None
        assert fallback.name == "env"

    def test_regex_and_no_match(self) -> None:
        scripts = [Script(name="w3", match=re.compile(r"\bWORKER-3\b"))]
        assert choose_script(scripts, view(user("WORKER-3 go"))) is not None
        assert choose_script(scripts, view(user("WORKER-33 go"))) is None

    def test_tool_results_drop_the_cli_reminder(self) -> None:
        reminder = (
            "hi\n\n<system-reminder>\n<total_tokens>9 left</total_tokens>\n</system-reminder>"
        )
        v = view(user("go"), assistant(), tool_result(reminder, is_error=True))
        (result,) = v.tool_results()
        assert (result.tool_use_id, result.content, result.is_error) == ("t1", "hi", True)
        assert result.raw_content == reminder
        assert view(user("go")).tool_results() == []

    def test_request_fields(self) -> None:
        v = view(user("go"), stream=True, tools=[{"name": "Bash"}, {"name": "StructuredOutput"}])
        assert (v.model, v.streamed, v.tool_names) == (
            "claude-sonnet-4-5",
            True,
            ["Bash", "StructuredOutput"],
        )


class TestErrorCounting:
    """Scripted errors are counted per session and turn, as the CLI retries the same request."""

    def record(self, session: str | None, turn: int = 0) -> RecordedRequest:
        return RecordedRequest(
            method="POST",
            path="/v1/messages",
            started_at=0.0,
            headers={},
            session_id=session,
            script="s",
            turn_index=turn,
        )

    def test_errors_then_reply_per_session(self) -> None:
        server = ScriptedModelServer()
        turn = Turn(blocks=(TextBlock("ok"),), errors=(ApiError(429, times=2), ApiError(529)))

        def attempts(session: str, n: int, turn_index: int = 0) -> list[int | None]:
            record = self.record(session, turn_index)
            return [getattr(server._next_error(record, turn), "status", None) for _ in range(n)]

        assert attempts("a", 5) == [429, 429, 529, None, None]
        assert attempts("b", 2) == [429, 429]  # another session starts its own count
        assert attempts("a", 1, turn_index=1) == [429]  # so does another turn
        server.reset()
        assert attempts("a", 1) == [429]

    def test_turns_without_errors_never_fail(self) -> None:
        assert ScriptedModelServer()._next_error(self.record("a"), text("ok")) is None


class TestWireFormat:
    """Usage, messages and the SSE stream look like the real Messages API."""

    def test_usage_is_chars_over_four_with_overrides(self) -> None:
        content = [{"type": "text", "text": "x" * 40}]
        assert compute_usage(400, content, None) == {
            "input_tokens": 100,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 10,
        }
        assert compute_usage(0, [], None)["input_tokens"] == 1
        assert compute_usage(0, [], None)["output_tokens"] == 1
        call = [{"type": "tool_use", "name": "Bash", "input": {"command": "x" * 100}}]
        assert (
            compute_usage(8, call, None)["output_tokens"] == (4 + len('{"command": ""}') + 100) // 4
        )
        assert compute_usage(8, content, {"output_tokens": 500_000})["output_tokens"] == 500_000

    def test_build_message(self) -> None:
        turn = tool_uses([("Read", {"file_path": "a"}), ("Read", {"file_path": "b"})])
        message = build_message(turn, model="claude-opus-4-1", request_chars=4000)
        assert message["model"] == "claude-opus-4-1"
        assert message["stop_reason"] == "tool_use"
        assert message["usage"]["input_tokens"] == 1000
        ids = [block["id"] for block in message["content"]]
        assert all(i.startswith("toolu_") for i in ids)
        assert len(set(ids)) == 2
        fixed = build_message(tool_use("X", {}, id="toolu_fixed"), model=None, request_chars=1)
        assert fixed["content"][0]["id"] == "toolu_fixed"

    def test_sse_stream_rebuilds_the_message(self) -> None:
        turn = tool_use("Write", {"file_path": "a", "content": "b"}, preamble="Writing.")
        message = build_message(turn, model="m", request_chars=100)
        events = [parse_event(chunk) for chunk in sse_events(message)]

        names = [name for name, _ in events]
        assert names[0] == "message_start"
        assert names[-2:] == ["message_delta", "message_stop"]
        assert names.count("content_block_start") == 2
        assert all(name == data["type"] for name, data in events)
        assert rebuild(events) == message

    def test_session_id_from_header_or_metadata(self) -> None:
        assert _session_id({"x-claude-code-session-id": "h"}, {}) == "h"
        metadata = {"metadata": {"user_id": json.dumps({"session_id": "m"})}}
        assert _session_id({}, metadata) == "m"
        assert _session_id({}, {"metadata": {"user_id": "not json"}}) is None
        assert _session_id({}, {}) is None


def parse_event(chunk: bytes) -> tuple[str, dict[str, Any]]:
    """One ``event: NAME\\ndata: JSON\\n\\n`` chunk."""
    text_ = chunk.decode()
    assert text_.endswith("\n\n")
    event_line, data_line = text_.strip("\n").split("\n")
    assert event_line.startswith("event: ")
    assert data_line.startswith("data: ")
    return event_line.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))


def rebuild(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Fold a stream back into a Message, the way an SDK client does."""
    message: dict[str, Any] = {}
    partial: dict[int, str] = {}
    for name, data in events:
        if name == "message_start":
            message = dict(data["message"])
            message["content"] = []
        elif name == "content_block_start":
            message["content"].append(dict(data["content_block"]))
        elif name == "content_block_delta":
            block, delta = message["content"][data["index"]], data["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            else:
                partial[data["index"]] = partial.get(data["index"], "") + delta["partial_json"]
        elif name == "content_block_stop" and data["index"] in partial:
            message["content"][data["index"]]["input"] = json.loads(partial[data["index"]])
        elif name == "message_delta":
            message.update(data["delta"])
            message["usage"] = {**message["usage"], **data["usage"]}
    return message


class TestSessionsSummary:
    """sessions() groups messages requests by the CLI's session id."""

    def test_summary(self) -> None:
        server = ScriptedModelServer()
        for started, status, model in [(1.0, 429, "a"), (2.0, 200, "b"), (3.0, 200, "b")]:
            server._add_record(
                RecordedRequest(
                    method="POST",
                    path="/v1/messages",
                    started_at=started,
                    ended_at=started + 0.5,
                    headers={},
                    session_id="s1",
                    script="sc",
                    status=status,
                    model=model,
                )
            )
        server._add_record(
            RecordedRequest(method="GET", path="/", started_at=4.0, headers={}, status=200)
        )
        (summary,) = server.sessions().values()
        assert summary.session_id == "s1"
        assert summary.script == "sc"
        assert (summary.first_started_at, summary.last_ended_at) == (1.0, 3.5)
        assert (summary.requests, summary.turns_served) == (3, 2)
        assert summary.statuses == (429, 200, 200)
        assert summary.models == ("a", "b", "b")

    def test_recorded_body_helpers(self) -> None:
        body = json.dumps({"model": "m", "messages": [user("hi")]}).encode()
        record = RecordedRequest(
            method="POST", path="/v1/messages", started_at=0, headers={}, body=body
        )
        assert record.json["model"] == "m"
        assert record.view.prompt == "hi"
        assert not record.matched
        broken = RecordedRequest(method="POST", path="/", started_at=0, headers={}, body=b"{")
        assert broken.json is None
        assert broken.view.messages == []


class TestJsonScripts:
    """Scripts load from the JSON form the standalone server reads."""

    def test_every_entry_kind(self) -> None:
        (script,) = load_scripts(
            [
                {
                    "name": "all",
                    "match": "ALL",
                    "turns": [
                        {"tool_use": {"name": "Write", "input": {"file_path": "a"}}},
                        {"error": 429, "times": 2},
                        {"tool_uses": [{"name": "Read"}, {"name": "Read"}], "latency_s": 0.1},
                        {"structured": {"x": 1}},
                        {"hang": 1.5},
                        {"hang": True},
                        {"text": "bye", "usage": {"output_tokens": 7}},
                    ],
                    "final_text": "Over.",
                }
            ]
        )
        v = view(user("ALL"))
        turns = [script.turn_at(i, v) for i in range(len(script) + 1)]
        assert turns[0].blocks == (ToolUseBlock("Write", {"file_path": "a"}),)
        assert [e.status for e in turns[1].expanded_errors()] == [429, 429]
        assert (len(turns[1].blocks), turns[1].latency_s) == (2, 0.1)
        assert turns[2] == structured({"x": 1})
        assert (turns[3].latency_s, turns[4].latency_s) == (1.5, math.inf)
        assert turns[5] == text("bye", usage={"output_tokens": 7})
        assert turns[6] == text("Over.")

    def test_regex_match_and_file(self, tmp_path: Any) -> None:
        path = tmp_path / "scripts.json"
        path.write_text(json.dumps([{"name": "r", "match_regex": "^GO\\b", "turns": []}]))
        (script,) = load_scripts(path)
        assert script.matches("GO now")
        assert not script.matches("NO GO")

    @pytest.mark.parametrize(
        "entry",
        [{}, {"text": "a", "error": 429}, {"text": "a", "bogus": 1}, {"error": 429, "times": 0}],
    )
    def test_bad_entries_are_rejected(self, entry: dict[str, Any]) -> None:
        with pytest.raises(ValidationError):
            load_scripts([{"name": "bad", "match": "X", "turns": [entry]}])

    def test_a_script_needs_one_match(self) -> None:
        with pytest.raises(ValueError, match="exactly one of match"):
            load_scripts([{"name": "none", "turns": []}])
        with pytest.raises(ValueError, match="JSON list"):
            load_scripts({"name": "x"})  # type: ignore[arg-type]
