"""The Response object and its events from a stream's events (app/http/responses_format.py), and
the request's items (app/http/responses_schemas.py): pure, no server."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from actors.messages import StreamDone, StreamError, StreamToken, Timings, Usage
from app.batching.finish import FinishReason
from app.http.responses_format import ResponseHead, ResponseWriter
from app.http.responses_schemas import ResponsesRequest, chat_messages
from app.prompts.builder import ChatMessage, pending_reasoning

TIMINGS = Timings(queue_ms=0.0, prefill_ms=1.0, ttft_ms=1.0, e2e_ms=2.0)


def writer(cached: bool = False) -> ResponseWriter:
    return ResponseWriter(ResponseHead("resp_" + "a" * 32, 1, "m", {"store": True}, input_tokens=10, cached=cached))


def run(tokens: list[tuple[str, str | None]], finish: FinishReason) -> tuple[ResponseWriter, list[dict[str, Any]]]:
    out = writer()
    events = out.opening()
    for index, (text, channel) in enumerate(tokens):
        events += out.token(StreamToken(text, 1, index, channel))
    events += out.done(StreamDone("r", finish, Usage(10, len(tokens)), TIMINGS))
    return out, events + out.closing()


def test_analysis_then_final_is_a_reasoning_item_then_a_message() -> None:
    tokens = [("Think", "analysis"), ("", "analysis"), ("ing.", "analysis"), ("", None), ("Hi", "final")]
    out, events = run(tokens, "stop")
    body = out.response()
    assert body["status"] == "completed" and body["incomplete_details"] is None and body["error"] is None
    reasoning, message = body["output"]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Thinking."}]
    assert message["content"][0]["text"] == "Hi" and message["status"] == "completed"
    assert body["usage"]["output_tokens_details"]["reasoning_tokens"] == 3
    assert body["usage"]["total_tokens"] == 15
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[0]["response"]["output"] == [] and events[0]["response"]["usage"] is None


def test_the_length_limit_is_incomplete_and_so_is_the_open_item() -> None:
    out, events = run([("a", None), ("b", None)], "length")
    assert out.status == "incomplete" and out.response()["incomplete_details"] == {"reason": "max_output_tokens"}
    assert out.response()["output"][0]["status"] == "incomplete"
    assert events[-1]["type"] == "response.incomplete"


def test_a_stream_error_is_failed_with_its_code() -> None:
    out = writer()
    out.opening()
    out.token(StreamToken("a", 1, 0))
    events = out.error(StreamError("r", "step_failed")) + out.closing()
    body = out.response()
    assert body["status"] == "failed" and body["error"]["code"] == "step_failed" and body["error"]["message"]
    assert events[-1]["type"] == "response.failed"


def test_a_shutdown_is_cancelled_and_a_cache_hit_counts_its_input_as_cached() -> None:
    out, events = run([("a", None)], "shutdown")
    assert out.status == "cancelled" and events[-1]["type"] == "response.failed"
    hit = writer(cached=True)
    assert hit.usage()["input_tokens_details"]["cached_tokens"] == 10


def test_items_become_messages_and_reasoning_stays_out_of_the_prompt() -> None:
    body = ResponsesRequest.model_validate(
        {
            "input": [
                {"role": "system", "content": "Be kind."},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                {"type": "reasoning", "id": "rs_1", "content": [{"type": "reasoning_text", "text": "x"}]},
                {"role": "assistant", "content": [{"type": "output_text", "text": "Hello", "annotations": []}]},
                {"role": "user", "content": "Bye"},
            ]
        }
    )
    items = body.input_items()
    assert [item["type"] for item in items] == ["message", "message", "reasoning", "message", "message"]
    assert all(item["id"] for item in items) and items[2]["id"] == "rs_1"
    assert chat_messages(items) == (
        ChatMessage("system", "Be kind."),
        ChatMessage("user", "Hi"),
        ChatMessage("assistant", "Hello", reasoning="x"),  # it goes with the answer it led to
        ChatMessage("user", "Bye"),
    )
    # An answered turn's reasoning never reaches the prompt (only a pending call's would).
    assert pending_reasoning(chat_messages(items)) == frozenset()


@pytest.mark.parametrize(
    "body",
    [
        {"input": "x", "tools": [{"type": "teleport"}]},  # no tool type of OpenAI's
        {"input": "x", "tool_choice": {"type": "function", "name": "f"}},  # names no tool
        {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},  # no call_id
        {"input": [{"type": "function_call_output", "call_id": "c", "output": 3}]},
        {"input": [{"role": "tool", "content": "x"}]},
        {"input": [{"type": "item_reference", "id": "msg_1"}]},
        {"input": [{"type": "reasoning", "content": [{"type": "summary_text", "text": "x"}]}]},
        {"input": "x", "metadata": {str(n): "v" for n in range(17)}},
        {"input": "x", "previous_response_id": "resp_" + "A" * 32},
    ],
)
def test_refused_bodies(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ResponsesRequest.model_validate(body)


def json_call(
    texts: list[str], finish: FinishReason, *, streaming: bool
) -> tuple[dict[str, Any], list[str], list[str]]:
    """A forced call on a model without Harmony: the body, the argument deltas, the reports."""
    reports: list[str] = []
    head = ResponseHead("resp_" + "a" * 32, 1, "m", {}, input_tokens=10, cached=False)
    out = ResponseWriter(head, frozenset({"get_time"}), reports.append, streaming=streaming, json_call=True)
    events = out.opening()
    for index, text in enumerate(texts):
        events += out.token(StreamToken(text, 1, index, None))
    events += out.done(StreamDone("r", finish, Usage(10, len(texts)), TIMINGS))
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    return out.response(), deltas, reports


WHOLE = ['{"name": "get', '_time", "argu', 'ments": {"zo', 'ne": "UTC"}', "}"]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_json_call_is_a_function_call_item_streamed_but_for_its_closing_brace(streaming: bool) -> None:
    body, deltas, reports = json_call(WHOLE, "stop", streaming=streaming)
    [call] = body["output"]
    assert call["type"] == "function_call" and call["name"] == "get_time" and call["status"] == "completed"
    assert call["arguments"] == '{"zone": "UTC"}' == "".join(deltas) and not reports


def test_a_json_call_cut_short_is_message_text_or_an_incomplete_item_and_counted() -> None:
    body, _, reports = json_call(WHOLE[:3], "length", streaming=False)
    [message] = body["output"]
    assert message["type"] == "message" and message["content"][0]["text"] == "".join(WHOLE[:3])
    assert message["status"] == "incomplete"
    assert reports == ["invalid_arguments"] and body["status"] == "incomplete"
    body, deltas, reports = json_call(WHOLE[:3], "length", streaming=True)
    [call] = body["output"]
    assert call["type"] == "function_call" and call["status"] == "incomplete" and call["arguments"] == "".join(deltas)
    assert reports == ["invalid_arguments"]


def test_a_json_answer_that_names_no_function_is_message_text_and_counted() -> None:
    body, deltas, reports = json_call(['{"na', "me"], "length", streaming=True)
    [message] = body["output"]
    assert message["type"] == "message" and message["content"][0]["text"] == '{"name' and not deltas
    assert reports == ["invalid_arguments"]
