"""A streaming chat load for any OpenAI-compatible server, measured per request.

``concurrency`` clients each send the next request as soon as their last one has finished, until
``requests`` have been sent: the server always sees that many streams at once. Every request is a
streaming ``POST /v1/chat/completions`` for one of a fixed list of prompts (request i gets prompt
i mod len), greedy, ``max_tokens`` long. A :class:`Dialect` adds what one server needs to generate
exactly that many tokens every time (no stop at end-of-sequence, no reply from a prompt cache).

Per request: TTFT (until the first chunk whose delta has text), E2E (until the response ends),
and tokens: the ``usage.completion_tokens`` of the stream when it sends usage, else the number of
chunks with text (which undercounts tokens that decode to no text); ``token_source`` says which.
The stream may end with ``data: [DONE]`` or simply close: both end it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import trio

from actors.metrics import percentile

TokenSource = Literal["usage", "chunks"]

PROMPTS = (
    "Tell me a long story about the sea.",
    "Explain how a bicycle stays upright.",
    "Write a letter to a friend about a trip to the mountains.",
    "Describe how bread is made, step by step.",
    "What makes a good teacher? Give examples.",
    "Tell me about the history of the printing press.",
    "Describe a busy market in the morning.",
    "Explain why the sky is blue to a child.",
    "Write a short essay on the value of sleep.",
    "How do bees make honey?",
    "Describe the life of a lighthouse keeper.",
    "Explain how a train timetable is planned.",
    "Tell me a story about a robot who learns to paint.",
    "What should I pack for a week of camping?",
    "Describe a thunderstorm over a city.",
    "Explain how a library organises its books.",
)


@dataclass(frozen=True)
class Dialect:
    """A server's name, and the fields it needs besides the common body to generate exactly
    ``max_tokens`` tokens for every request."""

    name: str
    extra: Mapping[str, Any] = field(default_factory=dict)


# This server: ignore_eos for the fixed length; cache: false or repeated prompts would be replayed
# from the prompt cache instead of generated; usage only when asked for.
THIS_SERVER = Dialect("this server", {"ignore_eos": True, "cache": False, "stream_options": {"include_usage": True}})
# transformers serve answers 422 to fields it does not know (ignore_eos, cache, min_tokens) and
# ignores stream_options (it always sends usage). Its per-request generation_config replaces the
# model's: with eos_token_id -1 the continuous batcher never stops a request at end-of-sequence.
TRANSFORMERS_SERVE = Dialect("transformers serve", {"generation_config": json.dumps({"eos_token_id": -1})})


def chat_body(prompt: str, max_tokens: int, dialect: Dialect) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
        **dialect.extra,
    }


@dataclass
class StreamReading:
    """What one response's SSE lines have said so far; times in seconds since the request was sent."""

    ttft: float | None = None
    text_chunks: int = 0
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    error: str | None = None
    done: bool = False

    def feed(self, line: str, elapsed: float) -> None:
        if not line.startswith("data:") or self.done:
            return  # blank lines, comments (heartbeats), event names
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            self.error = f"not JSON: {data[:120]}"
            return
        if not isinstance(chunk, dict):
            self.error = f"not a chunk object: {data[:120]}"
            return
        if "error" in chunk:
            self.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
            return
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content"):
                self.text_chunks += 1
                if self.ttft is None:
                    self.ttft = elapsed
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.completion_tokens = usage["completion_tokens"]
            self.prompt_tokens = usage.get("prompt_tokens")

    def tokens(self) -> tuple[int, TokenSource]:
        if self.completion_tokens is not None:
            return self.completion_tokens, "usage"
        return self.text_chunks, "chunks"


@dataclass(frozen=True)
class RequestResult:
    prompt: int  # index into the prompt list
    ttft: float | None
    e2e: float
    tokens: int
    token_source: TokenSource
    prompt_tokens: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


async def one_request(client: httpx.AsyncClient, body: Mapping[str, Any], prompt: int) -> RequestResult:
    reading = StreamReading()
    began = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:300]
                reading.error = f"HTTP {response.status_code}: {detail}"
            else:
                async for line in response.aiter_lines():
                    reading.feed(line, time.perf_counter() - began)
    except httpx.HTTPError as exc:
        reading.error = f"{type(exc).__name__}: {exc}"
    e2e = time.perf_counter() - began
    if reading.error is None and reading.ttft is None:
        reading.error = "the stream ended without any text"
    tokens, source = reading.tokens()
    return RequestResult(prompt, reading.ttft, e2e, tokens, source, reading.prompt_tokens, reading.error)


@dataclass(frozen=True)
class Phase:
    """One load level against one server: every request's result and the wall time of them all."""

    server: str
    concurrency: int
    wall: float
    results: tuple[RequestResult, ...]


async def run_phase(
    url: str,
    dialect: Dialect,
    *,
    concurrency: int,
    requests: int,
    max_tokens: int,
    prompts: Sequence[str] = PROMPTS,
    timeout: float = 600.0,
) -> Phase:
    results: list[RequestResult] = []
    next_request = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def client_loop() -> None:
            for index in next_request:  # shared: each index is taken by one client only
                prompt = index % len(prompts)
                results.append(await one_request(client, chat_body(prompts[prompt], max_tokens, dialect), prompt))

        began = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(client_loop)
        wall = time.perf_counter() - began
    return Phase(dialect.name, concurrency, wall, tuple(results))


@dataclass(frozen=True)
class PhaseFigures:
    ok: int
    failed: int
    ttft_p50: float | None
    ttft_p95: float | None
    e2e_p50: float | None
    e2e_p95: float | None
    tokens_per_s: float
    tokens_min: int | None
    tokens_max: int | None
    token_sources: tuple[TokenSource, ...]  # where the counts came from, each source once
    prompt_tokens_mean: float | None
    first_error: str | None


def phase_figures(phase: Phase) -> PhaseFigures:
    """Percentiles (nearest rank) over the requests that succeeded; tokens/s is all their tokens
    over the phase's wall time."""
    ok = [r for r in phase.results if r.ok]
    failed = [r for r in phase.results if not r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    e2es = [r.e2e for r in ok]
    tokens = [r.tokens for r in ok]
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    return PhaseFigures(
        ok=len(ok),
        failed=len(failed),
        ttft_p50=percentile(ttfts, 50),
        ttft_p95=percentile(ttfts, 95),
        e2e_p50=percentile(e2es, 50),
        e2e_p95=percentile(e2es, 95),
        tokens_per_s=sum(tokens) / phase.wall if phase.wall > 0 else 0.0,
        tokens_min=min(tokens, default=None),
        tokens_max=max(tokens, default=None),
        token_sources=tuple(sorted({r.token_source for r in ok})),
        prompt_tokens_mean=sum(prompt_tokens) / len(prompt_tokens) if prompt_tokens else None,
        first_error=failed[0].error if failed else None,
    )
