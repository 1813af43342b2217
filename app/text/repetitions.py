"""Repetition counts a grammar may ask for: refused past a bound before anything is compiled.

A count is cheap to write and dear to compile: ``[a-z]{1,50000}`` is 118 bytes of request and
seconds of grammar engine, and nested counts multiply (``(.{1,1000}){1,100}``). Regex counts
(``{n}``, ``{m,}``, ``{m,n}``, and their products along a nesting), JSON Schema's length, item and
property counts, and the regexes a schema holds (``pattern``, ``patternProperties``) are checked
here, as plain text and data: a sentence that says what was too many, or None.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

MAX_REPETITIONS = 10_000
# JSON Schema's counts, each of which a grammar engine may spell as that many repetitions.
COUNT_KEYWORDS = (
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "minContains",
    "maxContains",
)
# Values that are data, not schemas: a "maxLength" inside an enum's value is no keyword.
DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})
_COUNT = re.compile(r"\{(\d*)(?:(,)(\d*))?\}")


def regex_repetition_error(pattern: str, bound: int = MAX_REPETITIONS) -> str | None:
    """Why ``pattern`` repeats too much (a count, or counts nested to a product, past ``bound``)."""
    # One frame per open group: [the largest product inside it, the product of its last atom].
    frames: list[list[int]] = [[1, 1]]
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            frames[-1][1] = 1
            i += 2
            continue
        if char == "[":
            frames[-1][1] = 1
            i = _class_end(pattern, i)
            continue
        if char == "(":
            frames.append([1, 1])
        elif char == ")" and len(frames) > 1:
            inner = frames.pop()[0]
            frames[-1][1] = inner
            frames[-1][0] = max(frames[-1][0], inner)
        elif char == "|":
            frames[-1][1] = 1
        elif char == "{" and (count := _COUNT.match(pattern, i)) is not None:
            text, comma, upper = count.groups()
            # {m,} repeats at least m times; {,n} and {m,n} at most n.
            times_text = upper if comma and upper else text
            if times_text:
                if len(times_text) > len(str(bound)) or int(times_text) > bound:
                    return f"the regex asks for {count.group(0)} repetitions: at most {bound} are served"
                product = frames[-1][1] * int(times_text)
                if product > bound:
                    return f"the regex nests repetitions to {product} (at {count.group(0)}): at most {bound} are served"
                frames[-1][1] = product
                frames[-1][0] = max(frames[-1][0], product)
            i = count.end()
            continue
        elif char not in "*+?":
            frames[-1][1] = 1
        i += 1
    return None


def _class_end(pattern: str, start: int) -> int:
    """The index after the character class opening at ``start`` (its ``{`` and ``(`` are literal)."""
    i = start + 1
    if i < len(pattern) and pattern[i] == "^":
        i += 1
    if i < len(pattern) and pattern[i] == "]":
        i += 1
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    return i + 1


def schema_repetition_error(schema: Any, bound: int = MAX_REPETITIONS) -> str | None:
    """Why a JSON Schema (parsed) asks for too many repetitions: a count keyword past ``bound``,
    or a regex of its that repeats too much."""
    for node in _schemas(schema):
        for keyword in COUNT_KEYWORDS:
            value = node.get(keyword)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > bound:
                return f"the JSON schema's {keyword} is {value}: at most {bound} is served"
        named = node.get("patternProperties")
        patterns = [key for key in named if isinstance(key, str)] if isinstance(named, dict) else []
        if isinstance(node.get("pattern"), str):
            patterns.append(node["pattern"])
        for pattern in patterns:
            if (error := regex_repetition_error(pattern, bound)) is not None:
                return f"the JSON schema's pattern {pattern[:80]!r}: {error.removeprefix('the regex ')}"
    return None


def _schemas(schema: Any) -> Iterator[dict[str, Any]]:
    """Every object in a schema that can hold keywords, without recursion (a schema may nest deep)."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            yield node
            stack.extend(value for key, value in node.items() if key not in DATA_KEYWORDS)


def grammar_repetition_error(kind: str, source: str, bound: int = MAX_REPETITIONS) -> str | None:
    """The check for a grammar as the engine receives it (see app.contract.grammar.GrammarSpec)."""
    match kind:
        case "regex":
            return regex_repetition_error(source, bound)
        case "json_schema":
            return schema_repetition_error(json.loads(source), bound)
        case "tool_call":
            for name, schema in json.loads(source):
                if (error := schema_repetition_error(schema, bound)) is not None:
                    return f"tool {name}: {error}"
    return None
