"""One streaming /generate request, counted as it arrives: what every tool that loads the server uses.

The tally is filled in place while events arrive, so a caller whose time limit cuts a stream short
still has its figures. Events are counted on raw bytes (cheap next to a server sharing the CPU),
with the end of the previous chunk kept, as an event name may be split across two chunks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

TOKEN, DONE, ERROR = b"event: token\n", b"event: done\n", b"event: error\n"


@dataclass
class StreamTally:
    tokens: int = 0
    ttft: float | None = None  # seconds from sending to the first token event
    seconds: float = 0.0  # from sending to the last byte read
    done: bool = False
    dropped: bool = False  # the caller closed the stream on purpose (drop_after)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.done and self.error is None and not self.dropped


def generate_body(prompt: str, max_tokens: int) -> dict[str, Any]:
    """Greedy, exactly ``max_tokens`` tokens, and never from the prompt cache (repeats would be
    replayed, or shared with an identical request in flight, instead of generated)."""
    return {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "cache": False,
    }


async def stream_generate(
    client: httpx.AsyncClient, body: dict[str, Any], tally: StreamTally, drop_after: int | None = None
) -> StreamTally:
    """POST /generate and read the stream into ``tally``; close it after ``drop_after`` tokens."""
    began = time.perf_counter()
    async with client.stream("POST", "/generate", json=body) as response:
        if response.status_code != 200:
            tally.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            return tally
        tail = b""
        async for chunk in response.aiter_raw():
            joined = tail + chunk
            seen = joined.count(TOKEN) - tail.count(TOKEN)
            if seen and tally.ttft is None:
                tally.ttft = time.perf_counter() - began
            tally.tokens += seen
            tally.done = tally.done or DONE in joined
            if ERROR in joined and tally.error is None:
                tally.error = "the stream ended with an error event"
            tail = joined[-16:]
            tally.seconds = time.perf_counter() - began
            if drop_after is not None and tally.tokens >= drop_after and not tally.done:
                tally.dropped = True
                return tally
    if not tally.done and tally.error is None:
        tally.error = "the stream ended without its done event"
    return tally
