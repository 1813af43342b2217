"""gpt-oss's tool calls in OpenAI's shapes: ``message.tool_calls``, and ``delta.tool_calls`` as
they stream. Pure.

A call is a Harmony message to ``functions.NAME``, or ``NAMESPACE.NAME`` for a function in a
namespace of the request's own (app.text.harmony_text names the recipient of each piece of text).
A call the request cannot take is *malformed*: a function it did not offer (``python``,
``browser.search``, a name not in ``tools``) or, once the call is complete, arguments that are
not a JSON object. It is never dropped and never a 500: its text is the answer's ``content``
(finish_reason ``stop``, or ``length`` as the output ended), and it is counted in /metrics and
/stats. Streamed, an unknown function is known at the call's header, so its text streams as
content; arguments that turn out not to be JSON have gone out as fragments already,
so the stream ends with finish_reason ``stop`` instead of ``tool_calls`` (and is counted).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from actors.messages import StreamToken
from app.contract.model import CallSyntax
from app.text.template_calls import (
    CallArguments,
    CallEnded,
    CallOpened,
    CallParser,
    Event,
    MalformedReport,
    ReadCall,
    Words,
    is_json_object,
    read_answer,
)

FUNCTIONS = "functions."


def new_call_id() -> str:
    """OpenAI's shape; fresh for every response (a cache replay too), since clients key on it."""
    return f"call_{uuid.uuid4().hex[:24]}"


def called_function(recipient: str | None) -> str | None:
    """The qualified name (app.prompts.builder's ToolSpec) of the function a recipient calls:
    ``NAME`` for ``functions.NAME``, ``NAMESPACE.NAME`` as it is; None for a recipient that names
    no function (``python``, ``assistant``)."""
    if recipient is None:
        return None
    if recipient.startswith(FUNCTIONS):
        return recipient[len(FUNCTIONS) :]
    namespace, dot, name = recipient.partition(".")
    return recipient if namespace and dot and name else None


def is_call_text(token: StreamToken) -> bool:
    """The token's text is addressed to a tool (a call's arguments), not to the user."""
    return token.recipient is not None


@dataclass(frozen=True, slots=True)
class CallsAndText:
    calls: tuple[ReadCall, ...]
    malformed_text: str  # the text of malformed calls: it joins the content


def split_calls(tokens: Sequence[StreamToken], names: frozenset[str], report: MalformedReport) -> CallsAndText:
    """The calls in a finished output, in order; malformed ones as text (each reported once)."""
    messages: dict[int, tuple[str | None, list[str]]] = {}
    for token in tokens:
        if is_call_text(token):
            messages.setdefault(token.message, (token.recipient, []))[1].append(token.text)
    calls, malformed = [], []
    for recipient, parts in messages.values():
        name, arguments = called_function(recipient), "".join(parts)
        if name is None or name not in names:
            report("unknown_function")
            malformed.append(arguments)
        elif not is_json_object(arguments):
            report("invalid_arguments")
            malformed.append(arguments)
        else:
            calls.append(ReadCall(name, arguments))
    return CallsAndText(tuple(calls), "".join(malformed))


