"""One /v1/responses generation as OpenAI's Response object and its typed stream events. Pure.

gpt-oss's analysis channel becomes a ``reasoning`` item (``reasoning_text`` content), the rest an
assistant ``message`` item (``output_text``), and each call to a function the request offered a
``function_call`` item (its arguments streamed as ``response.function_call_arguments.delta``;
a namespace tool's function is named by ``namespace`` and ``name``, as OpenAI's items are). A
call the request cannot take (app.http.tool_calls: an unknown function, or arguments that are not
a JSON object) is reported and, as on chat, its text is the message's: an unknown function at
once; arguments found broken at the call's end are message text when not streamed, and, having
been streamed already, a function_call item with status ``incomplete``. A forced call on a model
without Harmony (``json_call``) is its answer's JSON ``{"name": ..., "arguments": {...}}``
(app.http.tool_calls' JsonCallStream): the item opens once the name is whole, and its arguments
stream but for the object's closing brace. With ``seal`` (the request's ``include`` asks for
``reasoning.encrypted_content``) each finished reasoning item carries its text sealed for the
caller (app.store.reasoning_seal), to be sent back in when nothing is stored.

The writer is fed the stream's events in order and gives, for each, the SSE events it makes
(``type`` and a strictly increasing ``sequence_number``); a response that is not streamed is the
same writer's final object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from actors.messages import StreamDone, StreamError, StreamToken
from app.http.responses_schemas import new_id
from app.http.tool_calls import JSON_CALL_HEAD, called_function, new_call_id, parse_json_call
from app.text.template_calls import MalformedReport, is_json_object

Item = dict[str, Any]
Event = dict[str, Any]
Status = Literal["in_progress", "completed", "incomplete", "failed", "cancelled"]
ItemKind = Literal["reasoning", "message", "function_call"]
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
    name: str = ""  # a function_call's function, by its qualified name (NAMESPACE.NAME in a namespace)
    call_id: str = ""
    message: int | None = None  # a function_call's Harmony message


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
    def __init__(
        self,
        head: ResponseHead,
        tool_names: frozenset[str] = frozenset(),
        report_malformed: MalformedReport = lambda why: None,
        *,
        streaming: bool = False,
        json_call: bool = False,
        seal: Callable[[str], str] | None = None,
    ) -> None:
        self.head = head
        self.seal = seal
        self.json_call = json_call
        self._json_text = ""  # a JSON call's answer so far
        self._json_sent = 0  # its characters given out (the head, then arguments)
        self.tool_names = tool_names
        self.report_malformed = report_malformed
        self.streaming = streaming
        self._malformed_message: int | None = None  # the Harmony message of an unknown function's call
        self.status: Status = "in_progress"
        self.output: list[Item] = []
        self._open: _OpenItem | None = None
        self._sequence = 0
        self._output_tokens = 0
        self._cached_tokens = 0  # input tokens the prefix KV cache reused (from the stream's end)
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
                # A prompt-cache replay reused everything; otherwise what the prefix KV cache reused.
                "cached_tokens": self.head.input_tokens if self.head.cached else self._cached_tokens,
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
        if token.recipient is not None:
            call = self._call_token(token)
            if call is not None:
                return call
        if not token.text:
            return []
        if self.json_call and kind == "message":
            return self._json_call_text(token.text)
        return self._text(kind, token.text)

    def _text(self, kind: ItemKind, text: str) -> list[Event]:
        events = []
        if self._open is None or self._open.kind != kind:
            events += self._close_item("completed")
            events += self._open_item(kind)
        assert self._open is not None
        self._open.text.append(text)
        where = {"item_id": self._open.id, "output_index": self._open.index, "content_index": 0}
        if kind == "reasoning":
            events.append(self._event("response.reasoning_text.delta", **where, delta=text))
        else:
            events.append(self._event("response.output_text.delta", **where, delta=text, logprobs=[]))
        return events

    def _call_token(self, token: StreamToken) -> list[Event] | None:
        """A tool-addressed token's events; None: it is a malformed call's text, the message's."""
        if self._open is not None and self._open.kind == "function_call" and self._open.message == token.message:
            return self._arguments(token.text)
        if token.message == self._malformed_message:
            return None
        name = called_function(token.recipient)
        if name is None or name not in self.tool_names:
            self._malformed_message = token.message
            self.report_malformed("unknown_function")
            return None
        events = self._close_item("completed")
        item = _OpenItem("function_call", new_id("fc"), len(self.output), name=name, call_id=new_call_id())
        item.message = token.message
        self._open = item
        self.output.append(self._item(item, "in_progress", empty=True))
        events.append(self._event("response.output_item.added", output_index=item.index, item=self.output[-1]))
        return events + self._arguments(token.text)

    def _json_call_text(self, text: str) -> list[Event]:
        self._json_text += text
        events: list[Event] = []
        if self._open is None or self._open.kind != "function_call":
            head = JSON_CALL_HEAD.match(self._json_text)
            if head is None:
                return []
            events += self._close_item("completed")
            item = _OpenItem("function_call", new_id("fc"), len(self.output), name=head.group(1), call_id=new_call_id())
            self._open, self._json_sent = item, head.end()
            self.output.append(self._item(item, "in_progress", empty=True))
            events.append(self._event("response.output_item.added", output_index=item.index, item=self.output[-1]))
        fragment = self._json_text[self._json_sent : len(self._json_text) - 1]
        self._json_sent += len(fragment)
        return events + self._arguments(fragment)

    def _json_call_end(self, status: Status) -> list[Event]:
        """At the answer's end: its last characters join the arguments when the whole is the call;
        an answer that never named a function is message text (counted, as on chat)."""
        item = self._open
        if item is None or item.kind != "function_call":
            text, self._json_text = self._json_text, ""
            if not text:
                return []
            self.report_malformed("invalid_arguments")
            return self._text("message", text)
        if parse_json_call(self._json_text) is None:
            if not self.streaming:  # as chat answers it: the whole answer is the message's text
                self._open = None
                self.report_malformed("invalid_arguments")
                message = _OpenItem("message", new_id("msg"), item.index, [self._json_text])
                shown = "completed" if status == "completed" else "incomplete"
                self.output[item.index] = self._item(message, shown, empty=False)
            return []  # streamed: _close_call finds the arguments broken
        return self._arguments(self._json_text[self._json_sent :].rstrip()[:-1].rstrip())

    def _arguments(self, text: str) -> list[Event]:
        assert self._open is not None
        if not text:
            return []
        self._open.text.append(text)
        where = {"item_id": self._open.id, "output_index": self._open.index}
        return [self._event("response.function_call_arguments.delta", **where, delta=text)]

    def _close_call(self, item: _OpenItem, status: Status) -> list[Event]:
        arguments = "".join(item.text)
        whole = is_json_object(arguments)
        if not whole:
            self.report_malformed("invalid_arguments")
            if not self.streaming:  # as chat answers it: the call's text is the message's
                text = _OpenItem("message", new_id("msg"), item.index, [arguments])
                self.output[item.index] = self._item(text, "completed", empty=False)
                return []
        finished = self._item(item, "completed" if status == "completed" and whole else "incomplete", empty=False)
        self.output[item.index] = finished
        where = {"item_id": item.id, "output_index": item.index}
        return [
            self._event("response.function_call_arguments.done", **where, arguments=arguments),
            self._event("response.output_item.done", output_index=item.index, item=finished),
        ]

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
        if item.kind == "function_call":
            return self._close_call(item, status)
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
        if item.kind == "function_call":
            arguments = "" if empty else "".join(item.text)
            namespace, _, name = item.name.rpartition(".")
            call = {
                "id": item.id,
                "type": "function_call",
                "status": status,
                "call_id": item.call_id,
                "name": name,
                "arguments": arguments,
            }
            return call | {"namespace": namespace} if namespace else call
        content = [] if empty else [self._part(item.kind, "".join(item.text))]
        if item.kind == "reasoning":
            reasoning = {"id": item.id, "type": "reasoning", "summary": [], "content": content, "status": status}
            if self.seal is None or empty:
                return reasoning
            return reasoning | {"encrypted_content": self.seal("".join(item.text))}
        return {"id": item.id, "type": "message", "role": "assistant", "status": status, "content": content}

    def done(self, done: StreamDone) -> list[Event]:
        self._output_tokens = done.usage.completion_tokens
        self._cached_tokens = min(done.usage.cached_tokens, self.head.input_tokens)
        status, self._incomplete, self._error = status_of(done)
        events = self._json_call_end(status) if self.json_call else []
        events += self._close_item(status)
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
