"""Reading a JSON request body into a pydantic model, with a 400 for each way it can be wrong.

Hostile bodies included: JSON nested past any real request, a number with thousands of digits,
NaN or Infinity (not JSON), a lone UTF-16 surrogate (no UTF-8 spelling: it would fail later, in
the tokenizer or a log line). Each is refused here, before any work starts.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn, TypeVar, cast

from pydantic import BaseModel, ValidationError
from quart import request

from app.http.errors import ApiError, from_validation_error

M = TypeVar("M", bound=BaseModel)
# Deeper than any request (a JSON schema for structured output included) and far below the depth
# at which Python's parser or pydantic would recurse out of stack.
MAX_DEPTH = 64


async def parse_body(model: type[M]) -> M:
    # Over MAX_CONTENT_LENGTH Quart raises 413; as_text=False gives bytes (its signature cannot say).
    raw = cast(bytes, await request.get_data(cache=False, as_text=False))
    if not raw.strip():
        raise ApiError(400, "the request body is empty: send a JSON object", code="invalid_json")
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}", param="body")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise from_validation_error(error) from error


def parse_json(raw: bytes) -> Any:
    """The body as JSON; an ApiError (400) in our words for anything that is not plain JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(400, f"the request body is not UTF-8 (byte {error.start})", code="invalid_json") from None
    try:
        data = json.loads(text, parse_constant=_not_json)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise ApiError(400, f"the request body is not valid JSON ({where})", code="invalid_json") from None
    except RecursionError:
        _too_deep()
    except ValueError:  # the digit limit for ints (CPython's int_max_str_digits), or NaN / Infinity
        raise ApiError(400, "the request body holds a number JSON cannot carry", code="invalid_json") from None
    _check_plain(data)
    return data


def _not_json(constant: str) -> NoReturn:
    raise ValueError(f"{constant} is not JSON")


def _too_deep() -> NoReturn:
    raise ApiError(400, f"the request body is nested deeper than {MAX_DEPTH} levels", code="invalid_json")


def _check_plain(data: Any) -> None:
    """No nesting past MAX_DEPTH and no string that UTF-8 cannot carry; iterative, so a deep body
    cannot exhaust the stack here either."""
    pending: list[tuple[Any, int]] = [(data, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, str):
            _check_text(value)
        elif isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                _too_deep()
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key)
                pending.append((item, depth + 1))


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        message = "the request body holds a lone UTF-16 surrogate (\\ud800-\\udfff): no text can"
        raise ApiError(400, message, code="invalid_json") from None
