"""POST /generate: the native endpoint. Named SSE events (start, token, done, error) or one JSON."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

from quart import Response, g, request
from quart_trio import QuartTrio

from actors.messages import GenerationJob, StreamDone, StreamError, StreamToken
from app.http.body import parse_body
from app.http.choice_streams import collect, merged_events, open_choices
from app.http.context import ServerState
from app.http.errors import ApiError
from app.http.event_stream import sse_response
from app.http.jobs import build_job
from app.http.json_response import json_response
from app.http.logprobs_format import native_fields
from app.http.schemas import GenerateRequest
from app.http.sse import sse_event
from app.http.streams import created_timestamp, off_loop, served_model, server_timing, stream_headers
from app.prompts.builder import PROMPT_VERSION


async def build_generate_job(state: ServerState, body: GenerateRequest, received_at: float) -> GenerationJob:
    model = served_model(state, body.model)
    if (body.messages is None) == (body.prompt is None):
        raise ApiError(400, "give exactly one of messages or prompt", param="messages", code="invalid_value")
    build = functools.partial(
        build_job,
        model,
        body.prompt_spec(body.messages, body.prompt),
        body,
        received_at=received_at,
        request_id=request.headers.get("X-Request-Id"),
        timeout_header=request.headers.get("X-Request-Timeout"),
        use_cache=body.cache,
        tenant=g.get("tenant"),
        structured=body,
    )
    return await off_loop(state, build)


def _token_data(event: StreamToken) -> dict[str, Any]:
    data: dict[str, Any] = {"text": event.text, "token_id": event.token_id, "index": event.index}
    if event.channel is not None:
        data["channel"] = event.channel
    if event.logprobs is not None:
        data |= native_fields(event.logprobs)
    return data


def _done_data(event: StreamDone, shown_id: str, replayed: bool) -> dict[str, Any]:
    usage = dataclasses.asdict(event.usage)
    usage["total_tokens"] = event.usage.total_tokens
    if replayed:  # a prompt-cache replay prefilled nothing: every prompt token was cached
        usage["cached_tokens"] = usage["prompt_tokens"]
    return {
        "request_id": shown_id,
        "finish_reason": event.finish_reason,
        "usage": usage,
        "timings": dataclasses.asdict(event.timings),
    }


class NativeFramer:
    """Named events: start, token (one per generated token), done or error (of its one choice)."""

    def __init__(self, start: dict[str, Any]) -> None:
        self._start = start

    def opening(self) -> list[bytes]:
        return [sse_event("start", self._start)]

    def token(self, index: int, event: StreamToken) -> list[bytes]:
        return [sse_event("token", _token_data(event))]

    def done(self, index: int, event: StreamDone) -> list[bytes]:
        return [sse_event("done", _done_data(event, self._start["request_id"], self._start["cached"]))]

    def error(self, event: StreamError) -> list[bytes]:
        return [sse_event("error", {"message": event.message, "type": "server_error", "code": event.code})]

    def closing(self, complete: bool) -> list[bytes]:
        return []


def register(app: QuartTrio, state: ServerState) -> None:
    @app.post("/generate")
    async def generate() -> Response:
        received_at = time.monotonic()
        body = await parse_body(GenerateRequest)
        job = await build_generate_job(state, body, received_at)
        choice = (await open_choices(state, [(job,)]))[0]  # a group of one, read as the others are
        handle, started = choice.handle, choice.started
        model = served_model(state, None)
        start = {
            "request_id": handle.shown_id,
            "model": model.model_id,
            "created": created_timestamp(),
            "prompt_tokens": len(job.prompt),
            "prompt_version": PROMPT_VERSION,
            "cache_key": job.cache_key,
            "cached": started.cache == "HIT",
        }
        headers = stream_headers(handle, job, started)
        group = merged_events(state, [choice])
        if body.stream:
            return sse_response(group, NativeFramer(start), state.config.heartbeat_seconds, headers)
        [(_, tokens, done)] = await collect(group)
        text = "".join(t.text for t in tokens if t.channel != "analysis")
        result = {**start, "text": text, **_done_data(done, handle.shown_id, start["cached"])}
        if model.harmony:
            result["reasoning"] = "".join(t.text for t in tokens if t.channel == "analysis")
        if job.params.logprobs is not None:
            # one per generated token, as the stream's token events
            result["logprobs"] = [
                {"token_id": t.token_id, **native_fields(t.logprobs)} for t in tokens if t.logprobs is not None
            ]
        headers["Server-Timing"] = server_timing(done.timings)
        return json_response(result, headers=headers)
