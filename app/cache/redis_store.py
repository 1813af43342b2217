"""The prompt cache's shared tier in Redis: finished deterministic answers that every replica
pointed at the same Redis can replay (the actor keeps its in-memory store as the tier in front).

Values are bytes the caller encodes (JSON: actors/cache_codec.py; never pickle, a shared Redis is
data, not code we run), under ``hashed_key("cache", namespace, cache_key)``: the namespace names
the model as it computes (its source, served name, dtype, device type), so two models, or one
model in two dtypes, on one Redis never answer for each other. The cache key already holds the
tenant, the prompt and the sampling parameters (app/prompts/cache_key.py).

Bounds: each entry has ``--redis-cache-ttl`` as its TTL, refreshed by every hit (an answer asked
for often stays), and the instance's ``maxmemory`` with an LRU policy bounds the total. An entry
larger than ``--cache-max-mb`` is not written, as the in-memory store would not keep it either.

A Redis failure raises ``RedisUnavailable``: the caller takes it as a miss, or skips the write.
"""

from __future__ import annotations

from app.store.redis_link import RedisLink, as_bytes, hashed_key, ttl_ms


class RedisCacheStore:
    def __init__(self, link: RedisLink, namespace: str, ttl_seconds: float, max_bytes: int) -> None:
        if not ttl_seconds > 0:
            raise ValueError("the shared cache's TTL must be positive")
        self.link = link
        self.namespace = namespace
        self.max_bytes = max_bytes
        self._ttl_ms = ttl_ms(ttl_seconds)

    def key(self, cache_key: str) -> str:
        return hashed_key("cache", self.namespace, cache_key)

    def get(self, cache_key: str) -> bytes | None:
        key = self.key(cache_key)
        return as_bytes(self.link.call("cache_get", lambda client: client.getex(key, px=self._ttl_ms)))

    def put(self, cache_key: str, value: bytes) -> bool:
        """False when the value is over the size bound (not written)."""
        if len(value) > self.max_bytes:
            return False
        key = self.key(cache_key)
        self.link.call("cache_put", lambda client: client.set(key, value, px=self._ttl_ms))
        return True
