"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import dataclasses
import functools
import time
import uuid
from collections.abc import Sequence
from typing import Any

from quart import Response, g, request
from quart_trio import QuartTrio

from actors.messages import GenerationJob, StreamDone, StreamError, StreamToken
from actors.metrics_events import MalformedToolCall
from app.contract.model import CallSyntax
from app.http.body import parse_body
from app.http.choice_jobs import build_choice_jobs, check_choice_count
from app.http.choice_streams import collect, merged_events, open_choices
from app.http.context import ServerState
from app.http.errors import error_body
from app.http.event_stream import sse_response
from app.http.json_response import json_response
from app.http.openai_format import ChunkWriter, Kind, ResponseMeta, full_response
from app.http.schemas import ChatCompletionRequest, CompletionRequest, OpenAIFields
from app.http.sse import sse_event
from app.http.streams import created_timestamp, off_loop, served_model, server_timing, stream_headers
from app.prompts.builder import PROMPT_VERSION, PromptSpec

DONE_LINE = b"data: [DONE]\n\n"


class OpenAIFramer:
    """OpenAI's chunk objects as unnamed SSE events, each for one choice; then the usage chunk (if
    asked for, once every choice has finished) and ``data: [DONE]``."""

    def __init__(self, writer: ChunkWriter, indexes: Sequence[int]) -> None:
        self._writer = writer
        self._indexes = indexes

    def opening(self) -> list[bytes]:
        return [sse_event(None, chunk) for index in self._indexes for chunk in self._writer.opening(index)]

    def token(self, index: int, event: StreamToken) -> list[bytes]:
        return [sse_event(None, chunk) for chunk in self._writer.token(event, index)]

    def done(self, index: int, event: StreamDone) -> list[bytes]:
        return [sse_event(None, chunk) for chunk in self._writer.closing(event, index)]

    def error(self, event: StreamError) -> list[bytes]:
        return [sse_event(None, error_body(500, event.message, code=event.code))]

    def closing(self, complete: bool) -> list[bytes]:
        usage = self._writer.usage() if complete else []
        return [*(sse_event(None, chunk) for chunk in usage), DONE_LINE]


async def _respond(
    state: ServerState,
    kind: Kind,
    body: OpenAIFields,
    groups: list[tuple[GenerationJob, ...]],
    model: Any,
    id_prefix: str,
    tool_names: frozenset[str] = frozenset(),
    json_call: bool = False,
    call_syntax: CallSyntax | None = None,
) -> Response:
    """Open every choice (``groups``: per prompt, its n choices' jobs) and answer with all of them."""
    choices = await open_choices(state, groups)
    first = choices[0]  # the headers and the cache fields describe choice 0
    response_id = f"{id_prefix}-{uuid.uuid4().hex}"

    def report_malformed(reason: str) -> None:
        state.pipeline.metrics.report(MalformedToolCall(first.job.client_request_id or response_id, reason))

    meta = ResponseMeta(
        id=response_id,
        created=created_timestamp(),
        model=model.model_id,
        prompt_tokens=sum(len(jobs[0].prompt) for jobs in groups),
        n=len(groups[0]),
        prompt_version=PROMPT_VERSION,
        cache_key=first.job.cache_key,
        cached=first.started.cache == "HIT",
        reasoning=first.job.text_mode == "harmony",
        logprobs=first.job.params.logprobs is not None,
        tool_names=tool_names,
        report_malformed=report_malformed,
        json_call=json_call,
        call_syntax=call_syntax,
    )
    headers = stream_headers(first.handle, first.job, first.started)
    group = merged_events(state, choices)
    if body.stream:
        options = body.stream_options
        writer = ChunkWriter(
            kind,
            meta,
            include_usage=bool(options and options.include_usage),
            continuous_usage=bool(options and options.continuous_usage_stats),
        )
        framer = OpenAIFramer(writer, [choice.index for choice in choices])
        return sse_response(group, framer, state.config.heartbeat_seconds, headers)
    results = await collect(group)
    headers["Server-Timing"] = server_timing(results[0][2].timings)
    return json_response(full_response(kind, meta, results), headers=headers)


def _raw_prompt_spec(body: CompletionRequest, prompt: str | tuple[int, ...]) -> PromptSpec:
    spec = body.prompt_spec(None, prompt if isinstance(prompt, str) else None)
    return spec if isinstance(prompt, str) else dataclasses.replace(spec, token_ids=prompt)


def register(app: QuartTrio, state: ServerState) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        received_at = time.monotonic()
        body = await parse_body(ChatCompletionRequest)
        model = served_model(state, body.model)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        build = functools.partial(
            build_choice_jobs,
            model,
            [body.prompt_spec(body.messages, None)],
            body.model_copy(update={"max_tokens": max_tokens}),
            body.n or 1,
            received_at=received_at,
            request_id=request.headers.get("X-Request-Id"),
            timeout_header=request.headers.get("X-Request-Timeout"),
            use_cache=body.cache,
            tenant=g.get("tenant"),
            structured=body,
            max_tokens_field=body.effective_max_tokens_field(),
            tools=body.tool_use(),
            reads_template_calls=True,
        )
        groups = await off_loop(state, build)
        tools = body.tool_use()
        json_call = bool(tools.forced) and not model.harmony  # answered as {"name", "arguments"} JSON
        # tool_choice auto without Harmony: calls in the chat template's syntax (build_job checked it has one)
        auto_calls = bool(tools.tools) and not tools.forced and not model.harmony
        syntax = model.tool_call_syntax if auto_calls else None
        return await _respond(state, "chat", body, groups, model, "chatcmpl", tools.names, json_call, syntax)

    @app.post("/v1/completions")
    async def completions() -> Response:
        received_at = time.monotonic()
        body = await parse_body(CompletionRequest)
        model = served_model(state, body.model)
        n = body.n or 1
        check_choice_count(len(body.prompts()), n)  # before any tokenizing
        build = functools.partial(
            build_choice_jobs,
            model,
            [_raw_prompt_spec(body, prompt) for prompt in body.prompts()],
            body,
            n,
            received_at=received_at,
            request_id=request.headers.get("X-Request-Id"),
            timeout_header=request.headers.get("X-Request-Timeout"),
            use_cache=body.cache,
            tenant=g.get("tenant"),
            structured=body,
        )
        groups = await off_loop(state, build)
        return await _respond(state, "completion", body, groups, model, "cmpl")

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
        return json_response({"object": "list", "data": [_model_card(model)]})

    @app.get("/v1/models/<path:model_id>")
    async def get_model(model_id: str) -> Response:
        return json_response(_model_card(served_model(state, model_id)))
