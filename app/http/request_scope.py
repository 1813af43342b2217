"""Tie work to the life of its HTTP request, wherever that life ends.

A client can vanish while its handler waits, while the response starts, or mid-body; quart-trio
then cancels the request at whatever await it is in, and a body generator that never started
has no ``finally`` to run. This ASGI wrapper runs the request's close callbacks when the request
ends for any reason, so an abort registered here always reaches the scheduler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

SCOPE_KEY = "gptoss.on_close"
log = structlog.get_logger("http")


class RequestScopeMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        callbacks: list[Callable[[], None]] = []
        scope = {**scope, SCOPE_KEY: callbacks}
        try:
            await self.app(scope, receive, send)
        finally:
            for callback in callbacks:
                try:
                    callback()  # synchronous: the request may already be cancelled
                except Exception:
                    log.exception("request_close_callback_failed")


def on_request_close(scope: dict[str, Any], callback: Callable[[], None]) -> None:
    callbacks = scope.get(SCOPE_KEY)
    if callbacks is None:
        raise RuntimeError("RequestScopeMiddleware is not installed around the app")
    callbacks.append(callback)
