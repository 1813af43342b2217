"""SSE framing: one event is one data line by every client's reckoning, whatever the model wrote."""

from __future__ import annotations

import json

from app.http.sse import sse_event

# What str.splitlines() (and so httpx's aiter_lines) breaks a line at, beyond \n and \r.
UNICODE_BREAKS = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def test_a_token_holding_unicode_line_breaks_stays_on_one_data_line() -> None:
    text = "".join(f"a{ch}" for ch in UNICODE_BREAKS + "\n\r")
    framed = sse_event(None, {"choices": [{"delta": {"content": text}}]}).decode()
    lines = framed.splitlines()
    assert lines == [lines[0], ""] and lines[0].startswith("data: ")
    assert json.loads(lines[0].removeprefix("data: "))["choices"][0]["delta"]["content"] == text


def test_named_events_and_plain_payloads_keep_their_shape() -> None:
    assert sse_event("response.created", {"a": "é"}) == 'event: response.created\ndata: {"a":"é"}\n\n'.encode()
    assert sse_event(None, "[DONE]") == b"data: [DONE]\n\n"
