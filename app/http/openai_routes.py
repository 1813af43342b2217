"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import functools
import json
import time
import uuid
from typing import Any

from quart import Response, g, request
from quart_trio import QuartTrio

from actors.messages import GenerationJob, StreamDone, StreamError, StreamToken
from app.http.body import parse_body
from app.http.context import ServerState
from app.http.errors import ApiError, error_body
from app.http.jobs import build_job
from app.http.openai_format import ChunkWriter, Kind, ResponseMeta, full_response
from app.http.schemas import ChatCompletionRequest, CompletionRequest, OpenAIFields
from app.http.sse import sse_event
from app.http.streams import (
    created_timestamp,
    off_loop,
    open_stream,
    served_model,
    server_timing,
    sse_response,
    stream_headers,
)
from app.prompts.builder import PROMPT_VERSION

DONE_LINE = b"data: [DONE]\n\n"


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(data, ensure_ascii=False), status=status, content_type="application/json", headers=headers
    )


class OpenAIFramer:
    """OpenAI's chunk objects as unnamed SSE events, then ``data: [DONE]``."""

    def __init__(self, writer: ChunkWriter) -> None:
        self._writer = writer

    def opening(self) -> list[bytes]:
        return [sse_event(None, chunk) for chunk in self._writer.opening()]

    def token(self, event: StreamToken) -> list[bytes]:
        return [sse_event(None, chunk) for chunk in self._writer.token(event)]

    def done(self, event: StreamDone) -> list[bytes]:
        return [sse_event(None, chunk) for chunk in self._writer.closing(event)]

    def error(self, event: StreamError) -> list[bytes]:
        return [sse_event(None, error_body(500, event.message, code=event.code))]

    def closing(self) -> list[bytes]:
        return [DONE_LINE]


async def _respond(
    state: ServerState, kind: Kind, body: OpenAIFields, job: GenerationJob, model: Any, id_prefix: str
) -> Response:
    handle, started = await open_stream(state, job)
    meta = ResponseMeta(
        id=f"{id_prefix}-{uuid.uuid4().hex}",
        created=created_timestamp(),
        model=model.model_id,
        prompt_tokens=len(job.prompt),
        prompt_version=PROMPT_VERSION,
        cache_key=job.cache_key,
        cached=started.cache == "HIT",
        reasoning=job.text_mode == "harmony",
        logprobs=job.params.logprobs is not None,
    )
    headers = stream_headers(handle, job, started)
    if body.stream:
        options = body.stream_options
        writer = ChunkWriter(
            kind,
            meta,
            include_usage=bool(options and options.include_usage),
            continuous_usage=bool(options and options.continuous_usage_stats),
        )
        return sse_response(handle, OpenAIFramer(writer), state.config.heartbeat_seconds, headers)
    tokens: list[StreamToken] = []
    async for event in handle:
        match event:
            case StreamToken():
                tokens.append(event)
            case StreamError():
                raise ApiError(500, event.message, code=event.code)
            case StreamDone():
                headers["Server-Timing"] = server_timing(event.timings)
                return _json(full_response(kind, meta, tokens, event), headers=headers)
    raise ApiError(500, "the generation stream ended without a result", code="stream_lost")


def register(app: QuartTrio, state: ServerState) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        received_at = time.monotonic()
        body = await parse_body(ChatCompletionRequest)
        model = served_model(state, body.model)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        build = functools.partial(
            build_job,
            model,
            body.prompt_spec(body.messages, None),
            body.model_copy(update={"max_tokens": max_tokens}),
            received_at=received_at,
            request_id=request.headers.get("X-Request-Id"),
            timeout_header=request.headers.get("X-Request-Timeout"),
            use_cache=body.cache,
            tenant=g.get("tenant"),
            structured=body,
            max_tokens_field=body.effective_max_tokens_field(),
        )
        job = await off_loop(state, build)
        return await _respond(state, "chat", body, job, model, "chatcmpl")

    @app.post("/v1/completions")
    async def completions() -> Response:
        received_at = time.monotonic()
        body = await parse_body(CompletionRequest)
        model = served_model(state, body.model)
        build = functools.partial(
            build_job,
            model,
            body.prompt_spec(None, body.prompt_text()),
            body,
            received_at=received_at,
            request_id=request.headers.get("X-Request-Id"),
            timeout_header=request.headers.get("X-Request-Timeout"),
            use_cache=body.cache,
            tenant=g.get("tenant"),
            structured=body,
        )
        job = await off_loop(state, build)
        return await _respond(state, "completion", body, job, model, "cmpl")

    def _model_card(model: Any) -> dict[str, Any]:
        return {
            "id": model.model_id,
            "object": "model",
            "created": int(time.time() - (state.pipeline.clock() - state.pipeline.started_at)),
            "owned_by": "gptoss-hf-server",
            "max_model_len": model.max_context,
        }

    @app.get("/v1/models")
    async def list_models() -> Response:
        model = served_model(state, None)
        return _json({"object": "list", "data": [_model_card(model)]})

    @app.get("/v1/models/<path:model_id>")
    async def get_model(model_id: str) -> Response:
        return _json(_model_card(served_model(state, model_id)))
