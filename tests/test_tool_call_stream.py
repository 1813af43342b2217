"""gpt-oss's tool calls, scripted as Harmony token streams, through the real relay and text layer
into OpenAI's shapes: the whole message's ``tool_calls`` and the streamed ``delta.tool_calls``."""

from __future__ import annotations

import json
import re
from typing import Any

import trio

from actors.messages import (
    Admitted,
    Finished,
    Queued,
    SchedulerEvent,
    StreamDone,
    StreamEvent,
    StreamToken,
    TokenOut,
)
from actors.relay import TokenRelay
from app.http.openai_format import ChunkWriter, ResponseMeta, full_response
from app.prompts.harmony_encoding import harmony_encoding
from app.text.harmony_text import HarmonyTokenText

CALL, RETURN = 200012, 200002
STOPS = frozenset({CALL, RETURN})
NAMES = frozenset({"get_weather", "get_time"})
CALL_ID = re.compile(r"call_[0-9a-f]{24}")
ANALYSIS = "<|channel|>analysis<|message|>The user wants the weather. I will call it.<|end|><|start|>assistant"
WEATHER_CALL = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>'
# The recipient may come before the channel, as Harmony renders calls going back in.
RECIPIENT_FIRST = ' to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{"city":"Oslo"}<|call|>'


def encode(text: str) -> list[int]:
    return list(harmony_encoding().encode(text, allowed_special="all"))


def char_by_char(text: str) -> list[int]:
    """Each character its own token: arguments split across as many tokens as they have characters."""
    return [token for ch in text for token in encode(ch)]


def decode(ids: Any) -> str:
    return str(harmony_encoding().decode(list(ids)))


def scheduler_events(tokens: list[int], finish: str, *, stops: frozenset[int]) -> list[SchedulerEvent]:
    events: list[SchedulerEvent] = [Queued("r1", 0.1), Admitted("r1", 0.2)]
    for i, token in enumerate(tokens):
        last = i == len(tokens) - 1
        ends = finish if last else None
        events.append(TokenOut("r1", token, i, 0.3 + i, ends, is_stop_token=last and token in stops))  # type: ignore[arg-type]
    events.append(Finished("r1", finish, 3, len(tokens), 0.3 + len(tokens)))  # type: ignore[arg-type]
    return events


async def relayed(
    tokens: list[int],
    finish: str = "stop",
    *,
    stops: frozenset[int] = STOPS,
    read: int | None = None,
    single_call: bool = False,
    aborts: list[str] | None = None,
) -> list[StreamEvent]:
    """The relay's events for a scripted output; ``read``: the reader leaves after that many."""
    to_relay, relay_in = trio.open_memory_channel[SchedulerEvent](len(tokens) + 10)
    relay_out, from_relay = trio.open_memory_channel[StreamEvent](0)
    relay = TokenRelay(
        "r1",
        0.0,
        3,
        relay_in,
        relay_out,
        HarmonyTokenText(decode),
        ("Paris",),  # a stop string in the arguments: it must not cut a call
        lambda rid, why: None if aborts is None else aborts.append(why),
        token_bytes=lambda token: decode([token]).encode(),
        stop_applies_to=lambda channel: channel != "analysis",
        single_call=single_call,
    )
    out: list[StreamEvent] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.run)
        for scheduled in scheduler_events(tokens, finish, stops=stops):
            to_relay.send_nowait(scheduled)
        to_relay.close()
        async with from_relay:
            async for event in from_relay:
                out.append(event)
                if read is not None and len(out) == read:
                    break
    return out


def meta(reports: list[str]) -> ResponseMeta:
    fields = ("chatcmpl-1", 0, "tiny", 3, "pb-1", "key", False, True)
    return ResponseMeta(*fields, tool_names=NAMES, report_malformed=reports.append)


def split(events: list[StreamEvent]) -> tuple[list[StreamToken], StreamDone]:
    tokens = [e for e in events if isinstance(e, StreamToken)]
    done = events[-1]
    assert isinstance(done, StreamDone)
    return tokens, done


async def whole(tokens: list[int], finish: str = "stop") -> tuple[dict[str, Any], list[str]]:
    reports: list[str] = []
    streamed, done = split(await relayed(tokens, finish))
    return full_response("chat", meta(reports), [(0, streamed, done)])["choices"][0], reports


async def chunks(tokens: list[int], finish: str = "stop") -> tuple[list[dict[str, Any]], list[str]]:
    reports: list[str] = []
    writer = ChunkWriter("chat", meta(reports), include_usage=False, continuous_usage=False)
    streamed, done = split(await relayed(tokens, finish))
    out = [c for t in streamed for c in writer.token(t)] + writer.closing(done)
    return [c["choices"][0] for c in out], reports


async def test_a_call_after_reasoning_is_a_tool_call_with_its_own_id() -> None:
    choice, reports = await whole(encode(ANALYSIS + WEATHER_CALL))
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls"
    assert message["content"] is None
    assert message["reasoning"] == "The user wants the weather. I will call it."
    [call] = message["tool_calls"]
    assert CALL_ID.fullmatch(call["id"])
    assert call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert reports == []
    again, _ = await whole(encode(ANALYSIS + WEATHER_CALL))
    assert again["message"]["tool_calls"][0]["id"] != call["id"]  # fresh per response


async def test_the_recipient_may_come_before_the_channel() -> None:
    choice, _ = await whole(encode(ANALYSIS + RECIPIENT_FIRST))
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Oslo"}'}


