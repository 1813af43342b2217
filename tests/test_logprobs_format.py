"""Logprobs in OpenAI's response shapes, from stream tokens (pure: no server)."""

from __future__ import annotations

import pytest

from actors.messages import StreamDone, StreamToken, Timings, Usage
from app.contract.step import TokenLogprobs
from app.http.openai_format import ChunkWriter, Kind, ResponseMeta, full_response
from app.text.logprobs import LogprobSpeller, ShownLogprobs

DONE = StreamDone("r", "stop", Usage(3, 4), Timings(0.0, 1.0, 1.0, 2.0))
SPELLER = LogprobSpeller(lambda token_id: {1: b"a", 2: "世".encode()[:2], 3: "世".encode()[2:], 4: b"b"}[token_id])


def meta(logprobs: bool = True, reasoning: bool = False) -> ResponseMeta:
    return ResponseMeta("id", 0, "m", 3, "pb-1", "key", False, reasoning, logprobs)


def entry(token_id: int, logprob: float) -> ShownLogprobs:
    return SPELLER.show(token_id, TokenLogprobs(logprob, ((4, -0.5), (1, -1.0))))


def token(text: str, index: int, token_id: int, channel: str | None = None, settles: bool = True) -> StreamToken:
    own = entry(token_id, -0.1 * (index + 1))
    return StreamToken(text, token_id, index, channel, own, (own,) if settles else ())


# "a", then 世 split over two tokens (the first shows nothing yet), then "b".
SPLIT = [token("a", 0, 1), token("", 1, 2), token("世", 2, 3), token("b", 3, 4)]


def writer(kind: Kind, **options: bool) -> ChunkWriter:
    return ChunkWriter(kind, meta(**options), include_usage=False, continuous_usage=False)


def test_a_chunk_carries_the_entries_of_the_tokens_it_shows() -> None:
    chat = writer("chat")
    chunks = [chunk for event in SPLIT for chunk in chat.token(event)]
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["a", "世", "b"]
    lists = [c["choices"][0]["logprobs"]["content"] for c in chunks]
    assert [[e["token"] for e in entries] for entries in lists] == [["a"], ["bytes:\\xe4\\xb8", "bytes:\\x96"], ["b"]]
    assert bytes(lists[1][0]["bytes"] + lists[1][1]["bytes"]).decode() == "世"
    assert lists[0][0]["top_logprobs"] == [
        {"token": "b", "logprob": -0.5, "bytes": [98]},
        {"token": "a", "logprob": -1.0, "bytes": [97]},
    ]
    assert chat.closing(DONE)[0]["choices"][0]["logprobs"] is None, "nothing left for the last chunk"


def test_entries_of_text_a_stop_string_cut_close_the_stream() -> None:
    chat = writer("chat")
    assert chat.token(token("a", 0, 1))
    assert chat.token(token("", 1, 4)) == []  # held back as a possible stop string, then cut
    last = chat.closing(DONE)[0]["choices"][0]
    assert [e["token"] for e in last["logprobs"]["content"]] == ["b"]


def test_without_logprobs_every_choice_says_null() -> None:
    chat, legacy = writer("chat", logprobs=False), writer("completion", logprobs=False)
    for kind, stream in (("chat", chat), ("completion", legacy)):
        chunks = [chunk for event in SPLIT for chunk in stream.token(event)] + stream.closing(DONE)
        assert all(c["choices"][0]["logprobs"] is None for c in chunks), kind
    assert full_response("chat", meta(False), [(0, SPLIT, DONE)])["choices"][0]["logprobs"] is None


def test_the_full_chat_response_lists_one_entry_per_shown_token() -> None:
    choice = full_response("chat", meta(), [(0, SPLIT, DONE)])["choices"][0]
    entries = choice["logprobs"]["content"]
    assert bytes(b for e in entries for b in e["bytes"]).decode() == choice["message"]["content"] == "a世b"
    assert [e["logprob"] for e in entries] == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    assert "reasoning" not in choice["logprobs"]


def test_harmony_reasoning_tokens_are_listed_apart_from_the_answers() -> None:
    tokens = [
        token("", 0, 4, None, settles=False),  # structure: its own logprob, no entry
        token("a", 1, 1, "analysis"),
        token("b", 2, 4, "final"),
        token("a", 3, 1, "final"),
    ]
    choice = full_response("chat", meta(reasoning=True), [(0, tokens, DONE)])["choices"][0]
    assert choice["message"]["content"] == "ba" and choice["message"]["reasoning"] == "a"
    assert [e["token"] for e in choice["logprobs"]["content"]] == ["b", "a"]
    assert [e["token"] for e in choice["logprobs"]["reasoning"]] == ["a"]
    stream = writer("chat", reasoning=True)
    chunks = [chunk for event in tokens for chunk in stream.token(event)]
    first = chunks[0]["choices"][0]
    assert first["delta"]["reasoning"] == "a" and first["logprobs"]["content"] == []
    assert [e["token"] for e in first["logprobs"]["reasoning"]] == ["a"]


def test_the_legacy_shape_has_offsets_in_characters_and_the_chosen_token_in_its_top() -> None:
    choice = full_response("completion", meta(), [(0, SPLIT, DONE)])["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"] == "a世b"
    assert logprobs["tokens"] == ["a", "bytes:\\xe4\\xb8", "bytes:\\x96", "b"]
    assert logprobs["text_offset"] == [0, 1, 1, 2], "a token that finishes a character starts where it does"
    assert logprobs["token_logprobs"] == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    assert logprobs["top_logprobs"][0] == {"b": -0.5, "a": -1.0}
    assert logprobs["top_logprobs"][1] == {"b": -0.5, "a": -1.0, "bytes:\\xe4\\xb8": -0.2}
    legacy = writer("completion")
    chunks = [chunk for event in SPLIT for chunk in legacy.token(event)]
    streamed = [c["choices"][0]["logprobs"] for c in chunks]
    assert [offset for part in streamed for offset in part["text_offset"]] == logprobs["text_offset"]
    assert [t for part in streamed for t in part["tokens"]] == logprobs["tokens"]
