"""Tool calls in a chat template's own syntax (app.text.template_calls), read from text as it
comes, and their OpenAI shapes (app.http.tool_calls' TemplateCallStream). Pure: no model."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from app.http.tool_calls import TemplateCallStream, template_answer
from app.text.template_calls import (
    CallArguments,
    CallEnded,
    CallOpened,
    CallParser,
    CallSyntax,
    Event,
    Words,
    read_answer,
    syntax_for,
)

NAMES = frozenset({"get_weather", "get_time"})
CALL_ID = re.compile(r"call_[0-9a-f]{24}")
HERMES_TEMPLATE = Path(__file__).parent / "data" / "hermes_tools.jinja"
WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'


def parsed(pieces: list[str], syntax: CallSyntax = "hermes") -> tuple[list[Event], list[str]]:
    reports: list[str] = []
    parser = CallParser(syntax, NAMES, reports.append)
    events = [event for piece in pieces for event in parser.feed(piece)] + parser.finish()
    return events, reports


def read(text: str, syntax: CallSyntax = "hermes") -> tuple[str, list[tuple[str, Any]], list[str]]:
    reports: list[str] = []
    answer = read_answer(text, syntax, NAMES, reports.append)
    return answer.words, [(c.name, json.loads(c.arguments)) for c in answer.calls], reports


def words_of(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, Words))


def test_the_syntax_is_the_one_the_template_teaches_or_the_operators() -> None:
    assert syntax_for(HERMES_TEMPLATE.read_text()) == "hermes"
    llama = '{% if tools %}<|start_header_id|>ipython... {"name": function name, "parameters": dict}{% endif %}'
    assert syntax_for(llama) == "llama3_json"
    chatml = "{% for message in messages %}<|im_start|>{{ message['content'] }}{% endfor %}"
    assert syntax_for(chatml) is None  # no tools: tool_choice auto stays refused
    assert syntax_for("{{ tools }} but no call syntax") is None
    assert syntax_for(None) is None
    assert syntax_for(chatml, "hermes") == "hermes" and syntax_for(HERMES_TEMPLATE.read_text(), "none") is None


def test_a_call_is_read_with_its_name_and_arguments() -> None:
    assert read(WEATHER) == ("", [("get_weather", {"city": "Paris", "days": 2})], [])


def test_two_calls_are_two_calls_and_the_words_before_them_are_content() -> None:
    words, calls, reports = read("Let me look that up.\n" + WEATHER + "\n" + TIME + "\n")
    assert words == "Let me look that up."
    assert calls == [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {"zone": "UTC"})]
    assert reports == []


def test_arguments_split_into_tiny_pieces_stream_as_they_come() -> None:
    events, reports = parsed(list("Sure. " + WEATHER))
    assert reports == [] and words_of(events) == "Sure."
    opened = [e for e in events if isinstance(e, CallOpened)]
    fragments = [e.text for e in events if isinstance(e, CallArguments)]
    assert opened == [CallOpened(0, "get_weather")]
    assert "".join(fragments) == '{"city": "Paris", "days": 2}'
    assert len(fragments) == len('{"city": "Paris", "days": 2}')  # one per character: nothing held to the end
    assert isinstance(events[-1], CallEnded) and events[-1].valid  # it closes after its last fragment


def test_arguments_that_are_not_json_are_malformed_and_become_content() -> None:
    broken = WEATHER.replace('"Paris"', "Paris")
    words, calls, reports = read("Checking. " + broken)
    assert calls == [] and reports == ["invalid_arguments"]
    assert words == "Checking." + broken


def test_arguments_that_are_not_an_object_are_malformed() -> None:
    text = '<tool_call>\n{"name": "get_time", "arguments": "UTC"}\n</tool_call>'
    assert read(text) == (text, [], ["invalid_arguments"])


def test_an_unknown_function_is_content_from_its_head_on_and_counted() -> None:
    rocket = WEATHER.replace("get_weather", "launch_rocket")
    events, reports = parsed(list(rocket + " then " + TIME))
    assert reports == ["unknown_function"]
    assert words_of(events).startswith(rocket + " then")
    assert [e for e in events if isinstance(e, CallOpened)] == [CallOpened(0, "get_time")]


def test_text_that_mentions_the_tag_is_words() -> None:
    for text in ("Wrap calls in <tool_call> tags.", "Use <tool_calls> or <tool_call", "a <tool_call>"):
        assert read(text) == (text, [], []), text
    events, _ = parsed(list("Wrap calls in <tool_call> tags."))
    assert words_of(events) == "Wrap calls in <tool_call> tags."


def test_name_after_arguments_and_an_unclosed_call_are_still_calls() -> None:
    swapped = '<tool_call>{"arguments": {"zone": "CET"}, "name": "get_time"}</tool_call>'
    assert read(swapped)[1] == [("get_time", {"zone": "CET"})]
    events, _ = parsed(list(swapped))  # read as it comes: scanned once, whole at its close
    assert next(e for e in events if isinstance(e, CallEnded | CallOpened)) == CallOpened(0, "get_time")
    assert "".join(e.text for e in events if isinstance(e, CallArguments)) == '{"zone": "CET"}'
    unclosed = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}'  # the output ended
    assert read(unclosed)[1:] == ([("get_time", {"zone": "UTC"})], [])
    cut = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "U'  # max_tokens ran out
    assert read(cut) == (cut, [], ["invalid_arguments"])
    # Words after a call that never closed are still words.
    assert read('<tool_call>{"name": "get_time", "arguments": {}}\nDone.') == ("\nDone.", [("get_time", {})], [])


def test_braces_and_tags_inside_strings_do_not_end_the_arguments() -> None:
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "x}\\"{ y"}}</tool_call>'
    assert read(text)[1] == [("get_weather", {"city": 'x}"{ y'})]


def test_llama3_json_calls_are_the_whole_answer() -> None:
    first, second = '{"name": "get_time", "parameters": {"zone": "UTC"}}', '{"name": "get_weather", "parameters": {}}'
    text = "<|python_tag|>" + first + "; " + second
    assert read(text, "llama3_json") == ("", [("get_time", {"zone": "UTC"}), ("get_weather", {})], [])
    prose = 'You could call {"name": "get_time", "parameters": {}}'
    assert read(prose, "llama3_json") == (prose, [], [])
    events, _ = parsed(list('{"name": "get_time", "parameters": {"zone": "CET"}}'), "llama3_json")
    assert "".join(e.text for e in events if isinstance(e, CallArguments)) == '{"zone": "CET"}'
    swapped = '{"parameters": {}, "name": "get_time"}; {"name": "get_weather", "parameters": {"city": "x"}}'
    for pieces in ([swapped], list(swapped)):  # the ";" between calls, whole or on its own
        events, reports = parsed(pieces, "llama3_json")
        assert [e.name for e in events if isinstance(e, CallOpened)] == ["get_time", "get_weather"]
        assert words_of(events) == "" and reports == []


def stream_deltas(pieces: list[str], reason: str = "stop") -> tuple[list[dict[str, Any]], str, list[str]]:
    reports: list[str] = []
    stream = TemplateCallStream(CallParser("hermes", NAMES, reports.append))
    deltas = [delta for piece in pieces for delta in stream.delta(piece)] + stream.flush()
    return deltas, stream.finish_reason(reason), reports


def test_the_stream_is_content_then_openai_tool_call_deltas() -> None:
    deltas, finish, reports = stream_deltas(list("Let me check.\n" + WEATHER + "\n" + TIME))
    assert finish == "tool_calls" and reports == []
    content = "".join(d.get("content", "") for d in deltas)
    assert content == "Let me check."
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    openings = [c for c in calls if "id" in c]
    assert [(c["index"], c["type"], c["function"]["name"]) for c in openings] == [
        (0, "function", "get_weather"),
        (1, "function", "get_time"),
    ]
    assert all(CALL_ID.fullmatch(c["id"]) for c in openings) and openings[0]["id"] != openings[1]["id"]
    for index, arguments in ((0, {"city": "Paris", "days": 2}), (1, {"zone": "UTC"})):
        parts = [c["function"]["arguments"] for c in calls if c["index"] == index]
        assert json.loads("".join(parts)) == arguments and len(parts) > 5
    assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"} for c in calls if "id" not in c)


def test_a_streamed_call_with_broken_arguments_ends_with_stop_and_is_counted() -> None:
    _, finish, reports = stream_deltas(list(WEATHER.replace('"Paris"', "Paris")))
    assert finish == "stop" and reports == ["invalid_arguments"]
    _, cut, _ = stream_deltas(list(WEATHER), reason="length")
    assert cut == "length"


def test_a_whole_answer_reads_the_same_as_the_stream() -> None:
    words, calls = template_answer("Hi.\n" + TIME, "hermes", NAMES, lambda why: None)
    assert words == "Hi." and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_time", {"zone": "UTC"})]


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_any_split_reads_the_same(size: int) -> None:
    text = "Okay <tool_call" + "s> " + WEATHER + "\n" + TIME.replace("get_time", "nope") + " done"
    whole, reports_whole = parsed([text])
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    split, reports_split = parsed(pieces)

    def summary(events: list[Event]) -> tuple[str, str, list[Any]]:
        arguments = "".join(e.text for e in events if isinstance(e, CallArguments))
        return words_of(events), arguments, [e for e in events if isinstance(e, CallOpened | CallEnded)]

    assert summary(split) == summary(whole) and reports_split == reports_whole == ["unknown_function"]
