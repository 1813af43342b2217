"""Stream events in OpenAI's shapes: chat.completion(.chunk) and text_completion. Pure.

gpt-oss's analysis channel is ``reasoning`` (and ``reasoning_content``, which older clients read);
only the rest is ``content``. Responses also carry this server's own fields (``prompt_version``,
``cache_key``, ``cached``, ``timings``); OpenAI clients keep unknown fields and ignore them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from actors.messages import StreamDone, StreamToken, Usage
from app.http.logprobs_format import ChatLogprobs, LegacyLogprobs

Kind = Literal["chat", "completion"]


def usage_body(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def is_reasoning(event: StreamToken) -> bool:
    return event.channel == "analysis"


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    """What every response object of one request shares."""

    id: str
    created: int
    model: str
    prompt_tokens: int
    prompt_version: str
    cache_key: str
    cached: bool
    reasoning: bool  # the model writes a reasoning channel (gpt-oss)
    logprobs: bool = False  # the request asked for them: choices carry them (else logprobs: null)

    def extensions(self) -> dict[str, Any]:
        return {"prompt_version": self.prompt_version, "cache_key": self.cache_key, "cached": self.cached}


def logprobs_collector(kind: Kind, meta: ResponseMeta) -> ChatLogprobs | LegacyLogprobs | None:
    if not meta.logprobs:
        return None
    return ChatLogprobs(meta.reasoning) if kind == "chat" else LegacyLogprobs()


class ChunkWriter:
    """Turns one request's stream events into OpenAI streaming chunks (dicts, one per SSE line)."""

    def __init__(self, kind: Kind, meta: ResponseMeta, *, include_usage: bool, continuous_usage: bool) -> None:
        self._kind = kind
        self._meta = meta
        self._include_usage = include_usage
        self._continuous_usage = continuous_usage
        self._completion_tokens = 0
        self._logprobs = logprobs_collector(kind, meta)

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self._meta.id,
            "object": "chat.completion.chunk" if self._kind == "chat" else "text_completion",
            "created": self._meta.created,
            "model": self._meta.model,
            "choices": [choice],
        }
        if self._continuous_usage:
            chunk["usage"] = usage_body(Usage(self._meta.prompt_tokens, self._completion_tokens))
        return chunk

    def opening(self) -> list[dict[str, Any]]:
        if self._kind != "chat":
            return []
        opening = self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        return [{**opening, **self._meta.extensions()}]

    def token(self, event: StreamToken) -> list[dict[str, Any]]:
        self._completion_tokens = event.index + 1
        if self._logprobs is not None:
            self._logprobs.add(event)  # a token with no text yet: its entry rides with the next text
        if not event.text:
            return []
        logprobs = None if self._logprobs is None else self._logprobs.take()
        if self._kind == "completion":
            return [self._chunk({"index": 0, "text": event.text, "logprobs": logprobs, "finish_reason": None})]
        delta = (
            {"reasoning": event.text, "reasoning_content": event.text}
            if is_reasoning(event)
            else {"content": event.text}
        )
        return [self._chunk({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None})]

    def closing(self, done: StreamDone) -> list[dict[str, Any]]:
        self._completion_tokens = done.usage.completion_tokens
        choice: dict[str, Any] = {"index": 0, "finish_reason": done.finish_reason}
        # Entries of tokens whose text never came (a stop string cut it) close the stream.
        left = self._logprobs.take() if self._logprobs is not None and self._logprobs.pending else None
        if self._kind == "chat":
            choice |= {"delta": {}, "logprobs": left}
        else:
            choice |= {"text": "", "logprobs": left}
        last = self._chunk(choice) | {"timings": dataclasses.asdict(done.timings)}
        chunks = [last]
        if self._include_usage:
            usage_chunk = self._chunk({}) | {"usage": usage_body(done.usage)}
            usage_chunk["choices"] = []
            chunks.append(usage_chunk)
        return chunks


def full_response(kind: Kind, meta: ResponseMeta, tokens: list[StreamToken], done: StreamDone) -> dict[str, Any]:
    """The non-streaming response object."""
    content = "".join(t.text for t in tokens if not is_reasoning(t))
    choice: dict[str, Any] = {"index": 0, "finish_reason": done.finish_reason, "logprobs": None}
    if (logprobs := logprobs_collector(kind, meta)) is not None:
        for token in tokens:
            logprobs.add(token)
        choice["logprobs"] = logprobs.take()
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if meta.reasoning:
            reasoning = "".join(t.text for t in tokens if is_reasoning(t))
            message |= {"reasoning": reasoning, "reasoning_content": reasoning}
        choice["message"] = message
    else:
        choice["text"] = content
    return {
        "id": meta.id,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [choice],
        "usage": usage_body(done.usage),
        "timings": dataclasses.asdict(done.timings),
        **meta.extensions(),
    }
