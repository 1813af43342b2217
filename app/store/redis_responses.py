"""The /v1/responses store in Redis, for replicas that share it: a response stored through one
replica is read, chained and deleted through any other.

The same calls and bounds as the SQLite store (app/store/responses.py) and the same
self-contained rows (the response, this turn's input items, the conversation before it), as one
JSON string per response under ``hashed_key("resp", tenant, id)``: a tenant reads only its own,
and the id a client sends is only ever hashed, never a key itself. Never pickle: a shared Redis
is data, not code we run.

Bounds, per tenant as in SQLite: beside its responses each tenant has an index (a sorted set of
its response keys by write time) and a tally (a hash of each one's size, and their total). One
Lua script writes a response and evicts the tenant's oldest past ``--responses-max-count`` or
``--responses-max-mb`` in one step, on whichever replica writes, so no tenant's writes evict
another's. Each response also carries ``--responses-ttl`` as its Redis TTL (it expires by
itself, on every replica at once; the index forgets it on the tenant's next write). The
instance's ``maxmemory`` with an LRU policy stays the bound of last resort (README, "Replicas
and Redis"): a response Redis evicts on its own still counts in its tenant's tally until it ages
out, so the tally is never less than what a tenant holds.

A Redis failure raises ``RedisUnavailable`` (app/store/redis_link.py): the caller skips the write,
or answers 503 to a request that needs a stored response.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from app.store.redis_link import RedisLink, as_bytes, hashed_key, ttl_ms
from app.store.responses import StoredResponse, StoreLimits, decode, encode

log = structlog.get_logger("redis_responses")
TOTAL = "total"  # the tally's field for the sum; every other field is a response key (gptoss:v1:...)
# KEYS: the response, the tenant's index, its tally. ARGV: the value, the TTL (ms), now (ms), the
# tenant's byte and count bounds. Forgets what expired, writes, then evicts the oldest past a bound.
PUT = """
local key, index, tally = KEYS[1], KEYS[2], KEYS[3]
local ttl, now = tonumber(ARGV[2]), tonumber(ARGV[3])
local max_bytes, max_count = tonumber(ARGV[4]), tonumber(ARGV[5])
local function forget(member)
  local size = redis.call('HGET', tally, member)
  if size then redis.call('HINCRBY', tally, 'total', -tonumber(size)) end
  redis.call('HDEL', tally, member)
  redis.call('ZREM', index, member)
end
for _, member in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', now - ttl)) do forget(member) end
forget(key)
redis.call('SET', key, ARGV[1], 'PX', ttl)
-- in write order, even for writes in the same millisecond from two replicas
local newest = redis.call('ZRANGE', index, -1, -1, 'WITHSCORES')[2]
redis.call('ZADD', index, math.max(now, (tonumber(newest) or 0) + 1), key)
redis.call('HSET', tally, key, #ARGV[1])
redis.call('HINCRBY', tally, 'total', #ARGV[1])
local evicted = 0
while tonumber(redis.call('HGET', tally, 'total')) > max_bytes or redis.call('ZCARD', index) > max_count do
  local oldest = redis.call('ZRANGE', index, 0, 0)[1]
  if not oldest then break end
  forget(oldest)
  redis.call('DEL', oldest)
  evicted = evicted + 1
end
redis.call('PEXPIRE', index, ttl)
redis.call('PEXPIRE', tally, ttl)
return evicted
"""
# KEYS: the response, the tenant's index, its tally. Deletes it and its place in the tally.
DELETE = """
local key, index, tally = KEYS[1], KEYS[2], KEYS[3]
local size = redis.call('HGET', tally, key)
if size then redis.call('HINCRBY', tally, 'total', -tonumber(size)) end
redis.call('HDEL', tally, key)
redis.call('ZREM', index, key)
return redis.call('DEL', key)
"""


def _key(tenant: str | None, response_id: str) -> str:
    return hashed_key("resp", tenant or "", response_id)


def _tenant_keys(tenant: str | None, response_id: str) -> list[str]:
    """The response's key, then its tenant's index and tally (PUT and DELETE's KEYS)."""
    return [_key(tenant, response_id), hashed_key("resp-index", tenant or ""), hashed_key("resp-tally", tenant or "")]


class RedisResponseStore:
    def __init__(
        self, link: RedisLink, limits: StoreLimits | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.link = link
        self.limits = limits or StoreLimits()
        self._clock = clock
        self._put = link.client.register_script(PUT)
        self._delete = link.client.register_script(DELETE)

    def put(self, tenant: str | None, stored: StoredResponse) -> None:
        value = encode(stored)
        if len(value) > self.limits.max_bytes:  # over the tenant's whole share: SQLite would evict it at once
            log.warning("response_not_stored", response_id=stored.response.get("id"), bytes=len(value))
            return
        keys = _tenant_keys(tenant, stored.response["id"])
        limits = self.limits
        args: list[bytes | int] = [
            value,
            ttl_ms(limits.ttl_seconds),
            int(self._clock() * 1000),
            limits.max_bytes,
            limits.max_count,
        ]
        self.link.call("responses_put", lambda client: self._put(keys=keys, args=args, client=client))

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
        keys = _tenant_keys(tenant, response_id)
        return bool(self.link.call("responses_delete", lambda client: self._delete(keys=keys, client=client)))

    def tally(self, tenant: str | None) -> tuple[int, int]:
        """(responses, bytes) counted against ``tenant``'s share."""
        _, index, tally = _tenant_keys(tenant, "")
        count, total = self.link.call(
            "responses_tally", lambda client: (client.zcard(index), client.hget(tally, TOTAL))
        )
        return int(count), int(total or 0)

    def close(self) -> None:
        """The link is the wiring's (the prompt cache shares it): it closes it."""
