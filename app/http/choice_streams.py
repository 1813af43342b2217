"""The choices of one OpenAI request: a stream each, opened together, read as one.

Per prompt, choice 0 is opened first and the others name it as ``fork_from``: the scheduler then
prefills the prompt once and the others copy its keys. Every stream's abort is registered with
the request scope (start_stream), so a client that leaves stops all of them; if one cannot open,
those already opened are aborted and the refusal is the answer. Once open, their events come
through one merged channel (actors/choice_merge.py), in the order they arrive. The first choice
to fail ends the response: the others are aborted.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import trio
from quart import Response, request

from actors.choice_merge import ChoiceEvent
from actors.messages import GenerationJob, StreamDone, StreamError, StreamStarted, StreamToken
from actors.stream_handle import StreamHandle
from app.http.context import ServerState
from app.http.errors import ApiError
from app.http.request_scope import on_request_close
from app.http.sse import SSE_HEADERS, sse_comment
from app.http.streams import Heartbeat, first_event, start_stream


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    job: GenerationJob
    handle: StreamHandle
    started: StreamStarted


@dataclass(slots=True)
class ChoiceResult:
    """One choice of a non-streamed response, once it is done."""

    index: int
    tokens: list[StreamToken] = field(default_factory=list)
    done: StreamDone | None = None


def abort_all(handles: Iterable[StreamHandle]) -> None:
    for handle in handles:
        handle.abort("choice_failed")


async def open_choices(state: ServerState, groups: Sequence[Sequence[GenerationJob]]) -> list[Choice]:
    """Open every choice's stream (``groups``: per prompt, its choices' jobs, choice 0 first) and
    wait until each is queued. A refusal of any (429, 503) aborts the others and is raised."""
    opened: list[tuple[int, GenerationJob, StreamHandle]] = []
    try:
        for prompt_index, jobs in enumerate(groups):
            parent: str | None = None
            for j, job in enumerate(jobs):
                handle = start_stream(state, job, fork_from=parent)
                parent = parent or handle.request_id  # ours, never the client's X-Request-Id
                opened.append((prompt_index * len(jobs) + j, job, handle))
        return [Choice(index, job, handle, await first_event(handle)) for index, job, handle in opened]
    except ApiError:
        # A client that left is not this: its request's close aborts them, with its own reason.
        abort_all(handle for _, _, handle in opened)
        raise


def merged_events(state: ServerState, choices: Sequence[Choice]) -> trio.MemoryReceiveChannel[ChoiceEvent]:
    """The choices' events as one channel. It is closed when the request ends, however it ends,
    so that no pump waits on a response that will never read it."""
    events = state.pipeline.merge([(choice.index, choice.handle) for choice in choices])
    on_request_close(cast(dict[str, Any], request.scope), lambda reason: events.close())
    return events


async def collect(choices: Sequence[Choice], events: trio.MemoryReceiveChannel[ChoiceEvent]) -> list[ChoiceResult]:
    """Every choice's tokens and end, by index; the first failure is raised as the response."""
    results = {choice.index: ChoiceResult(choice.index) for choice in choices}
    pending = set(results)
    with events:
        async for item in events:
            result, event = results[item.index], item.event
            match event:
                case StreamToken():
                    result.tokens.append(event)
                case StreamDone():
                    result.done = event
                    pending.discard(item.index)
                case StreamError():
                    abort_all(choice.handle for choice in choices if choice.index != item.index)
                    raise ApiError(500, event.message, code=event.code)
            if not pending:
                return sorted(results.values(), key=lambda r: r.index)
    abort_all(choice.handle for choice in choices)
    raise ApiError(500, "the generation stream ended without a result", code="stream_lost")


async def with_heartbeats(
    events: trio.MemoryReceiveChannel[ChoiceEvent], interval: float
) -> AsyncGenerator[ChoiceEvent | Heartbeat, None]:
    """The merged events until every pump has ended; a Heartbeat after each quiet ``interval``."""
    while True:
        with trio.move_on_after(interval) as quiet:
            try:
                item = await events.receive()
            except trio.EndOfChannel:
                return
        yield Heartbeat() if quiet.cancelled_caught else item


class ChoiceFramer(Protocol):
    """How an endpoint frames its choices' events as SSE bytes."""

    def opening(self) -> list[bytes]: ...

    def token(self, index: int, event: StreamToken) -> list[bytes]: ...

    def done(self, index: int, event: StreamDone) -> list[bytes]: ...

    def error(self, event: StreamError) -> list[bytes]: ...

    def closing(self, complete: bool) -> list[bytes]:
        """The stream's last bytes; ``complete``: every choice finished (no error)."""
        ...


async def _sse_body(
    choices: Sequence[Choice], events: trio.MemoryReceiveChannel[ChoiceEvent], framer: ChoiceFramer, heartbeat: float
) -> AsyncIterator[bytes]:
    # No abort here for a client that leaves: the request's close callbacks abort every choice.
    pending = {choice.index for choice in choices}
    failed = False
    with events:
        for data in framer.opening():
            yield data
        async with aclosing(with_heartbeats(events, heartbeat)) as stream:
            async for item in stream:
                if isinstance(item, Heartbeat):
                    framed = [sse_comment("keep-alive")]
                else:
                    framed = []
                    match item.event:
                        case StreamToken() as token:
                            framed = framer.token(item.index, token)
                        case StreamDone() as done:
                            framed = framer.done(item.index, done)
                            pending.discard(item.index)
                        case StreamError() as error:
                            failed = True
                            abort_all(choice.handle for choice in choices if choice.index != item.index)
                            framed = framer.error(error)
                for data in framed:
                    yield data
                if failed or not pending:
                    break
        if pending and not failed:  # every pump ended, some choice without its end
            abort_all(choice.handle for choice in choices)
            for data in framer.error(StreamError(choices[0].handle.request_id, "stream_lost")):
                yield data
    for data in framer.closing(complete=not pending):
        yield data


def sse_response(
    choices: Sequence[Choice],
    events: trio.MemoryReceiveChannel[ChoiceEvent],
    framer: ChoiceFramer,
    heartbeat: float,
    headers: dict[str, str],
) -> Response:
    response = Response(_sse_body(choices, events, framer, heartbeat), headers={**SSE_HEADERS, **headers})
    response.timeout = None  # Quart would cut the body at 60 s otherwise
    return response
