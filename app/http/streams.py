"""Opening a generation stream for an HTTP request, and what every generation route shares.

The streams are read by app/http/choice_streams.py (a request's choices as one group) and framed
by app/http/event_stream.py (the SSE loop).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import trio
from quart import request

from actors.messages import GenerationJob, StreamError, StreamRejected, StreamStarted, Timings
from actors.pipeline import NotReadyError
from actors.stream_counts import TooManyStreams
from actors.stream_handle import StreamHandle
from app.http.context import ServerState
from app.http.errors import ApiError
from app.http.request_scope import on_request_close
from app.prompts.builder import PROMPT_VERSION

T = TypeVar("T")


async def off_loop(state: ServerState, work: Callable[[], T]) -> T:
    """Prompt work (tokenizing, the cache key) in a worker thread, one request at a time: a 4 MiB
    prompt must not hold the event loop, and with it every other stream and /health."""
    return await trio.to_thread.run_sync(work, limiter=state.prompt_work)


def start_stream(state: ServerState, job: GenerationJob, fork_from: str | None = None) -> StreamHandle:
    """Submit the job (``fork_from``: see Pipeline.open_stream); refusals are ApiErrors."""
    try:
        handle = state.pipeline.open_stream(job, fork_from)
    except NotReadyError as error:
        raise ApiError(
            503, f"the server is not ready: {error}", code=error.state, headers={"Retry-After": "5"}
        ) from error
    except TooManyStreams as error:
        raise ApiError(429, str(error), code="too_many_streams", headers={"Retry-After": "1"}) from error
    # Registered before the first await: however this request ends, its work is stopped. This is
    # the one path by which a client that leaves reaches the scheduler.
    on_request_close(cast(dict[str, Any], request.scope), handle.abort)
    return handle


async def first_event(handle: StreamHandle) -> StreamStarted:
    """Wait until the stream is queued (or refused: raised as an ApiError)."""
    first = await handle.next_event()
    match first:
        case StreamStarted():
            return first
        case StreamRejected():
            headers = {}
            if first.retry_after is not None:
                headers["Retry-After"] = str(max(1, math.ceil(first.retry_after)))
            raise ApiError(
                first.status, first.message, code="queue_full" if first.status == 429 else None, headers=headers
            )
        case StreamError():
            raise ApiError(500, first.message, code=first.code)
    raise ApiError(500, f"unexpected first event {type(first).__name__}")


def server_timing(timings: Timings) -> str:
    """The Server-Timing header: browsers' devtools and curl -v show where the time went."""
    parts = [
        ("queue", timings.queue_ms),
        ("prefill", timings.prefill_ms),
        ("ttft", timings.ttft_ms),
        ("e2e", timings.e2e_ms),
    ]
    return ", ".join(f"{name};dur={value}" for name, value in parts if value is not None)


def created_timestamp() -> int:
    return int(time.time())


def served_model(state: ServerState, requested: str | None) -> Any:
    """The loaded model; 503 while loading, 404 when the request names another model."""
    model = state.pipeline.model
    if model is None:
        pipeline_state = state.pipeline.state
        raise ApiError(
            503, f"the server is not ready: {pipeline_state}", code=pipeline_state, headers={"Retry-After": "5"}
        )
    if requested is not None and requested not in (model.model_id, *model.aliases):
        raise ApiError(
            404,
            f"model {requested!r} is not served here (this server runs {model.model_id})",
            param="model",
            code="model_not_found",
        )
    return model


def stream_headers(handle: StreamHandle, job: GenerationJob, started: StreamStarted) -> dict[str, str]:
    """Where the response came from, on every generation response."""
    return {
        "X-Request-Id": handle.shown_id,
        "X-Prompt-Version": PROMPT_VERSION,
        "X-Cache-Key": job.cache_key,
        "X-Cache": started.cache,
    }
