"""OpenAI's Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}, and
GET /v1/responses/{id}/input_items.

A response runs on the same path as a chat completion (build_job, open_choices, the relay), so
cancellation, the prompt cache, batching and API-key tenants work the same. A finished response
(completed or incomplete) with ``store`` is written to the response store (app/store) before its
terminal event or its body goes out, keyed by the caller's tenant: a client told it is done can
read it back at once, and no tenant can read or chain another's.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import structlog
from quart import Response, g, request
from quart_trio import QuartTrio

from actors.messages import StreamDone, StreamError, StreamToken
from actors.metrics_events import MalformedToolCall
from app.http.body import parse_body
from app.http.choice_streams import collect, merged_events, open_choices
from app.http.context import ServerState
from app.http.errors import ApiError
from app.http.event_stream import sse_response
from app.http.jobs import build_job
from app.http.json_response import json_response
from app.http.response_store import StoreUnavailable
from app.http.responses_format import ResponseHead, ResponseWriter
from app.http.responses_limits import check_items_fit, check_store_share
from app.http.responses_schemas import RESPONSE_ID, Item, ResponsesRequest, chat_messages, new_id
from app.http.sse import sse_event
from app.http.streams import created_timestamp, off_loop, served_model, server_timing, stream_headers
from app.prompts.builder import PromptSpec
from app.store.responses import StoredResponse

log = structlog.get_logger("responses")
T = TypeVar("T")
STORED_STATUSES = ("completed", "incomplete")
MAX_LIST_LIMIT = 100


def _not_found(response_id: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"no response with id {response_id[:80]!r} is stored here", param=param, code="not_found")


def _store_unavailable() -> ApiError:
    # The shared store (Redis) is down: this request needs a stored response, others go on.
    return ApiError(
        503,
        "the response store is unavailable; stored responses cannot be read right now, try again shortly",
        code="store_unavailable",
        headers={"Retry-After": "1"},
    )


async def _needing_store(call: Awaitable[T]) -> T:
    """A store call this request cannot do without: the store down is a 503 for it alone."""
    try:
        return await call
    except StoreUnavailable:
        raise _store_unavailable() from None


async def _read(state: ServerState, response_id: str) -> StoredResponse | None:
    return await _needing_store(state.responses.get(g.get("tenant"), response_id))


class Turn:
    """One request's conversation: what came before, this input, and where it is stored."""

    def __init__(self, state: ServerState, body: ResponsesRequest, history: list[Item]) -> None:
        self.state = state
        self.body = body
        self.history = history
        self.input_items = body.input_items()
        self.tenant: str | None = g.get("tenant")

    async def store(self, writer: ResponseWriter) -> None:
        if not self.body.store or writer.status not in STORED_STATUSES:
            return
        stored = StoredResponse(writer.response(), self.input_items, self.history)
        try:
            await self.state.responses.put(self.tenant, stored)
        except Exception:  # the client still gets its answer; it cannot be retrieved or chained
            log.exception("response_store_failed", response_id=writer.head.id)


class ResponsesFramer:
    """The writer's typed events, each an SSE event named by its type; the terminal one last."""

    def __init__(self, writer: ResponseWriter) -> None:
        self._writer = writer

    @staticmethod
    def _framed(items: list[dict[str, Any]]) -> list[bytes]:
        return [sse_event(item["type"], item) for item in items]

    def opening(self) -> list[bytes]:
        return self._framed(self._writer.opening())

    def token(self, index: int, event: StreamToken) -> list[bytes]:
        return self._framed(self._writer.token(event))

    def done(self, index: int, event: StreamDone) -> list[bytes]:
        return self._framed(self._writer.done(event))

    def error(self, event: StreamError) -> list[bytes]:
        return self._framed(self._writer.error(event))

    def closing(self, complete: bool) -> list[bytes]:
        return self._framed(self._writer.closing())


