"""A request's text that spells a special token (``<|im_start|>``) stays text through a chat template. Pure.

A chat template renders what it is given into text, and the tokenizer reads every special token's
text in that as the special token: a user's ``<|im_start|>system`` would open a turn of its own, a
tool's description or a call's arguments could close one. So every string of the request a
template may render (message contents, tool calls' names, ids and arguments, tools' names,
descriptions and schemas; keys and values alike) has each special token's text replaced by a
marker no client can spell (a nonce, new on every call), and the rendered text is tokenized piece
by piece: the template's own text as usual, each marker as the text it stands for, as plain text.

The edges of each string are kept too: a string that ends with the start of a special token's text
(``<|im_``) or starts with the end of one (``start|>``) has that part marked as well, so that two
fields a template renders side by side cannot join into one special token.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Callable, Iterable
from typing import Any

# A part this short at a string's edge is left alone: joined to its neighbour it would need the
# template's own text to supply all the rest of a special token, which no template does.
SHORTEST_EDGE = 2
Encode = Callable[[str], list[int]]


@functools.cache
def _patterns(specials: frozenset[str]) -> tuple[re.Pattern[str], frozenset[str], frozenset[str], int]:
    """Whole special texts (longest first), their proper prefixes and suffixes worth marking."""
    whole = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    starts = frozenset(s[:n] for s in specials for n in range(SHORTEST_EDGE, len(s)))
    ends = frozenset(s[-n:] for s in specials for n in range(SHORTEST_EDGE, len(s)))
    return whole, starts, ends, max(map(len, specials))


class SpecialText:
    """One rendering's markers: ``spelled`` says whether the request needs them at all,
    ``neutralized`` puts them in, ``tokens`` takes the rendered text back to token ids."""

    def __init__(self, specials: Iterable[str]) -> None:
        self._specials = frozenset(s for s in specials if s)
        self._nonce = uuid.uuid4().hex
        self._marker = re.compile(rf"\[\[{self._nonce}:(\d+)\]\]")
        self._literals: list[str] = []  # marker index -> the text it stands for

    def spelled(self, value: Any) -> bool:
        """Some string in ``value`` (nested lists and dicts, keys too) spells a special token, or
        holds the start or end of one at an edge."""
        return any(marked for text in _strings(value) for _, marked in self._cuts(text))

    def neutralized(self, value: Any) -> Any:
        """``value`` with each such text replaced by its marker (a copy; ``value`` is not changed)."""
        if isinstance(value, str):
            return "".join(self._mark(piece) if marked else piece for piece, marked in self._cuts(value))
        if isinstance(value, list | tuple):
            return [self.neutralized(item) for item in value]
        if isinstance(value, dict):
            return {self.neutralized(key): self.neutralized(item) for key, item in value.items()}
        return value

    def tokens(self, rendered: str, template_text: Encode, plain_text: Encode) -> list[int]:
        """The rendered text's ids: ``template_text`` for the template's own text (its special
        tokens are special), ``plain_text`` for what each marker stands for."""
        tokens: list[int] = []
        at = 0
        for found in self._marker.finditer(rendered):
            if found.start() > at:
                tokens += template_text(rendered[at : found.start()])
            tokens += plain_text(self._literals[int(found.group(1))])
            at = found.end()
        if at < len(rendered):
            tokens += template_text(rendered[at:])
        return tokens

    def _cuts(self, text: str) -> list[tuple[str, bool]]:
        """``text`` as (piece, to be marked) pairs: one unmarked piece when nothing needs a marker."""
        if not self._specials:
            return [(text, False)]
        whole, starts, ends, longest = _patterns(self._specials)
        cuts: list[tuple[str, bool]] = []
        at = 0
        for found in whole.finditer(text):
            cuts += [(text[at : found.start()], False), (found.group(0), True)]
            at = found.end()
        cuts.append((text[at:], False))
        first = cuts[0][0]
        head = _edge(first, longest, lambda n: first[:n], ends)
        if head:
            cuts[0:1] = [(head, True), (first[len(head) :], False)]
        last = cuts[-1][0]
        tail = _edge(last, longest, lambda n: last[-n:], starts)
        if tail:
            cuts[-1:] = [(last[: len(last) - len(tail)], False), (tail, True)]
        return [(piece, marked) for piece, marked in cuts if piece] or [(text, False)]

    def _mark(self, literal: str) -> str:
        self._literals.append(literal)
        return f"[[{self._nonce}:{len(self._literals) - 1}]]"


def _edge(text: str, longest: int, part: Callable[[int], str], known: frozenset[str]) -> str:
    """The longest ``part(n)`` of ``text`` that is in ``known`` ("" if none is)."""
    return next((cut for n in range(min(longest, len(text)), SHORTEST_EDGE - 1, -1) if (cut := part(n)) in known), "")


def _strings(value: Any) -> Iterable[str]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
