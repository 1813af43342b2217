"""The one SSE loop: a group of choices' events, framed by the endpoint, with heartbeats.

Every streaming endpoint reads its choices the same way (/generate is a group of one, as a
response of /v1/responses is); they differ only in their framer, and a Responses stream in what
runs before its last bytes (the store write: a client told it is done can read it back at once).
The loop reads a ChoiceGroup, not the request's stream handles, so a stream that does not come
from this request's relays (a response run in the background, read back from the store) can be
framed by the same loop.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol

import trio
from quart import Response

from actors.choice_merge import ChoiceEvent
from actors.messages import StreamDone, StreamError, StreamToken
from app.http.sse import SSE_HEADERS, sse_comment


@dataclass(frozen=True, slots=True)
class ChoiceGroup:
    """A request's choices as one stream: their events as they arrive, each tagged with its index."""

    events: trio.MemoryReceiveChannel[ChoiceEvent]
    indexes: tuple[int, ...]
    request_id: str  # choice 0's: names the error of a stream that ended without its end
    stop: Callable[[int | None], None]  # abort every choice but the one given (None: all of them)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Nothing arrived for a while: the loop sends a comment so proxies keep the line."""


class SseFramer(Protocol):
    """How an endpoint frames its choices' events as SSE bytes."""

    def opening(self) -> list[bytes]: ...

    def token(self, index: int, event: StreamToken) -> list[bytes]: ...

    def done(self, index: int, event: StreamDone) -> list[bytes]: ...

    def error(self, event: StreamError) -> list[bytes]: ...

    def closing(self, complete: bool) -> list[bytes]:
        """The stream's last bytes; ``complete``: every choice finished (no error)."""
        ...


async def with_heartbeats(
    events: trio.MemoryReceiveChannel[ChoiceEvent], interval: float
) -> AsyncGenerator[ChoiceEvent | Heartbeat, None]:
    """The events until the channel ends; a Heartbeat after each quiet ``interval``."""
    while True:
        with trio.move_on_after(interval) as quiet:
            try:
                item = await events.receive()
            except trio.EndOfChannel:
                return
        yield Heartbeat() if quiet.cancelled_caught else item


async def sse_body(
    group: ChoiceGroup,
    framer: SseFramer,
    heartbeat: float,
    before_closing: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[bytes]:
    """Every choice's events until each has its end, or the first failure (which stops the
    others); then ``before_closing`` and the framer's closing bytes."""
    # No abort here for a client that leaves: the request's close callbacks abort every choice.
    pending = set(group.indexes)
    failed = False
    with group.events:
        for data in framer.opening():
            yield data
        async with aclosing(with_heartbeats(group.events, heartbeat)) as stream:
            async for item in stream:
                framed: list[bytes] = []
                if isinstance(item, Heartbeat):
                    framed = [sse_comment("keep-alive")]
                else:
                    match item.event:
                        case StreamToken() as token:
                            framed = framer.token(item.index, token)
                        case StreamDone() as done:
                            framed = framer.done(item.index, done)
                            pending.discard(item.index)
                        case StreamError() as error:
                            failed = True
                            group.stop(item.index)
                            framed = framer.error(error)
                for data in framed:
                    yield data
                if failed or not pending:
                    break
        if pending and not failed:  # the channel ended, some choice without its end
            group.stop(None)
            for data in framer.error(StreamError(group.request_id, "stream_lost")):
                yield data
    if before_closing is not None:
        await before_closing()
    for data in framer.closing(complete=not pending):
        yield data


def sse_response(
    group: ChoiceGroup,
    framer: SseFramer,
    heartbeat: float,
    headers: dict[str, str],
    before_closing: Callable[[], Awaitable[None]] | None = None,
) -> Response:
    body = sse_body(group, framer, heartbeat, before_closing)
    response = Response(body, headers={**SSE_HEADERS, **headers})
    response.timeout = None  # Quart would cut the body at 60 s otherwise
    return response
