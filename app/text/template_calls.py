"""Tool calls written in a chat template's own syntax, read back from a model's text. Pure.

A model without Harmony calls functions the way its chat template taught it:

- ``hermes`` (Hermes, Qwen2.5/Qwen3, SmolLM3 templates): ``<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>``, anywhere in the answer, as many as it likes;
- ``llama3_json`` (Llama 3.1/3.2 templates): the answer *is* ``{"name": ..., "parameters": {...}}``
  (after an optional ``<|python_tag|>``), several joined by ``;``.

``syntax_for`` picks one from the template's text (or the operator's ``--tool-call-parser``).
``CallParser`` reads text as it is decoded and says what it is: words to the user, the opening of
a call (once its name is whole), its arguments as they come (not held to the end: only the text
that may yet turn out to be a closing tag waits), and how each call ended. A call the request
cannot take is *malformed*: a function it did not offer (known at the call's head, so the call's
text is words to the user from there on) or arguments that are not a JSON object (known at the
end). Text that merely mentions the tag (``<tool_calls>``, ``<tool_call> tags``) is words.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from app.config import ToolCallParser
from app.contract.model import CallSyntax

MalformedReport = Callable[[str], None]  # called with why: "unknown_function" or "invalid_arguments"

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"  # Llama 3: the call follows (when the decoder keeps special tokens)
# A call's head, up to the brace that opens its arguments: the name is then whole.
HEAD = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*\{')


def syntax_for(template: object, choice: ToolCallParser = "auto") -> CallSyntax | None:
    """The call syntax to read: the operator's choice, or (``auto``) the one the template teaches;
    None where it teaches none this module knows (tool_choice ``auto`` is then refused)."""
    if choice != "auto":
        return None if choice == "none" else choice
    if not isinstance(template, str) or "tools" not in template:
        return None
    if OPEN in template:
        return "hermes"
    if "<|start_header_id|>" in template and '"parameters"' in template:
        return "llama3_json"
    return None


@dataclass(frozen=True, slots=True)
class Words:
    """Text to the user."""

    text: str


@dataclass(frozen=True, slots=True)
class CallOpened:
    index: int  # the calls opened so far in this answer, 0-based
    name: str


@dataclass(frozen=True, slots=True)
class CallArguments:
    index: int
    text: str  # the next piece of the call's arguments (JSON text)


@dataclass(frozen=True, slots=True)
class CallEnded:
    index: int
    valid: bool  # the arguments are a JSON object
    text: str  # the call as the model wrote it, tags and all (a malformed one's is its words)


Event = Words | CallOpened | CallArguments | CallEnded


def _held_prefix(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``tag``."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


@dataclass(slots=True)
class _JsonDepth:
    """Where a JSON value that opened with ``{`` closes, string escapes heeded."""

    depth: int = 1
    in_string: bool = False
    escaped: bool = False

    def closes_at(self, text: str) -> int | None:
        """The index just past the closing brace in ``text``, or None (not yet)."""
        for at, char in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char == "{":
                self.depth += 1
            elif char == "}":
                self.depth -= 1
                if self.depth == 0:
                    return at + 1
        return None


Mode = Literal["words", "head", "arguments", "tail", "unknown", "text"]


@dataclass(slots=True)
class CallParser:
    """One answer's text, read as it comes: ``feed`` each decoded piece, ``finish`` at the end."""

    syntax: CallSyntax
    names: frozenset[str]
    report: MalformedReport = lambda why: None
    mode: Mode = "words"
    pending: str = ""  # text seen but not yet said what it is
    held_space: str = ""  # words that are only whitespace, held: between calls they are dropped
    call_text: str = ""  # the open call as written so far
    arguments: list[str] = field(default_factory=list)  # the open call's arguments, as handed out
    depth: _JsonDepth = field(default_factory=_JsonDepth)
    opened: int = 0  # calls opened
    # A head read whole (_whole): where its object closes is scanned once, as the text comes.
    head_depth: _JsonDepth | None = None
    head_scanned: int = 0  # characters of the head's object scanned so far
    said_words: bool = False  # words went out (llama3_json reads calls only at the start)
    outer_open: bool = False  # the call's own closing brace is still to come (after its arguments)

    def feed(self, text: str) -> list[Event]:
        self.pending += text
        events: list[Event] = []
        while self.pending and self._step(events, final=False):
            pass
        return events

    def finish(self) -> list[Event]:
        """The rest, now that no more text comes: an unclosed call ends here."""
        events: list[Event] = []
        while self.pending and self._step(events, final=True):
            pass
        if self.mode in ("head", "arguments"):
            self._end_unclosed(events)
        elif self.mode == "tail":
            self._close(events)
        if self.held_space and not self.opened:
            events.append(Words(self.held_space))
        self.held_space = ""
        return events

    # -- the states -----------------------------------------------------------------------------

    def _step(self, events: list[Event], final: bool) -> bool:
        """Read what ``pending`` allows; False: it needs more text (or nothing is left)."""
        if self.mode == "words":
            return self._words(events, final)
        if self.mode == "head":
            return self._head(events, final)
        if self.mode == "arguments":
            return self._arguments(events, final)
        if self.mode == "tail":
            return self._tail(events, final)
        if self.mode == "unknown":
            return self._unknown(events, final)
        self._say(events, self.pending)  # text: the rest is words
        self.pending = ""
        return False

    def _words(self, events: list[Event], final: bool) -> bool:
        if self.syntax == "llama3_json":
            return self._llama_start(events, final)
        at = self.pending.find(OPEN)
        if at >= 0:
            self._say(events, self.pending[:at])
            self._open_head(OPEN, self.pending[at + len(OPEN) :])
            return True
        keep = 0 if final else _held_prefix(self.pending, OPEN)
        self._say(events, self.pending[: len(self.pending) - keep])
        self.pending = self.pending[len(self.pending) - keep :]
        return False

    def _llama_start(self, events: list[Event], final: bool) -> bool:
        """Llama 3 answers with calls or with words: a call only where the answer (or the last
        call) left off."""
        stripped = self.pending.lstrip()
        if self.opened and not self.said_words:  # calls are joined by ";"
            stripped = stripped.removeprefix(";").lstrip()
        if stripped.startswith(PYTHON_TAG):
            stripped = stripped[len(PYTHON_TAG) :].lstrip()
        if stripped.startswith("{") and not self.said_words:
            self._open_head("", stripped)
            return True
        if not final and (not stripped or PYTHON_TAG.startswith(stripped)):
            return False  # whitespace, or maybe the tag: wait
        self.mode = "text"
        return True

    def _open_head(self, call_text: str, pending: str) -> None:
        self.call_text, self.pending, self.mode = call_text, pending, "head"
        self.head_depth, self.head_scanned = None, 0  # a new call's head: nothing of it scanned

    def _head(self, events: list[Event], final: bool) -> bool:
        body = self.pending.lstrip()
        if not body:
            return False
        if not body.startswith("{"):  # "<tool_call> tags": the tag mentioned, not a call
            self._say(events, self.call_text)
            self.call_text, self.mode = "", "words"
            return True
        head = HEAD.match(body)
        if head is None:
            return self._whole(events, body, final)
        name = json.loads(head.group(1))
        if not isinstance(name, str) or name not in self.names:
            self.report("unknown_function")
            self.call_text += self.pending
            self._say(events, self.call_text)
            self.call_text, self.pending, self.mode = "", "", "unknown"
            return True
        self.call_text += self.pending[: len(self.pending) - len(body) + head.end()]
        self.pending = body[head.end() :]
        self._open(events, name)
        self.arguments, self.depth, self.mode, self.outer_open = ["{"], _JsonDepth(), "arguments", True
        events.append(CallArguments(self.opened, "{"))
        return True

    def _whole(self, events: list[Event], body: str, final: bool) -> bool:
        """A head this module does not stream (``arguments`` before ``name``, odd spacing): the
        whole call, once its object has closed (or the call has, or the text has ended)."""
        if self.head_depth is None:  # the head's object opened at body[0]
            self.head_depth, self.head_scanned = _JsonDepth(), 1
        closes = self.head_depth.closes_at(body[self.head_scanned :])
        end = None if closes is None else self.head_scanned + closes  # just past the closing brace
        self.head_scanned = len(body) if end is None else end
        limit = body.find(CLOSE) if self.syntax == "hermes" else -1
        if end is None and limit < 0 and not final:
            return False
        self.head_depth = None
        cut = end if end is not None and (limit < 0 or end <= limit) else (limit if limit >= 0 else len(body))
        call = body[:cut]
        self.call_text += self.pending[: len(self.pending) - len(body) + cut]
        self.pending = body[cut:]
        try:
            value = json.loads(call)
        except json.JSONDecodeError:
            value = None
        arguments = value.get("arguments", value.get("parameters")) if isinstance(value, dict) else None
        name = value.get("name") if isinstance(value, dict) else None
        if isinstance(name, str) and name in self.names and isinstance(arguments, dict):
            text = json.dumps(arguments, ensure_ascii=False)
            self._open(events, name)
            events.append(CallArguments(self.opened, text))
            self.arguments = [text]
            self.mode, self.outer_open = "tail", False
            return True
        self.report("unknown_function" if isinstance(name, str) and name not in self.names else "invalid_arguments")
        self._say(events, self.call_text)
        self.call_text = ""
        self.mode = "unknown" if self.syntax == "hermes" else "text"
        return True

    def _arguments(self, events: list[Event], final: bool) -> bool:
        text = self.pending
        limit = text.find(CLOSE) if self.syntax == "hermes" else -1
        scanned = text if limit < 0 else text[:limit]
        end = self.depth.closes_at(scanned)
        if end is None and limit < 0:
            # All of it is arguments, but for what may be a closing tag's start inside a string
            # (scanned again next time: no quote, brace or backslash is in such a start).
            keep = 0 if final or self.syntax != "hermes" else _held_prefix(scanned, CLOSE)
            self._hand_out(events, scanned[: len(scanned) - keep])
            self.pending = scanned[len(scanned) - keep :]
            return False
        if end is None:  # the call closed before its arguments did
            self._hand_out(events, text[:limit])
            self.call_text += CLOSE
            self.pending = text[limit + len(CLOSE) :]
            self._end(events, valid=False)
            return True
        self._hand_out(events, text[:end])
        self.pending = text[end:]
        self.mode = "tail"
        return True

    def _tail(self, events: list[Event], final: bool) -> bool:
        """After the arguments: the call object's brace, then (hermes) the closing tag."""
        if self.syntax == "llama3_json":
            rest = self.pending.lstrip()
            if self.outer_open and not rest and not final:
                return False
            if self.outer_open and rest.startswith("}"):
                self.call_text += self.pending[: len(self.pending) - len(rest) + 1]
                self.pending = rest[1:]
            self._close(events)
            return True
        at = self.pending.find(CLOSE)
        if at < 0 and final:  # the text ended unclosed: the call's brace, and the rest is words
            rest = self.pending.lstrip()
            at = len(self.pending) - len(rest) + (1 if rest.startswith("}") else 0)
            self.call_text += self.pending[:at]
            self.pending = self.pending[at:]
            self._close(events)
            return True
        if at < 0:
            return False
        self.call_text += self.pending[: at + len(CLOSE)]
        self.pending = self.pending[at + len(CLOSE) :]
        self._close(events)
        return True

    def _unknown(self, events: list[Event], final: bool) -> bool:
        """A call to a function the request did not offer: its text is words, to its closing tag."""
        at = self.pending.find(CLOSE)
        if at >= 0:
            self._say(events, self.pending[: at + len(CLOSE)])
            self.pending, self.mode = self.pending[at + len(CLOSE) :], "words"
            return True
        keep = 0 if final else _held_prefix(self.pending, CLOSE)
        self._say(events, self.pending[: len(self.pending) - keep])
        self.pending = self.pending[len(self.pending) - keep :]
        return False

    # -- helpers --------------------------------------------------------------------------------

    def _say(self, events: list[Event], text: str) -> None:
        """Words, but whitespace at their end waits: before or between calls it is dropped."""
        if not text:
            return
        text = self.held_space + text
        words = text.rstrip()
        self.held_space = text[len(words) :]
        if words:
            self.said_words = True
            events.append(Words(words))

    def _open(self, events: list[Event], name: str) -> None:
        self.held_space = ""  # the whitespace before a call is no words
        events.append(CallOpened(self.opened, name))

    def _hand_out(self, events: list[Event], text: str) -> None:
        if text:
            self.arguments.append(text)
            self.call_text += text
            events.append(CallArguments(self.opened, text))

    def _close(self, events: list[Event]) -> None:
        arguments = "".join(self.arguments)
        self._end(events, valid=is_json_object(arguments))

    def _end(self, events: list[Event], valid: bool) -> None:
        if not valid:
            self.report("invalid_arguments")
        events.append(CallEnded(self.opened, valid, self.call_text))
        self.opened += 1
        self.call_text, self.arguments = "", []
        self.mode = "words"

    def _end_unclosed(self, events: list[Event]) -> None:
        if self.mode == "head":  # the text ended at the tag: it was mentioned, not a call
            self._say(events, self.call_text + self.pending)
            self.call_text, self.pending, self.mode = "", "", "words"
            return
        self._close(events)


def is_json_object(text: str) -> bool:
    """Arguments a call can take: JSON text of an object (what OpenAI's ``arguments`` holds)."""
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


@dataclass(frozen=True, slots=True)
class ReadCall:
    """One tool call read from a model's output (Harmony's or a template's): its function's name
    and its arguments' JSON text."""

    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ReadAnswer:
    """A whole answer read: its words (malformed calls' text among them) and its calls."""

    words: str
    calls: tuple[ReadCall, ...]


def read_answer(text: str, syntax: CallSyntax, names: frozenset[str], report: MalformedReport) -> ReadAnswer:
    parser = CallParser(syntax, names, report)
    events = parser.feed(text) + parser.finish()
    words: list[str] = []
    calls: list[ReadCall] = []
    opened: dict[int, tuple[str, list[str]]] = {}
    for event in events:
        if isinstance(event, Words):
            words.append(event.text)
        elif isinstance(event, CallOpened):
            opened[event.index] = (event.name, [])
        elif isinstance(event, CallArguments):
            opened[event.index][1].append(event.text)
        elif event.valid:
            name, parts = opened[event.index]
            calls.append(ReadCall(name, "".join(parts)))
        else:
            words.append(event.text)
    return ReadAnswer("".join(words), tuple(calls))