async def test_two_calls_in_a_row_stay_two_calls() -> None:
    first = WEATHER_CALL.replace("<|call|>", "<|end|><|start|>assistant")
    second = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Rome"}<|call|>'
    tokens = encode(ANALYSIS + first + second)
    choice, _ = await whole(tokens)
    cities = [json.loads(c["function"]["arguments"])["city"] for c in choice["message"]["tool_calls"]]
    assert cities == ["Paris", "Rome"]
    deltas, _ = await chunks(tokens)
    opened = [d["delta"]["tool_calls"][0] for d in deltas if "id" in d["delta"].get("tool_calls", [{}])[0]]
    assert [o["index"] for o in opened] == [0, 1] and opened[0]["id"] != opened[1]["id"]


async def test_parallel_tool_calls_false_ends_the_output_where_a_second_call_would_begin() -> None:
    first = WEATHER_CALL.replace("<|call|>", "<|end|><|start|>assistant")
    second = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Rome"}<|call|>'
    aborts: list[str] = []
    streamed, done = split(await relayed(encode(ANALYSIS + first + second), single_call=True, aborts=aborts))
    assert aborts == ["single_call"] and done.finish_reason == "stop"
    reports: list[str] = []
    choice = full_response("chat", meta(reports), [(0, streamed, done)])["choices"][0]
    assert [c["function"]["arguments"] for c in choice["message"]["tool_calls"]] == ['{"city":"Paris"}']
    assert choice["finish_reason"] == "tool_calls" and not reports
    # One call and nothing after it: the same output as with parallel calls allowed.
    alone, _ = split(await relayed(encode(ANALYSIS + WEATHER_CALL), single_call=True, aborts=aborts))
    assert aborts == ["single_call"] and "".join(t.text for t in alone).endswith('{"city":"Paris"}')


async def test_streamed_arguments_arrive_as_fragments_after_an_opening_with_the_name() -> None:
    header = "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
    arguments = '{"city":"Paris","unit":"celsius"}'
    tokens = encode(ANALYSIS + header) + char_by_char(arguments) + [CALL]
    deltas, reports = await chunks(tokens)
    calls = [d["delta"]["tool_calls"][0] for d in deltas if "tool_calls" in d["delta"]]
    opening = calls[0]
    assert opening["index"] == 0 and CALL_ID.fullmatch(opening["id"]) and opening["type"] == "function"
    assert opening["function"] == {"name": "get_weather", "arguments": ""}
    fragments = [c["function"]["arguments"] for c in calls[1:]]
    assert len(fragments) == len(arguments) and "".join(fragments) == arguments  # one per token, never held
    assert all(set(c) == {"index", "function"} and c["index"] == 0 for c in calls[1:])
    assert not any(d["delta"].get("content") for d in deltas)
    assert deltas[-1]["finish_reason"] == "tool_calls" and reports == []


async def test_a_call_to_an_unknown_function_is_content_and_counted() -> None:
    unknown = WEATHER_CALL.replace("get_weather", "launch_rocket")
    choice, reports = await whole(encode(ANALYSIS + unknown))
    assert "tool_calls" not in choice["message"]
    assert choice["message"]["content"] == '{"city":"Paris"}'
    assert choice["finish_reason"] == "stop" and reports == ["unknown_function"]
    deltas, reports = await chunks(encode(ANALYSIS + unknown))
    assert "".join(d["delta"].get("content") or "" for d in deltas) == '{"city":"Paris"}'
    assert not any("tool_calls" in d["delta"] for d in deltas)
    assert deltas[-1]["finish_reason"] == "stop" and reports == ["unknown_function"]


async def test_arguments_that_are_not_json_are_content_and_counted() -> None:
    broken = WEATHER_CALL.replace('{"city":"Paris"}', '{"city": Paris')
    choice, reports = await whole(encode(ANALYSIS + broken))
    assert "tool_calls" not in choice["message"] and choice["message"]["content"] == '{"city": Paris'
    assert choice["finish_reason"] == "stop" and reports == ["invalid_arguments"]
    deltas, reports = await chunks(encode(ANALYSIS + broken))
    assert deltas[-1]["finish_reason"] == "stop" and reports == ["invalid_arguments"]  # fragments went out already


async def test_a_call_cut_by_max_tokens_is_content_with_finish_reason_length() -> None:
    cut = encode(ANALYSIS + WEATHER_CALL)[:-3]
    choice, reports = await whole(cut, "length")
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"].startswith('{"') and reports == ["invalid_arguments"]


async def test_a_reader_gone_mid_call_ends_the_relay_quietly() -> None:
    tokens = encode(ANALYSIS) + encode(WEATHER_CALL)
    events = await relayed(tokens, read=len(encode(ANALYSIS)) + 14)  # the reader leaves inside the arguments
    assert not any(isinstance(e, StreamDone) for e in events)
    assert [e.recipient for e in events if isinstance(e, StreamToken)][-1] == "functions.get_weather"
    # what the client had was an opening and fragments, nothing shown as content
    reports: list[str] = []
    writer = ChunkWriter("chat", meta(reports), include_usage=False, continuous_usage=False)
    deltas = [c["choices"][0]["delta"] for e in events if isinstance(e, StreamToken) for c in writer.token(e)]
    assert not any(d.get("content") for d in deltas) and any("tool_calls" in d for d in deltas)
