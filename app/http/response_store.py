"""The response store as the routes use it: every call in one worker thread, one at a time, so
SQLite's reads and writes (an fsync each commit) never hold the event loop."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import trio

from app.store.responses import ResponseStore, StoredResponse

T = TypeVar("T")


class AsyncResponseStore:
    def __init__(self, store: ResponseStore) -> None:
        self.store = store
        self._limiter = trio.CapacityLimiter(1)  # one connection: one call at a time

    async def _run(self, work: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(work, limiter=self._limiter)

    async def put(self, tenant: str | None, stored: StoredResponse) -> None:
        await self._run(functools.partial(self.store.put, tenant, stored))

    async def get(self, tenant: str | None, response_id: str) -> StoredResponse | None:
        return await self._run(functools.partial(self.store.get, tenant, response_id))

    async def delete(self, tenant: str | None, response_id: str) -> bool:
        return await self._run(functools.partial(self.store.delete, tenant, response_id))

    async def close(self) -> None:
        await self._run(self.store.close)
