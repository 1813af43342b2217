"""RedisLink: the one way the stores talk to Redis, and what an outage looks like to them.

Every call goes through ``call(op, work)``: a Redis error (refused, reset, timed out, a server
that answers with an error) becomes ``RedisUnavailable(op)``, which the callers turn into a cache
miss, a skipped write or a 503, never a 500. The client's sockets have a short timeout and one
immediate retry (a pooled connection that died with a restarted server is replaced on the retry),
so a call never takes much longer than twice the timeout.

After a failure the link stays "down" for ``pause_seconds``: calls in that window fail at once,
without a connection attempt each, so that a Redis that hangs costs every request a timeout only
once a pause. The first call after the pause tries again: a Redis that is back works at once. The
change of state (down, back up) is logged once, not per call.

Keys are never what a client sends: ``hashed_key`` is a fixed prefix with the format version and
a BLAKE2b digest of our own key material (tenant, model, id), so that a client's id cannot name,
read or collide with any other key.

Synchronous and thread-safe: the event loop calls it from worker threads.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

log = structlog.get_logger("redis")
T = TypeVar("T")
# The format of what we write: part of every key, so that a replica that writes another format
# never reads (or overwrites) this one's values; bump it when a value's JSON changes.
FORMAT_VERSION = 1
KEY_PREFIX = f"gptoss:v{FORMAT_VERSION}"
PAUSE_SECONDS = 1.0
URL_SCHEMES = ("redis", "rediss", "unix")


class RedisUnavailable(Exception):
    """Redis could not be reached or answered an error; ``op`` names what was being done."""

    def __init__(self, op: str) -> None:
        super().__init__(f"redis unavailable ({op})")
        self.op = op


def hashed_key(kind: str, *material: str) -> str:
    """``gptoss:v1:KIND:`` + the BLAKE2b digest of the material (as a JSON list: no two
    different tuples join into the same text)."""
    text = json.dumps(list(material), ensure_ascii=True, separators=(",", ":"))
    return f"{KEY_PREFIX}:{kind}:{hashlib.blake2b(text.encode('ascii'), digest_size=20).hexdigest()}"


def ttl_ms(seconds: float) -> int:
    """A TTL as Redis' PX takes it: whole milliseconds, at least one (0 would be refused)."""
    return max(1, math.ceil(seconds * 1000))


def as_bytes(value: object) -> bytes | None:
    """A GET's reply as bytes (the client decodes nothing: decode_responses is off)."""
    if value is None:
        return None
    return value if isinstance(value, bytes) else str(value).encode()


def redacted(url: str) -> str:
    """The URL without its password, for log lines."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def connect(url: str, timeout: float) -> redis.Redis:
    """A client (a thread-safe connection pool) whose every call gives up after about ``timeout``
    seconds: one retry at once, no backoff (redis-py's default backs off for seconds)."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )


class RedisLink:
    def __init__(
        self,
        client: redis.Redis,
        *,
        pause_seconds: float = PAUSE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        name: str = "",
    ) -> None:
        self.client = client
        self.name = name  # the redacted URL, for log lines
        self._pause = pause_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._down_until: float | None = None  # None: up

    @property
    def up(self) -> bool:
        with self._lock:
            return self._down_until is None

    def call(self, op: str, work: Callable[[redis.Redis], T]) -> T:
        with self._lock:
            if self._down_until is not None and self._clock() < self._down_until:
                raise RedisUnavailable(op)
        try:
            result = work(self.client)
        except (redis.RedisError, OSError) as error:
            with self._lock:
                was_up = self._down_until is None
                self._down_until = self._clock() + self._pause
            if was_up:
                log.warning("redis_unavailable", redis=self.name, op=op, error=f"{type(error).__name__}: {error}")
            raise RedisUnavailable(op) from error
        with self._lock:
            came_back = self._down_until is not None
            self._down_until = None
        if came_back:
            log.info("redis_available", redis=self.name, op=op)
        return result

    def close(self) -> None:
        self.client.close()
