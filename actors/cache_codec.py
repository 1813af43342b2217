"""A cached response as JSON, for the prompt cache's shared tier (Redis).

Never pickle: a shared Redis is data that any process with its address can write, not code to
run. Decoding checks every field's type and takes a value that is not exactly ours (another
format, damaged, written by someone else) as a miss, never as an error of the request. The
format's version is part of the Redis key (app/store/redis_link.py): a change here bumps it.

The stored done event keeps the finish reason and usage; its request id and timings are each
replaying client's own (the prompt cache sets them), so they are not stored.
"""

from __future__ import annotations

import json
from typing import Any, cast

from actors.cached_response import STORED_REASONS, CachedResponse
from actors.messages import StreamDone, StreamToken, Timings, Usage
from app.batching.finish import FinishReason
from app.text.logprobs import ShownLogprob, ShownLogprobs


class _NotOurs(ValueError):
    pass


def _shown(shown: ShownLogprob) -> list[Any]:
    return [shown.token, shown.bytes.hex(), shown.logprob]


def _logprobs(shown: ShownLogprobs) -> dict[str, Any]:
    return {"chosen": _shown(shown.chosen), "top": [_shown(entry) for entry in shown.top]}


def _token(token: StreamToken) -> dict[str, Any]:
    document: dict[str, Any] = {
        "text": token.text,
        "token_id": token.token_id,
        "index": token.index,
        "channel": token.channel,
        "recipient": token.recipient,
        "message": token.message,
    }
    if token.logprobs is not None:
        document["logprobs"] = _logprobs(token.logprobs)
    if token.text_logprobs:
        document["text_logprobs"] = [_logprobs(shown) for shown in token.text_logprobs]
    return document


def encode(response: CachedResponse) -> bytes:
    done = response.done
    usage = done.usage
    document = {
        "tokens": [_token(token) for token in response.tokens],
        "done": {
            "finish_reason": done.finish_reason,
            "usage": [usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens],
        },
    }
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


# -- decoding: every field checked ---------------------------------------------------------------
def _of(value: Any, kind: type | tuple[type, ...]) -> Any:
    # bool is an int to Python, never to us
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise _NotOurs(f"expected {kind}, got {type(value).__name__}")
    return value


def _optional_str(value: Any) -> str | None:
    return None if value is None else cast(str, _of(value, str))


def _read_shown(value: Any) -> ShownLogprob:
    entry = _of(value, list)
    if len(entry) != 3:
        raise _NotOurs("not a logprob entry")
    token, hex_bytes, logprob = entry
    return ShownLogprob(_of(token, str), bytes.fromhex(_of(hex_bytes, str)), float(_of(logprob, (int, float))))


def _read_logprobs(value: Any) -> ShownLogprobs:
    document = _of(value, dict)
    return ShownLogprobs(_read_shown(document.get("chosen")), tuple(map(_read_shown, _of(document.get("top"), list))))


def _read_token(value: Any) -> StreamToken:
    document = _of(value, dict)
    logprobs = document.get("logprobs")
    return StreamToken(
        text=_of(document.get("text"), str),
        token_id=_of(document.get("token_id"), int),
        index=_of(document.get("index"), int),
        channel=_optional_str(document.get("channel")),
        logprobs=None if logprobs is None else _read_logprobs(logprobs),
        text_logprobs=tuple(map(_read_logprobs, _of(document.get("text_logprobs", []), list))),
        recipient=_optional_str(document.get("recipient")),
        message=_of(document.get("message"), int),
    )


def decode(raw: bytes) -> CachedResponse | None:
    """The cached response, or None for a value that is not one of ours."""
    try:
        document = _of(json.loads(raw), dict)
        tokens = tuple(map(_read_token, _of(document.get("tokens"), list)))
        done = _of(document.get("done"), dict)
        reason = done.get("finish_reason")
        if reason not in STORED_REASONS:
            raise _NotOurs("a finish reason that is never stored")
        counts = _of(done.get("usage"), list)
        if len(counts) != 3:
            raise _NotOurs("not a usage")
        usage = Usage(*(_of(count, int) for count in counts))
    except (ValueError, UnicodeDecodeError, TypeError):  # _NotOurs, bad JSON, bad hex
        return None
    # The request id and timings are set for each client the answer is replayed to.
    finish: FinishReason = reason
    return CachedResponse(tokens, StreamDone("", finish, usage, Timings(0.0, None, None, 0.0)))
