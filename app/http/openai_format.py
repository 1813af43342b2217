"""Stream events in OpenAI's shapes: chat.completion(.chunk) and text_completion. Pure.

gpt-oss's analysis channel is ``reasoning`` (and ``reasoning_content``, which older clients read);
only the rest is ``content``. Responses also carry this server's own fields (``prompt_version``,
``cache_key``, ``cached``, ``timings``); OpenAI clients keep unknown fields and ignore them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from actors.messages import StreamDone, StreamToken, Usage
from app.contract.model import CallSyntax
from app.http.logprobs_format import ChatLogprobs, LegacyLogprobs
from app.http.tool_calls import (
    CallStream,
    JsonCallStream,
    MalformedReport,
    TemplateCallStream,
    is_call_text,
    parse_json_call,
    split_calls,
    template_answer,
    tool_calls_body,
)
from app.text.template_calls import CallParser

Kind = Literal["chat", "completion"]


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        # OpenAI's field: prompt tokens whose keys were reused (the prefix KV cache), not prefilled.
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def cached_tokens(meta: ResponseMeta, per_choice: dict[int, int]) -> int:
    """A request's reused prompt tokens: each prompt's first choice's (its other choices fork from
    it, and the prompt is counted once, as in prompt_tokens). A prompt-cache replay prefilled
    nothing: all of its prompt tokens were cached."""
    if meta.cached:
        return meta.prompt_tokens
    return min(meta.prompt_tokens, sum(n for index, n in per_choice.items() if index % meta.n == 0))


def is_reasoning(event: StreamToken) -> bool:
    return event.channel == "analysis"


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    """What every response object of one request shares (the cache fields are choice 0's)."""

    id: str
    created: int
    model: str
    prompt_tokens: int  # each prompt's once, however many choices it has
    prompt_version: str
    cache_key: str
    cached: bool
    reasoning: bool  # the model writes a reasoning channel (gpt-oss)
    logprobs: bool = False  # the request asked for them: choices carry them (else logprobs: null)
    tool_names: frozenset[str] = frozenset()  # the functions the model may call (tools)
    report_malformed: MalformedReport = lambda why: None  # a call the request cannot take (counted)
    json_call: bool = False  # a forced call on a model without Harmony: the answer is its JSON
    n: int = 1  # choices per prompt: choice i is choice i % n of prompt i // n
    # tool_choice auto on a model without Harmony: calls in its chat template's syntax
    call_syntax: CallSyntax | None = None

    def extensions(self) -> dict[str, Any]:
        return {"prompt_version": self.prompt_version, "cache_key": self.cache_key, "cached": self.cached}


def logprobs_collector(kind: Kind, meta: ResponseMeta) -> ChatLogprobs | LegacyLogprobs | None:
    if not meta.logprobs:
        return None
    return ChatLogprobs(meta.reasoning) if kind == "chat" else LegacyLogprobs()


class ChunkWriter:
    """Turns one request's stream events into OpenAI streaming chunks (dicts, one per SSE line).

    Each chunk carries one choice, by its index; usage adds up the choices' completion tokens."""

    def __init__(self, kind: Kind, meta: ResponseMeta, *, include_usage: bool, continuous_usage: bool) -> None:
        self._kind = kind
        self._meta = meta
        self._include_usage = include_usage
        self._continuous_usage = continuous_usage
        self._completion_tokens: dict[int, int] = {}  # choice index -> its tokens so far
        self._logprobs: dict[int, ChatLogprobs | LegacyLogprobs | None] = {}  # choice index -> its collector
        self._calls: dict[int, CallStream] = {}  # choice index -> its tool calls so far
        self._json_calls: dict[int, JsonCallStream] = {}  # choice index -> its forced JSON call
        self._cached_tokens: dict[int, int] = {}  # choice index -> its reused prompt tokens (at its end)
        self._template_calls: dict[int, TemplateCallStream] = {}  # choice index -> its template's calls

    def _usage(self) -> Usage:
        cached = cached_tokens(self._meta, self._cached_tokens)
        return Usage(self._meta.prompt_tokens, sum(self._completion_tokens.values()), cached)

    def _collector(self, index: int) -> ChatLogprobs | LegacyLogprobs | None:
        if index not in self._logprobs:
            self._logprobs[index] = logprobs_collector(self._kind, self._meta)
        return self._logprobs[index]

    def _call_stream(self, index: int) -> CallStream:
        if index not in self._calls:
            self._calls[index] = CallStream(self._meta.tool_names, self._meta.report_malformed)
        return self._calls[index]

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self._meta.id,
            "object": "chat.completion.chunk" if self._kind == "chat" else "text_completion",
            "created": self._meta.created,
            "model": self._meta.model,
            "choices": [choice],
        }
        if self._continuous_usage:
            chunk["usage"] = usage_body(self._usage())
        return chunk

    def opening(self, index: int = 0) -> list[dict[str, Any]]:
        if self._kind != "chat":
            return []
        opening = self._chunk({"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        return [{**opening, **self._meta.extensions()}]

    def token(self, event: StreamToken, index: int = 0) -> list[dict[str, Any]]:
        self._completion_tokens[index] = event.index + 1
        if event.cached_tokens is not None:
            self._cached_tokens[index] = event.cached_tokens
        collector = self._collector(index)
        if collector is not None:
            collector.add(event)  # a token with no text yet: its entry rides with the next text
        if self._kind == "chat" and is_call_text(event):
            call_delta = self._call_stream(index).delta(event)
            if call_delta is None:
                return []
            logprobs = None if collector is None or not event.text else collector.take()
            return [self._chunk({"index": index, "delta": call_delta, "logprobs": logprobs, "finish_reason": None})]
        if not event.text:
            return []
        if self._kind == "chat" and self._meta.json_call:
            json_delta = self._json_calls.setdefault(index, JsonCallStream()).delta(event.text)
            if json_delta is None:
                return []
            logprobs = None if collector is None else collector.take()
            return [self._chunk({"index": index, "delta": json_delta, "logprobs": logprobs, "finish_reason": None})]
        if self._kind == "chat" and self._meta.call_syntax is not None:
            return self._template_chunks(index, self._template_stream(index).delta(event.text))
        logprobs = None if collector is None else collector.take()
        if self._kind == "completion":
            return [self._chunk({"index": index, "text": event.text, "logprobs": logprobs, "finish_reason": None})]
        delta = (
            {"reasoning": event.text, "reasoning_content": event.text}
            if is_reasoning(event)
            else {"content": event.text}
        )
        return [self._chunk({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None})]

    def _template_stream(self, index: int) -> TemplateCallStream:
        if index not in self._template_calls:
            assert self._meta.call_syntax is not None
            parser = CallParser(self._meta.call_syntax, self._meta.tool_names, self._meta.report_malformed)
            self._template_calls[index] = TemplateCallStream(parser)
        return self._template_calls[index]

    def _template_chunks(self, index: int, deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One chunk per delta; the tokens' logprobs ride with the first (held text: the next)."""
        chunks: list[dict[str, Any]] = []
        collector = self._collector(index)
        for delta in deltas:
            logprobs = collector.take() if collector is not None and not chunks else None
            chunks.append(self._chunk({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}))
        return chunks

    def closing(self, done: StreamDone, index: int = 0) -> list[dict[str, Any]]:
        """A choice's finish chunk, with its timings (after what a template's calls held back)."""
        self._completion_tokens[index] = done.usage.completion_tokens
        self._cached_tokens[index] = done.usage.cached_tokens
        held: list[dict[str, Any]] = []
        if self._kind == "chat" and self._meta.call_syntax is not None:
            held = self._template_chunks(index, self._template_stream(index).flush())
        calls = self._calls.get(index) or self._json_calls.get(index) or self._template_calls.get(index)
        reason = done.finish_reason if calls is None else calls.finish_reason(done.finish_reason)
        choice: dict[str, Any] = {"index": index, "finish_reason": reason}
        # Entries of tokens whose text never came (a stop string cut it) close the stream.
        collector = self._collector(index)
        left = collector.take() if collector is not None and collector.pending else None
        if self._kind == "chat":
            choice |= {"delta": {}, "logprobs": left}
        else:
            choice |= {"text": "", "logprobs": left}
        return [*held, self._chunk(choice) | {"timings": dataclasses.asdict(done.timings)}]

    def usage(self) -> list[dict[str, Any]]:
        """After every choice's finish chunk: the usage chunk, if the client asked for it."""
        if not self._include_usage:
            return []
        usage_chunk = self._chunk({}) | {"usage": usage_body(self._usage())}
        usage_chunk["choices"] = []
        return [usage_chunk]


def full_response(
    kind: Kind, meta: ResponseMeta, choices: Sequence[tuple[int, list[StreamToken], StreamDone]]
) -> dict[str, Any]:
    """The non-streaming response object: ``choices`` (index, tokens, end), by index. The
    timings are the first choice's, as the response headers are."""
    completion_tokens = sum(done.usage.completion_tokens for _, _, done in choices)
    cached = cached_tokens(meta, {index: done.usage.cached_tokens for index, _, done in choices})
    return {
        "id": meta.id,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [choice_body(kind, meta, index, tokens, done) for index, tokens, done in choices],
        "usage": usage_body(Usage(meta.prompt_tokens, completion_tokens, cached)),
        "timings": dataclasses.asdict(choices[0][2].timings),
        **meta.extensions(),
    }


def choice_body(
    kind: Kind, meta: ResponseMeta, index: int, tokens: list[StreamToken], done: StreamDone
) -> dict[str, Any]:
    content = "".join(t.text for t in tokens if not is_reasoning(t) and (kind != "chat" or not is_call_text(t)))
    choice: dict[str, Any] = {"index": index, "finish_reason": done.finish_reason, "logprobs": None}
    if (logprobs := logprobs_collector(kind, meta)) is not None:
        for token in tokens:
            logprobs.add(token)
        choice["logprobs"] = logprobs.take()
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if any(is_call_text(t) for t in tokens):
            found = split_calls(tokens, meta.tool_names, meta.report_malformed)
            message["content"] = content + found.malformed_text
            if found.calls:
                message["content"] = message["content"] or None  # only calls: content is null
                message["tool_calls"] = tool_calls_body(found.calls)
                if done.finish_reason == "stop":
                    choice["finish_reason"] = "tool_calls"
        if meta.call_syntax is not None:
            words, calls = template_answer(content, meta.call_syntax, meta.tool_names, meta.report_malformed)
            message["content"] = (words or None) if calls else words
            if calls:
                message["tool_calls"] = tool_calls_body(calls)
                if done.finish_reason == "stop":
                    choice["finish_reason"] = "tool_calls"
        if meta.json_call and (call := parse_json_call(content)) is not None:
            message |= {"content": None, "tool_calls": tool_calls_body([call])}
            if done.finish_reason == "stop":
                choice["finish_reason"] = "tool_calls"
        elif meta.json_call and done.finish_reason == "stop":
            meta.report_malformed("invalid_arguments")
        if meta.reasoning:
            reasoning = "".join(t.text for t in tokens if is_reasoning(t))
            message |= {"reasoning": reasoning, "reasoning_content": reasoning}
        choice["message"] = message
    else:
        choice["text"] = content
    return choice
