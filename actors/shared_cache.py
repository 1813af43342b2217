"""The prompt cache's shared tier, as the actor sees it: async, and never failing a request.

``SharedCache`` is what the actor needs: ``get`` (a miss on any failure) and ``put`` (skipped on
any failure). ``RedisSharedCache`` runs the Redis store's synchronous calls (app/cache/
redis_store.py) in worker threads, a few at once, so that a round trip, or a timeout while Redis
is down, never holds the event loop; it encodes and decodes JSON (actors/cache_codec.py) and
reports each failed call by op (``report``: the metrics count it, app/store/redis_link.py logs it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import structlog
import trio

from actors import cache_codec
from actors.cached_response import CachedResponse
from app.cache.redis_store import RedisCacheStore
from app.store.redis_link import RedisUnavailable

log = structlog.get_logger("shared_cache")
CONCURRENCY = 4


class SharedCache(Protocol):
    hits: int  # lookups it answered
    misses: int  # lookups it did not (failures included)

    async def get(self, key: str) -> CachedResponse | None:
        """None for a miss, and for any failure (it is logged and counted)."""
        ...

    async def put(self, key: str, response: CachedResponse) -> None:
        """Never raises: a failed write is logged, counted and skipped."""
        ...


class RedisSharedCache:
    def __init__(
        self, store: RedisCacheStore, report: Callable[[str], None], *, concurrency: int = CONCURRENCY
    ) -> None:
        self.store = store
        self._report = report
        self._limiter = trio.CapacityLimiter(concurrency)
        self.hits = 0
        self.misses = 0

    async def get(self, key: str) -> CachedResponse | None:
        try:
            raw = await trio.to_thread.run_sync(self.store.get, key, limiter=self._limiter)
        except RedisUnavailable as error:
            self._report(error.op)
            self.misses += 1
            return None
        found = None if raw is None else cache_codec.decode(raw)
        if raw is not None and found is None:
            log.warning("shared_cache_entry_unreadable", key=self.store.key(key))
            self._report("cache_decode")
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    async def put(self, key: str, response: CachedResponse) -> None:
        try:
            value = cache_codec.encode(response)
        except ValueError:  # a value JSON cannot hold (never expected): not shared, still cached here
            log.exception("shared_cache_entry_not_encoded")
            return
        try:
            await trio.to_thread.run_sync(functools.partial(self.store.put, key, value), limiter=self._limiter)
        except RedisUnavailable as error:
            self._report(error.op)