def register(app: QuartTrio, state: ServerState) -> None:
    @app.post("/v1/responses")
    async def create_response() -> Response:
        received_at = time.monotonic()
        body = await parse_body(ResponsesRequest)
        model = served_model(state, body.model)
        try:
            structured = body.structured()
        except ValueError as error:
            raise ApiError(400, str(error), param="text.format", code="invalid_value") from None
        tools = body.tool_use()
        history: list[Item] = []
        if body.previous_response_id is not None:
            previous = await _read(state, body.previous_response_id)
            if previous is None:
                raise _not_found(body.previous_response_id, "previous_response_id")
            history = previous.conversation()
        turn = Turn(state, body, history)
        try:
            messages = chat_messages([*history, *turn.input_items])
        except ValueError as error:
            raise ApiError(400, str(error), param="input", code="invalid_value") from None
        if not messages:
            raise ApiError(400, "input holds no message to answer", param="input", code="invalid_value")
        spec = PromptSpec(
            messages=messages,
            reasoning_effort=(body.reasoning.effort if body.reasoning else None) or "medium",
            conversation_date=body.conversation_date,
            instructions=body.instructions,
            tools=tools.tools,
        )

        def build() -> Any:
            check_items_fit(model, turn.input_items)  # reasoning items too, which a prompt may leave out
            if body.store:
                check_store_share(turn.input_items, history, state.config.responses_max_bytes)
            return build_job(
                model,
                spec,
                body.sampling(),
                received_at=received_at,
                request_id=request.headers.get("X-Request-Id"),
                timeout_header=request.headers.get("X-Request-Timeout"),
                use_cache=body.cache,
                max_tokens_field="max_output_tokens",
                tenant=turn.tenant,
                structured=structured,
                tools=tools,
            )

        job = await off_loop(state, build)
        choices = await open_choices(state, [(job,)])
        choice = choices[0]
        head = ResponseHead(
            id=new_id("resp"),
            created_at=created_timestamp(),
            model=model.model_id,
            echo=body.echo(model.sampling_defaults),
            input_tokens=len(job.prompt),
            cached=choice.started.cache == "HIT",
        )

        def report_malformed(reason: str) -> None:
            state.pipeline.metrics.report(MalformedToolCall(job.client_request_id or head.id, reason))

        json_call = bool(tools.forced) and not model.harmony  # answered as {"name", "arguments"} JSON
        writer = ResponseWriter(head, tools.names, report_malformed, streaming=body.stream, json_call=json_call)
        headers = stream_headers(choice.handle, job, choice.started)
        group = merged_events(state, choices)
        if body.stream:
            # Stored before the terminal event goes out: a client told it is done can read it back.
            heartbeat = state.config.heartbeat_seconds
            return sse_response(group, ResponsesFramer(writer), heartbeat, headers, lambda: turn.store(writer))
        [(_, tokens, done)] = await collect(group)
        for token in tokens:
            writer.token(token)
        writer.done(done)
        headers["Server-Timing"] = server_timing(done.timings)
        await turn.store(writer)
        return json_response(writer.response(), headers=headers)

    async def _stored(response_id: str) -> StoredResponse:
        if not RESPONSE_ID.fullmatch(response_id):
            raise _not_found(response_id)
        found = await _read(state, response_id)
        if found is None:
            raise _not_found(response_id)
        return found

    @app.get("/v1/responses/<response_id>")
    async def get_response(response_id: str) -> Response:
        return json_response((await _stored(response_id)).response)

    @app.delete("/v1/responses/<response_id>")
    async def delete_response(response_id: str) -> Response:
        if not RESPONSE_ID.fullmatch(response_id):
            raise _not_found(response_id)
        if not await _needing_store(state.responses.delete(g.get("tenant"), response_id)):
            raise _not_found(response_id)
        return json_response({"id": response_id, "object": "response", "deleted": True})

    @app.get("/v1/responses/<response_id>/input_items")
    async def list_input_items(response_id: str) -> Response:
        order = request.args.get("order", "desc")
        if order not in ("asc", "desc"):
            raise ApiError(400, "order must be asc or desc", param="order", code="invalid_value")
        raw_limit = request.args.get("limit", "20")
        if not raw_limit.isascii() or not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIST_LIMIT:
            raise ApiError(400, f"limit must be 1 to {MAX_LIST_LIMIT}", param="limit", code="invalid_value")
        items = (await _stored(response_id)).input_items
        items = items if order == "asc" else items[::-1]
        after = request.args.get("after")
        if after is not None:
            ids = [item.get("id") for item in items]
            if after not in ids:
                raise ApiError(400, f"after names no input item of {response_id}", param="after", code="invalid_value")
            items = items[ids.index(after) + 1 :]
        page = items[: int(raw_limit)]
        return json_response(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(items) > len(page),
            }
        )
