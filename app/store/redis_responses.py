"""The /v1/responses store in Redis, for replicas that share it: a response stored through one
replica is read, chained and deleted through any other.

The same calls as the SQLite store (app/store/responses.py) and the same self-contained rows
(the response, this turn's input items, the conversation before it), as one JSON string per
response under ``hashed_key("resp", tenant, id)``: a tenant reads only its own, and the id a
client sends is only ever hashed, never a key itself. Never pickle: a shared Redis is data, not
code we run.

Bounds: each response is written with ``--responses-ttl`` as its Redis TTL (it expires by
itself, on every replica at once), and the instance's ``maxmemory`` with an LRU policy bounds
the total (README, "Replicas and Redis"). ``--responses-max-mb`` still bounds one response: a
larger one is not stored, as the SQLite store would evict it at once. ``--responses-max-count``
does not apply: counting across replicas is Redis' memory bound's job.

A Redis failure raises ``RedisUnavailable`` (app/store/redis_link.py): the caller skips the write,
or answers 503 to a request that needs a stored response.
"""

from __future__ import annotations

import json
from typing import Any

import structlog

from app.store.redis_link import RedisLink, as_bytes, hashed_key, ttl_ms
from app.store.responses import StoredResponse, StoreLimits

log = structlog.get_logger("redis_responses")


def _key(tenant: str | None, response_id: str) -> str:
    return hashed_key("resp", tenant or "", response_id)


def encode(stored: StoredResponse) -> bytes:
    document = {"response": stored.response, "input_items": stored.input_items, "history": stored.history}
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def decode(raw: bytes) -> StoredResponse | None:
    """None for a value that is not ours (another format, a damaged or foreign value)."""
    try:
        document: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict):
        return None
    response, input_items, history = (document.get(name) for name in ("response", "input_items", "history"))
    if not (isinstance(response, dict) and isinstance(input_items, list) and isinstance(history, list)):
        return None
    if not all(isinstance(item, dict) for item in (*input_items, *history)):
        return None
    return StoredResponse(response, input_items, history)


class RedisResponseStore:
    def __init__(self, link: RedisLink, limits: StoreLimits | None = None) -> None:
        self.link = link
        self.limits = limits or StoreLimits()

    def put(self, tenant: str | None, stored: StoredResponse) -> None:
        value = encode(stored)
        if len(value) > self.limits.max_bytes:
            log.warning("response_not_stored", response_id=stored.response.get("id"), bytes=len(value))
            return
        key = _key(tenant, stored.response["id"])
        expiry = ttl_ms(self.limits.ttl_seconds)
        self.link.call("responses_put", lambda client: client.set(key, value, px=expiry))

    def get(self, tenant: str | None, response_id: str) -> StoredResponse | None:
        key = _key(tenant, response_id)
        raw = as_bytes(self.link.call("responses_get", lambda client: client.get(key)))
        if raw is None:
            return None
        stored = decode(raw)
        if stored is None or stored.response.get("id") != response_id:
            log.warning("response_unreadable", key=key)
            return None
        return stored

    def delete(self, tenant: str | None, response_id: str) -> bool:
        key = _key(tenant, response_id)
        return bool(self.link.call("responses_delete", lambda client: client.delete(key)))

    def close(self) -> None:
        """The link is the wiring's (the prompt cache shares it): it closes it."""