def tool_calls_body(calls: Sequence[ReadCall]) -> list[dict[str, Any]]:
    return [
        {"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
    ]


@dataclass(slots=True)
class CallStream:
    """One streamed choice's calls: which message is open, what each call has said so far."""

    names: frozenset[str]
    report: MalformedReport
    message: int | None = None  # the Harmony message now open, if it is addressed to a tool
    malformed_open: bool = False  # it is a call the request cannot take: its text is content
    arguments: list[list[str]] = field(default_factory=list)  # per call sent, its fragments

    def delta(self, token: StreamToken) -> dict[str, Any] | None:
        """The chunk delta for a tool-addressed token (None: nothing to send)."""
        if token.message != self.message:
            self.message = token.message
            name = called_function(token.recipient)
            self.malformed_open = name is None or name not in self.names
            if self.malformed_open:
                self.report("unknown_function")
            else:
                self.arguments.append([token.text])
                opened = {"index": len(self.arguments) - 1, "id": new_call_id(), "type": "function"}
                return {"tool_calls": [opened | {"function": {"name": name, "arguments": token.text}}]}
        if not token.text:
            return None
        if self.malformed_open:
            return {"content": token.text}
        self.arguments[-1].append(token.text)
        return {"tool_calls": [{"index": len(self.arguments) - 1, "function": {"arguments": token.text}}]}

    def finish_reason(self, reason: str) -> str:
        """``tool_calls`` when the output stopped after calls that are all whole JSON."""
        if not self.arguments or reason != "stop":
            return reason
        broken = [parts for parts in self.arguments if not is_json_object("".join(parts))]
        for _ in broken:
            self.report("invalid_arguments")
        return reason if broken else "tool_calls"


# A model without Harmony, forced to call (tool_choice required or named): its whole answer is
# the JSON {"name": ..., "arguments": {...}} under a grammar (app.http.jobs), answered as a call.
JSON_CALL_HEAD = re.compile(r'\{"name":\s*"([A-Za-z0-9_-]{1,64}(?:\.[A-Za-z0-9_-]{1,64})?)",\s*"arguments":\s*')


def json_call_schema(tools: Sequence[tuple[str, str]]) -> str:
    """The grammar's schema for (name, parameters schema) pairs: one object per allowed tool."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": json.loads(schema)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, schema in tools
    ]
    chosen = options[0] if len(options) == 1 else {"anyOf": options}
    return json.dumps(chosen, sort_keys=False, separators=(",", ":"))


def parse_json_call(text: str) -> ReadCall | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("name"), str)
        or not isinstance(value.get("arguments"), dict)
    ):
        return None
    return ReadCall(value["name"], json.dumps(value["arguments"], ensure_ascii=False))


@dataclass(slots=True)
class JsonCallStream:
    """One streamed choice's forced JSON call: the opening once the name is whole, then the
    arguments as they come, but for the last character (the object's closing brace)."""

    text: str = ""
    sent: int = 0  # characters of text handed out (the head, then arguments)
    opened: bool = False

    def delta(self, text: str) -> dict[str, Any] | None:
        self.text += text
        if not self.opened:
            head = JSON_CALL_HEAD.match(self.text)
            if head is None:
                return None
            self.opened, self.sent = True, head.end()
            opening = {"index": 0, "id": new_call_id(), "type": "function"}
            return {"tool_calls": [opening | {"function": {"name": head.group(1), "arguments": ""}}]}
        fragment = self.text[self.sent : len(self.text) - 1]
        if not fragment:
            return None
        self.sent += len(fragment)
        return {"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.opened and reason == "stop" and parse_json_call(self.text) else reason


# tool_choice auto on a model without Harmony: calls in its chat template's own syntax, read back
# by app.text.template_calls; the words around them are the answer's content.
def template_deltas(events: Sequence[Event]) -> list[dict[str, Any]]:
    """Chunk deltas for a parser's events: a call's opening carries its first arguments."""
    deltas: list[dict[str, Any]] = []
    for event in events:
        if isinstance(event, Words):
            deltas.append({"content": event.text})
        elif isinstance(event, CallOpened):
            opened = {"index": event.index, "id": new_call_id(), "type": "function"}
            deltas.append({"tool_calls": [opened | {"function": {"name": event.name, "arguments": ""}}]})
        elif isinstance(event, CallArguments):
            last = deltas[-1]["tool_calls"][0] if deltas and "tool_calls" in deltas[-1] else None
            if last is not None and last["index"] == event.index and "name" in last["function"]:
                last["function"]["arguments"] += event.text  # the opening chunk, not yet sent
            else:
                deltas.append({"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]})
    return deltas


@dataclass(slots=True)
class TemplateCallStream:
    """One streamed choice read in its template's call syntax: words as content until a call
    opens, then the call as ``delta.tool_calls``; how the calls ended decides finish_reason."""

    parser: CallParser
    ended: list[bool] = field(default_factory=list)  # per call, whether its arguments were an object

    def delta(self, text: str) -> list[dict[str, Any]]:
        return self._deltas(self.parser.feed(text))

    def flush(self) -> list[dict[str, Any]]:
        """What the parser held back, once the output has ended."""
        return self._deltas(self.parser.finish())

    def _deltas(self, events: list[Event]) -> list[dict[str, Any]]:
        self.ended += [event.valid for event in events if isinstance(event, CallEnded)]
        return template_deltas(events)

    def finish_reason(self, reason: str) -> str:
        """``tool_calls`` when the output stopped after calls whose arguments are all objects
        (a broken one's fragments have gone out: it is counted, and the reason stays)."""
        return "tool_calls" if self.ended and all(self.ended) and reason == "stop" else reason


def template_answer(
    text: str, syntax: CallSyntax, names: frozenset[str], report: MalformedReport
) -> tuple[str, tuple[ReadCall, ...]]:
    """A whole answer read in its template's syntax: its words (malformed calls' text among
    them) and its calls."""
    read = read_answer(text, syntax, names, report)
    return read.words, read.calls
