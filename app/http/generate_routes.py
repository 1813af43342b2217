"""POST /generate: the native endpoint. Named SSE events (start, token, done, error) or one JSON."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from quart import Response, request
from quart_trio import QuartTrio

from actors.messages import StreamDone, StreamError, StreamToken
from actors.pipeline import GenerationJob, StreamHandle
from app.http.body import parse_body
from app.http.errors import ApiError
from app.http.sse import SSE_HEADERS, sse_comment, sse_event
from app.http.streams import Heartbeat, created_timestamp, events_with_heartbeats, open_stream
from app.jobs import deadline, prompt_tokens, sampling_params
from app.prompts.builder import PromptSpec
from app.schemas import GenerateRequest
from app.server import ServerState


def _served_model(state: ServerState) -> Any:
    model = state.pipeline.model
    if model is None:
        raise ApiError(
            503,
            f"the server is not ready: {state.pipeline.state}",
            code=state.pipeline.state,
            headers={"Retry-After": "5"},
        )
    return model


def build_generate_job(state: ServerState, body: GenerateRequest, received_at: float) -> GenerationJob:
    model = _served_model(state)
    if body.model is not None and body.model not in (model.model_id, *model.aliases):
        raise ApiError(
            404,
            f"model {body.model!r} is not served here (this server runs {model.model_id})",
            param="model",
            code="model_not_found",
        )
    if (body.messages is None) == (body.prompt is None):
        raise ApiError(422, "give exactly one of messages or prompt", param="messages")
    spec = PromptSpec(
        messages=tuple(m.to_chat() for m in body.messages) if body.messages else None,
        prompt=body.prompt,
        reasoning_effort=body.reasoning_effort or "medium",
    )
    tokens = prompt_tokens(spec, model.tokenizer, model.harmony)
    params = sampling_params(body, len(tokens), model.max_context)
    return GenerationJob(
        prompt=tokens,
        params=params,
        received_at=received_at,
        request_id=request.headers.get("X-Request-Id", ""),
        deadline=deadline(received_at, body.timeout, request.headers.get("X-Request-Timeout")),
    )


def _token_data(event: StreamToken) -> dict[str, Any]:
    data: dict[str, Any] = {"text": event.text, "token_id": event.token_id, "index": event.index}
    if event.channel is not None:
        data["channel"] = event.channel
    return data


def _done_data(event: StreamDone) -> dict[str, Any]:
    usage = dataclasses.asdict(event.usage)
    usage["total_tokens"] = event.usage.total_tokens
    return {
        "request_id": event.request_id,
        "finish_reason": event.finish_reason,
        "usage": usage,
        "timings": dataclasses.asdict(event.timings),
    }


async def _sse_body(handle: StreamHandle, start: dict[str, Any], heartbeat: float) -> AsyncIterator[bytes]:
    try:
        yield sse_event("start", start)
        async with aclosing(events_with_heartbeats(handle, heartbeat)) as events:
            async for event in events:
                match event:
                    case Heartbeat():
                        yield sse_comment("keep-alive")
                    case StreamToken():
                        yield sse_event("token", _token_data(event))
                    case StreamDone():
                        yield sse_event("done", _done_data(event))
                    case StreamError():
                        yield sse_event("error", {"message": event.message, "type": event.error_type})
    finally:
        handle.abort()  # synchronous; a no-op once the stream has finished


def register(app: QuartTrio, state: ServerState) -> None:
    @app.post("/generate")
    async def generate() -> Response:
        received_at = time.monotonic()
        body = await parse_body(GenerateRequest)
        job = build_generate_job(state, body, received_at)
        handle, _ = await open_stream(state, job)
        model = _served_model(state)
        start = {
            "request_id": handle.request_id,
            "model": model.model_id,
            "created": created_timestamp(),
            "prompt_tokens": len(job.prompt),
        }
        headers = {"X-Request-Id": handle.request_id}
        if body.stream:
            response = Response(
                _sse_body(handle, start, state.config.heartbeat_seconds), headers={**SSE_HEADERS, **headers}
            )
            response.timeout = None  # Quart would cut the body at 60 s otherwise
            return response
        text: list[str] = []
        reasoning: list[str] = []
        async for event in handle:
            match event:
                case StreamToken():
                    (reasoning if event.channel == "analysis" else text).append(event.text)
                case StreamError():
                    raise ApiError(500, f"generation failed: {event.message}", code=event.error_type)
                case StreamDone():
                    result = {**start, "text": "".join(text), **_done_data(event)}
                    if model.harmony:
                        result["reasoning"] = "".join(reasoning)
                    return Response(
                        json.dumps(result, ensure_ascii=False), content_type="application/json", headers=headers
                    )
        raise ApiError(500, "the generation stream ended without a result", code="stream_lost")
