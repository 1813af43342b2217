"""Logprobs in the shapes clients read: OpenAI's chat list, the legacy completions arrays, and the
native API's per-token fields. Pure: stream tokens in, JSON-ready dicts out.

OpenAI's shapes list the tokens whose text the response shows (``StreamToken.text_logprobs``):
Harmony structure and stop tokens are not among them. A token whose text a stop string cut is: one
entry per generated text token, as vLLM gives them. For gpt-oss the analysis channel's tokens are
listed in ``reasoning``, next to ``content``, as its text is ``reasoning`` next to ``content``.
"""

from __future__ import annotations

import codecs
from typing import Any

from actors.messages import StreamToken
from app.text.logprobs import ShownLogprob, ShownLogprobs


def shown_entry(shown: ShownLogprob) -> dict[str, Any]:
    return {"token": shown.token, "logprob": shown.logprob, "bytes": list(shown.bytes)}


def chat_entry(logprobs: ShownLogprobs) -> dict[str, Any]:
    return {**shown_entry(logprobs.chosen), "top_logprobs": [shown_entry(t) for t in logprobs.top]}


def native_fields(logprobs: ShownLogprobs) -> dict[str, Any]:
    """What a /generate token event adds: its own logprob and bytes, and the alternatives."""
    return {
        "logprob": logprobs.chosen.logprob,
        "bytes": list(logprobs.chosen.bytes),
        "top_logprobs": [shown_entry(t) for t in logprobs.top],
    }


class ChatLogprobs:
    """Chat's ``logprobs`` object, for the tokens added since the last ``take``: a streamed chunk
    takes those that came with or before its text (a token whose text was held back rides with
    the chunk that shows it), the full response takes them all."""

    def __init__(self, reasoning: bool) -> None:
        self._reasoning = reasoning  # gpt-oss: a second list for the analysis channel
        self._content: list[dict[str, Any]] = []
        self._analysis: list[dict[str, Any]] = []

    @property
    def pending(self) -> bool:
        return bool(self._content or self._analysis)

    def add(self, event: StreamToken) -> None:
        into = self._analysis if self._reasoning and event.channel == "analysis" else self._content
        into.extend(chat_entry(entry) for entry in event.text_logprobs)

    def take(self) -> dict[str, Any]:
        body: dict[str, Any] = {"content": self._content}
        if self._reasoning:
            body["reasoning"] = self._analysis
        self._content, self._analysis = [], []
        return body


class LegacyLogprobs:
    """/v1/completions' ``logprobs``: parallel arrays, ``top_logprobs`` a dict per token that holds
    the chosen token too (OpenAI: up to logprobs + 1 entries), ``text_offset`` the character at
    which each token's text starts in the completion (a token that continues a split character
    starts where that character does)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0
        self._entries: list[ShownLogprobs] = []
        self._offsets: list[int] = []

    @property
    def pending(self) -> bool:
        return bool(self._entries)

    def add(self, event: StreamToken) -> None:
        for entry in event.text_logprobs:
            self._entries.append(entry)
            self._offsets.append(self._chars)
            self._chars += len(self._decoder.decode(entry.chosen.bytes))

    def take(self) -> dict[str, Any]:
        entries, offsets = self._entries, self._offsets
        self._entries, self._offsets = [], []
        tops = []
        for entry in entries:
            top = {t.token: t.logprob for t in entry.top}
            top.setdefault(entry.chosen.token, entry.chosen.logprob)
            tops.append(top)
        return {
            "tokens": [e.chosen.token for e in entries],
            "token_logprobs": [e.chosen.logprob for e in entries],
            "top_logprobs": tops,
            "text_offset": offsets,
        }
