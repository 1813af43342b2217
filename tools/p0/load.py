"""Concurrent streaming load against /generate, with a progress bar: what the performance and the
load-and-memory checks drive."""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import httpx
import trio

from tools.stream_client import StreamTally, generate_body, stream_generate

WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "river", "stones",
    "hum", "under", "an", "old", "bridge", "and", "seven", "gulls", "circle", "the", "harbour", "wall",
    "before", "the", "evening", "tide", "turns", "grey", "then", "silver",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class LoadSettings:
    concurrency: int = 8
    requests: int = 48
    prompt_words: int = 96
    max_tokens: int = 64
    disconnect_share: float = 0.0  # this share of streams is dropped by the client mid-answer
    seed: int = 0
    request_timeout: float = 300.0
    # Fields added to every request body (a grammar, logprobs: what a soak holds per request).
    extra_body: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class RequestRecord:
    ok: bool  # a complete stream: start, tokens, done
    dropped: bool  # the client closed it mid-stream on purpose
    ttft: float | None
    e2e: float | None
    tokens: int
    error: str | None = None


def prompt_text(rng: random.Random, words: int, index: int) -> str:
    body = " ".join(rng.choice(WORDS) for _ in range(max(1, words)))
    return f"Request {index}. Continue this text: {body}"


class Progress:
    """A one-line progress bar on stderr (nothing when disabled or not a terminal-like stream)."""

    def __init__(self, label: str, total: int, stream: TextIO | None = sys.stderr, width: int = 30) -> None:
        self._label, self._total, self._stream, self._width = label, total, stream, width
        self._done = 0
        self._started = time.monotonic()

    def advance(self) -> None:
        self._done += 1
        if self._stream is None:
            return
        filled = int(self._width * self._done / max(1, self._total))
        elapsed = time.monotonic() - self._started
        bar = "#" * filled + "-" * (self._width - filled)
        self._stream.write(f"\r{self._label} [{bar}] {self._done}/{self._total} {elapsed:6.1f}s")
        if self._done >= self._total:
            self._stream.write("\n")
        self._stream.flush()


async def one_stream(client: httpx.AsyncClient, body: dict[str, Any], drop_after: int | None) -> RequestRecord:
    try:
        tally = await stream_generate(client, body, StreamTally(), drop_after)
    except httpx.HTTPError as error:
        return RequestRecord(False, False, None, None, 0, f"{type(error).__name__}: {error}")
    e2e = None if tally.dropped or not tally.done else tally.seconds
    return RequestRecord(tally.ok, tally.dropped, tally.ttft, e2e, tokens=tally.tokens, error=tally.error)


async def run_load(
    client: httpx.AsyncClient,
    settings: LoadSettings,
    progress: Progress | None = None,
    on_finished: Callable[[int], None] | None = None,
) -> list[RequestRecord]:
    """Send ``settings.requests`` streams, ``settings.concurrency`` at a time."""
    rng = random.Random(settings.seed)
    plans = []
    for index in range(settings.requests):
        drop = rng.random() < settings.disconnect_share
        drop_after = rng.randint(1, max(1, settings.max_tokens // 2)) if drop else None
        plans.append((prompt_text(rng, settings.prompt_words, index), drop_after))
    records: list[RequestRecord] = []
    limiter = trio.CapacityLimiter(settings.concurrency)

    async def run(prompt: str, drop_after: int | None) -> None:
        async with limiter:
            with trio.move_on_after(settings.request_timeout) as scope:
                body = {**generate_body(prompt, settings.max_tokens), **dict(settings.extra_body)}
                record = await one_stream(client, body, drop_after)
            if scope.cancelled_caught:
                record = RequestRecord(False, False, None, None, 0, f"no answer in {settings.request_timeout} s")
            records.append(record)
            if progress is not None:
                progress.advance()
            if on_finished is not None:
                on_finished(len(records))

    async with trio.open_nursery() as nursery:
        for prompt, drop_after in plans:
            nursery.start_soon(run, prompt, drop_after)
    return records
