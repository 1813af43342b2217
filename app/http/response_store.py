"""The response store as the routes use it: every call in a worker thread, so SQLite's reads and
writes (an fsync each commit) and Redis' round trips never hold the event loop.

SQLite has one connection: one call at a time. Redis' client is a thread-safe pool: a few at
once. A Redis failure (app/store/redis_link.py) is counted through ``report``; a write that
fails is skipped (the client still gets its answer, it just cannot be retrieved or chained), and a
read that fails raises ``StoreUnavailable``, which the routes answer with 503.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import structlog
import trio

from app.store.redis_link import RedisUnavailable
from app.store.responses import ResponseBackend, StoredResponse

log = structlog.get_logger("response_store")
T = TypeVar("T")


class StoreUnavailable(Exception):
    """The shared store (Redis) cannot be reached: a request that needs a stored response gets 503."""


class AsyncResponseStore:
    def __init__(
        self,
        store: ResponseBackend,
        *,
        concurrency: int = 1,
        report: Callable[[str], None] = lambda op: None,
    ) -> None:
        self.store = store
        self._limiter = trio.CapacityLimiter(concurrency)
        self._report = report  # a Redis call that failed, by op: the metrics count it

    async def _run(self, work: Callable[[], T]) -> T:
        try:
            return await trio.to_thread.run_sync(work, limiter=self._limiter)
        except RedisUnavailable as error:
            self._report(error.op)
            raise StoreUnavailable(error.op) from error

    async def put(self, tenant: str | None, stored: StoredResponse) -> bool:
        """False when the store is unavailable and the response was not stored."""
        try:
            await self._run(functools.partial(self.store.put, tenant, stored))
        except StoreUnavailable:
            log.warning("response_not_stored", response_id=stored.response.get("id"), reason="store_unavailable")
            return False
        return True

    async def get(self, tenant: str | None, response_id: str) -> StoredResponse | None:
        return await self._run(functools.partial(self.store.get, tenant, response_id))

    async def delete(self, tenant: str | None, response_id: str) -> bool:
        return await self._run(functools.partial(self.store.delete, tenant, response_id))

    async def close(self) -> None:
        await self._run(self.store.close)
