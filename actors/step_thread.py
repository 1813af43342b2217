"""How a step reaches the model: in a worker thread, one at a time, so the event loop keeps serving."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import trio

T = TypeVar("T")


class StepCaller(Protocol):
    """Runs one trip of the scheduler to the model: a worker thread in production, inline (or
    slowed, or held) in tests."""

    def __call__(self, fn: Callable[[], T], /) -> Awaitable[T]: ...


def thread_step_caller() -> StepCaller:
    limiter = trio.CapacityLimiter(1)

    async def call(fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=limiter)

    return call
