"""Tie work to the life of its HTTP request, wherever that life ends.

A client can vanish while its handler waits, while the response starts, or mid-body; quart-trio
then cancels the request at whatever await it is in, and a body generator that never started
has no ``finally`` to run. This ASGI wrapper runs the request's close callbacks when the request
ends for any reason, so an abort registered here always reaches the scheduler.

It also ends a request whose client stops reading: a send that cannot go out for
``stall_timeout`` seconds (the socket's buffers are full) cancels the request, which is then torn
down like a disconnect. No other stream waits for it meanwhile: each request sends on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import structlog
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

SCOPE_KEY = "gptoss.on_close"
log = structlog.get_logger("http")


class RequestScopeMiddleware:
    def __init__(self, app: Any, stall_timeout: float = math.inf) -> None:
        self.app = app
        self.stall_timeout = stall_timeout

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        callbacks: list[Callable[[], None]] = []
        request_scope_dict: dict[str, Any] = {**scope, SCOPE_KEY: callbacks}
        with trio.CancelScope() as request_scope:

            async def send_or_give_up(message: Any) -> None:
                with trio.move_on_after(self.stall_timeout) as guard:
                    await send(message)
                if guard.cancelled_caught:
                    log.warning("client_stalled", path=scope["path"], seconds=self.stall_timeout)
                    request_scope.cancel()
                    await trio.lowlevel.checkpoint()  # raises Cancelled: the request ends here

            try:
                await self.app(request_scope_dict, receive, send_or_give_up)
            finally:
                for callback in callbacks:
                    try:
                        callback()  # synchronous: the request may already be cancelled
                    except Exception:  # one failing callback must not skip the others
                        log.exception("request_close_callback_failed")


def on_request_close(scope: dict[str, Any], callback: Callable[[], None]) -> None:
    callbacks = scope.get(SCOPE_KEY)
    if callbacks is None:
        raise RuntimeError("RequestScopeMiddleware is not installed around the app")
    callbacks.append(callback)
