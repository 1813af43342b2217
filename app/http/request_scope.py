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

import json
import math
from collections.abc import Callable
from typing import Any

import structlog
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope

from app.batching.finish import AbortReason
from app.http.errors import error_body

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


# Probes and scrapes answer whatever the load: an orchestrator must not restart a busy server.
UNCAPPED_PATHS = frozenset({"/health", "/metrics"})


class RequestScopeMiddleware:
    def __init__(self, app: Any, stall_timeout: float = math.inf, max_open: int | None = None) -> None:
        self.app = app
        self.stall_timeout = stall_timeout
        self.max_open = max_open
        self.open = 0  # HTTP requests in progress (connections that hold one)

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.max_open is not None and self.open >= self.max_open and scope["path"] not in UNCAPPED_PATHS:
            await _refuse(send, self.max_open)
            return
        self.open += 1
        try:
            await self._serve(scope, receive, send)
        finally:
            self.open -= 1

    async def _serve(self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
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
                    with trio.CancelScope(shield=_is_last(message)), trio.move_on_after(self.stall_timeout) as guard:
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
                        life.close("client_disconnect")  # at once: the watcher's exit would wait a turn
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


def _is_last(message: Any) -> bool:
    """The response's last message. Hypercorn finishes the connection inside this send (closes a
    ``Connection: close`` / HTTP/1.0 socket, or starts a kept-alive one's idle timer), and the same
    send hands quart-trio the ``http.disconnect`` on which it cancels the request: unshielded, that
    cancel lands in Hypercorn's close and the socket stays open for good. The shield has a
    deadline (the stall timeout) and covers only what Hypercorn does with the last bytes."""
    return bool(message.get("type") == "http.response.body" and not message.get("more_body", False))


async def _refuse(send: ASGISendCallable, limit: int) -> None:
    body = json.dumps(
        error_body(503, f"the server has {limit} connections with a request open", code="too_many_connections")
    )
    headers = [(b"content-type", b"application/json"), (b"retry-after", b"1"), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body.encode(), "more_body": False})


def on_request_close(scope: dict[str, Any], callback: CloseCallback) -> None:
    """Run ``callback(reason)`` once when the request ends: ``stalled`` when its client stopped
    reading, ``client_disconnect`` however else it ends (a no-op for a stream that finished)."""
    life = scope.get(SCOPE_KEY)
    if not isinstance(life, _RequestLife):
        raise RuntimeError("RequestScopeMiddleware is not installed around the app")
    life.callbacks.append(callback)
