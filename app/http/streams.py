"""Opening a generation stream for an HTTP request, and reading it with heartbeats.

Shared by the native and the OpenAI-compatible routes: they differ only in how events are framed.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, cast

import trio
from quart import request

from actors.messages import StreamDone, StreamError, StreamEvent, StreamRejected, StreamStarted, StreamToken
from actors.pipeline import GenerationJob, NotReadyError, StreamHandle
from app.http.errors import ApiError
from app.http.request_scope import on_request_close
from app.server import ServerState


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Nothing arrived for a while: the framing layer sends a comment so proxies keep the line."""


async def open_stream(state: ServerState, job: GenerationJob) -> tuple[StreamHandle, StreamStarted]:
    """Submit the job and wait until it is queued (or refused: raised as an ApiError)."""
    try:
        handle = state.pipeline.open_stream(job)
    except NotReadyError as error:
        raise ApiError(
            503, f"the server is not ready: {error}", code=error.state, headers={"Retry-After": "5"}
        ) from error
    # Registered before the first await: however this request ends, its work is stopped.
    on_request_close(cast(dict[str, Any], request.scope), handle.abort)
    first = await handle.next_event()
    match first:
        case StreamStarted():
            return handle, first
        case StreamRejected():
            headers = {}
            if first.retry_after is not None:
                headers["Retry-After"] = str(max(1, math.ceil(first.retry_after)))
            raise ApiError(
                first.status, first.message, code="queue_full" if first.status == 429 else None, headers=headers
            )
        case StreamError():
            raise ApiError(500, first.message, code=first.error_type)
    raise ApiError(500, f"unexpected first event {type(first).__name__}")


async def events_with_heartbeats(
    handle: StreamHandle, interval: float
) -> AsyncGenerator[StreamToken | StreamDone | StreamError | Heartbeat, None]:
    """The stream's events until its terminal one; a Heartbeat after each quiet ``interval``."""
    while True:
        with trio.move_on_after(interval) as quiet:
            try:
                event: StreamEvent = await handle.next_event()
            except trio.EndOfChannel:
                event = StreamError(handle.request_id, "the generation stream ended without a result", "stream_lost")
        if quiet.cancelled_caught:
            yield Heartbeat()
            continue
        if isinstance(event, StreamToken | StreamDone | StreamError):
            yield event
        if isinstance(event, StreamDone | StreamError):
            return


def created_timestamp() -> int:
    return int(time.time())
