"""One /v1/responses generation as OpenAI's Response object and its typed stream events. Pure.

gpt-oss's analysis channel becomes a ``reasoning`` item (``reasoning_text`` content), the rest an
assistant ``message`` item (``output_text``). The writer is fed the stream's events in order and
gives, for each, the SSE events it makes (``type`` and a strictly increasing ``sequence_number``);
a response that is not streamed is the same writer's final object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from actors.messages import StreamDone, StreamError, StreamToken
from app.http.responses_schemas import new_id

Item = dict[str, Any]
Event = dict[str, Any]
Status = Literal["in_progress", "completed", "incomplete", "failed", "cancelled"]
ItemKind = Literal["reasoning", "message"]
TERMINAL_EVENTS = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "failed": "response.failed",
    "cancelled": "response.failed",  # OpenAI has no event of its own for it
}


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """What the response object holds from the start: who it is and what was asked."""

    id: str
    created_at: int
    model: str
    echo: dict[str, Any]  # the request's fields the object repeats (ResponsesRequest.echo)
    input_tokens: int
    cached: bool  # served from the prompt cache: every input token was cached


@dataclass(slots=True)
class _OpenItem:
    kind: ItemKind
    id: str
    index: int
    text: list[str] = field(default_factory=list)


def status_of(done: StreamDone) -> tuple[Status, dict[str, Any] | None, dict[str, Any] | None]:
    """The response's status, its incomplete_details and its error, from how the stream ended."""
    match done.finish_reason:
        case "stop":
            return "completed", None, None
        case "length":
            return "incomplete", {"reason": "max_output_tokens"}, None
        case "timeout":
            return "incomplete", {"reason": "timeout"}, None
        case "cancelled" | "shutdown":
            message = f"the generation ended early ({done.finish_reason})"
            return "cancelled", None, {"code": done.finish_reason, "message": message}
        case _:
            return "failed", None, {"code": "server_error", "message": "the generation failed"}


class ResponseWriter:
    def __init__(self, head: ResponseHead) -> None:
        self.head = head
        self.status: Status = "in_progress"
        self.output: list[Item] = []
        self._open: _OpenItem | None = None
        self._sequence = 0
        self._output_tokens = 0
        self._reasoning_tokens = 0
        self._incomplete: dict[str, Any] | None = None
        self._error: dict[str, Any] | None = None

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def response(self) -> dict[str, Any]:
        done = self.status != "in_progress"
        body: dict[str, Any] = {
            "id": self.head.id,
            "object": "response",
            "created_at": self.head.created_at,
            "model": self.head.model,
            "status": self.status,
            "error": self._error,
            "incomplete_details": self._incomplete,
            "output": list(self.output) if done else [],
            "usage": self.usage() if done else None,
            **self.head.echo,
        }
        return body

    def usage(self) -> dict[str, Any]:
        return {
            "input_tokens": self.head.input_tokens,
            "input_tokens_details": {
                "cached_tokens": self.head.input_tokens if self.head.cached else 0,
                "cache_write_tokens": 0,
            },
            "output_tokens": self._output_tokens,
            "output_tokens_details": {"reasoning_tokens": self._reasoning_tokens},
            "total_tokens": self.head.input_tokens + self._output_tokens,
        }

    def opening(self) -> list[Event]:
        snapshot = self.response()
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def token(self, token: StreamToken) -> list[Event]:
        self._output_tokens = token.index + 1
        kind: ItemKind = "reasoning" if token.channel == "analysis" else "message"
        if kind == "reasoning":
            self._reasoning_tokens += 1
        if not token.text:
            return []
        events = []
        if self._open is None or self._open.kind != kind:
            events += self._close_item("completed")
            events += self._open_item(kind)
        assert self._open is not None
        self._open.text.append(token.text)
        where = {"item_id": self._open.id, "output_index": self._open.index, "content_index": 0}
        if kind == "reasoning":
            events.append(self._event("response.reasoning_text.delta", **where, delta=token.text))
        else:
            events.append(self._event("response.output_text.delta", **where, delta=token.text, logprobs=[]))
        return events

    def _open_item(self, kind: ItemKind) -> list[Event]:
        item = _OpenItem(kind, new_id("rs" if kind == "reasoning" else "msg"), len(self.output))
        self._open = item
        self.output.append(self._item(item, "in_progress", empty=True))
        where = {"item_id": item.id, "output_index": item.index, "content_index": 0}
        return [
            self._event("response.output_item.added", output_index=item.index, item=self.output[-1]),
            self._event("response.content_part.added", **where, part=self._part(kind, "")),
        ]

    def _close_item(self, status: Status) -> list[Event]:
        item, self._open = self._open, None
        if item is None:
            return []
        text = "".join(item.text)
        finished = self._item(item, "completed" if status == "completed" else "incomplete", empty=False)
        self.output[item.index] = finished
        where = {"item_id": item.id, "output_index": item.index, "content_index": 0}
        if item.kind == "reasoning":
            text_done = self._event("response.reasoning_text.done", **where, text=text)
        else:
            text_done = self._event("response.output_text.done", **where, text=text, logprobs=[])
        return [
            text_done,
            self._event("response.content_part.done", **where, part=self._part(item.kind, text)),
            self._event("response.output_item.done", output_index=item.index, item=finished),
        ]

    @staticmethod
    def _part(kind: ItemKind, text: str) -> Item:
        if kind == "reasoning":
            return {"type": "reasoning_text", "text": text}
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _item(self, item: _OpenItem, status: str, *, empty: bool) -> Item:
        content = [] if empty else [self._part(item.kind, "".join(item.text))]
        if item.kind == "reasoning":
            return {"id": item.id, "type": "reasoning", "summary": [], "content": content, "status": status}
        return {"id": item.id, "type": "message", "role": "assistant", "status": status, "content": content}

    def done(self, done: StreamDone) -> list[Event]:
        self._output_tokens = done.usage.completion_tokens
        status, self._incomplete, self._error = status_of(done)
        events = self._close_item(status)
        self.status = status
        return events

    def error(self, error: StreamError) -> list[Event]:
        events = self._close_item("failed")
        self.status = "failed"
        self._error = {"code": error.code, "message": error.message}
        return events

    def closing(self) -> list[Event]:
        """The terminal event, once done() or error() has been fed."""
        return [self._event(TERMINAL_EVENTS.get(self.status, "response.failed"), response=self.response())]
