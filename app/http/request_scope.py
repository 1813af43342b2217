"""Tie work to the life of its HTTP request, wherever that life ends.

A client can vanish while its handler waits, while the response starts, or mid-body; quart-trio
then cancels the request at whatever await it is in, and a body generator that never started
has no ``finally`` to run. This ASGI wrapper runs the request's close callbacks when the request
ends for any reason, so an abort registered here always reaches the scheduler.

It also ends a request whose client stops reading. A send that cannot go out for
``stall_timeout`` seconds (the socket's buffers are full) is cancelled where it can be (HTTP/2:
Hypercorn waits on the stream's flow-control window). Where it cannot (HTTP/1.1: Hypercorn shields
its socket write, so a cancel waits for the write to finish, which for a client that never reads
is never), a watcher sees the send hang and runs the close callbacks itself, with reason
``stalled``: the generation stops within the stall timeout either way. No other stream waits for
it meanwhile: each request sends on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import structlog
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

from app.batching.finish import AbortReason

SCOPE_KEY = "gptoss.on_close"
log = structlog.get_logger("http")
CloseCallback = Callable[[AbortReason], None]


class _RequestLife:
    """One request's close callbacks, each run once, and whether a send hangs."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.callbacks: list[CloseCallback] = []
        self.sending_since: float | None = None

    def close(self, reason: AbortReason) -> None:
        callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            try:
                callback(reason)  # synchronous: the request may already be cancelled
            except Exception:  # one failing callback must not skip the others
                log.exception("request_close_callback_failed")


class RequestScopeMiddleware:
    def __init__(self, app: Any, stall_timeout: float = math.inf) -> None:
        self.app = app
        self.stall_timeout = stall_timeout

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        life = _RequestLife(scope["path"])
        request_scope_dict: dict[str, Any] = {**scope, SCOPE_KEY: life}
        with trio.CancelScope() as request_scope:

            def give_up() -> None:
                log.warning("client_stalled", path=life.path, seconds=self.stall_timeout)
                life.close("stalled")
                request_scope.cancel()

            async def send_or_give_up(message: Any) -> None:
                life.sending_since = trio.current_time()
                try:
                    with trio.move_on_after(self.stall_timeout) as guard:
                        await send(message)
                finally:
                    life.sending_since = None
                if guard.cancelled_caught:
                    give_up()
                    await trio.lowlevel.checkpoint()  # raises Cancelled: the request ends here

            try:
                async with trio.open_nursery() as watchers:
                    if self.stall_timeout < math.inf:
                        watchers.start_soon(self._watch, life, give_up)
                    try:
                        await self.app(request_scope_dict, receive, send_or_give_up)
                    finally:
                        watchers.cancel_scope.cancel()
            finally:
                life.close("client_disconnect")

    async def _watch(self, life: _RequestLife, give_up: Callable[[], None]) -> None:
        """For sends a cancel cannot reach (Hypercorn's HTTP/1.1 writes are shielded)."""
        every = min(1.0, self.stall_timeout / 4)
        while True:
            await trio.sleep(every)
            started = life.sending_since
            if started is not None and trio.current_time() - started >= self.stall_timeout:
                give_up()
                return


def on_request_close(scope: dict[str, Any], callback: CloseCallback) -> None:
    """Run ``callback(reason)`` once when the request ends: ``stalled`` when its client stopped
    reading, ``client_disconnect`` however else it ends (a no-op for a stream that finished)."""
    life = scope.get(SCOPE_KEY)
    if not isinstance(life, _RequestLife):
        raise RuntimeError("RequestScopeMiddleware is not installed around the app")
    life.callbacks.append(callback)
