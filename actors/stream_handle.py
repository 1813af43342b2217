"""StreamHandle: one HTTP request's view of its generation stream.

The route iterates its events; however the request ends (finished, failed, or its client gone),
its close callback calls ``abort`` once: the one path by which a disconnect reaches the
scheduler (or the prompt cache, for a request that shares a generation). It sees exactly what its
client sees, so it reports the request's outcome to the metrics.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from actors.messages import StreamDone, StreamError, StreamEvent, StreamRejected, StreamStarted, StreamToken
from actors.metrics_events import ClientDisconnected, MetricsEvent, RequestOutcome, RequestStatus
from app.batching.finish import AbortReason

FINISH_STATUS: dict[str, RequestStatus] = {
    "stop": "ok",
    "length": "ok",
    "cancelled": "cancelled",
    "timeout": "cancelled",
    "shutdown": "cancelled",
    "error": "error",
}


class StreamHandle:
    """Iterate a request's stream events; abort it from anywhere (synchronous, idempotent)."""

    def __init__(
        self,
        request_id: str,
        events: trio.MemoryReceiveChannel[StreamEvent],
        abort: Callable[[AbortReason], None],
        report: Callable[[MetricsEvent], None],
        on_close: Callable[[], None] = lambda: None,
        *,
        shown_id: str | None = None,
    ) -> None:
        self.request_id = request_id  # ours: the key every actor knows the request by
        self.shown_id = shown_id or request_id  # what its client is told (its X-Request-Id if it sent one)
        self._events = events
        self._abort = abort
        self._report = report
        self._on_close: Callable[[], None] | None = on_close
        self._cached = False
        self._tokens = 0
        self.finished = False

    async def next_event(self) -> StreamEvent:
        try:
            event = await self._events.receive()
        except trio.EndOfChannel:
            if not self.finished:
                self._end("error", "stream_lost")
            raise
        match event:
            case StreamStarted():
                self._cached = event.cache == "HIT"
            case StreamToken():
                self._tokens = event.index + 1
            case StreamDone():
                t = event.timings
                status = FINISH_STATUS.get(event.finish_reason, "error")
                self._end(status, event.finish_reason, event.usage.completion_tokens, t.queue_ms, t.ttft_ms, t.e2e_ms)
            case StreamError():
                self._end("error", event.code)
            case StreamRejected():
                self._end("rejected", str(event.status))
        return event

    def _end(self, status: RequestStatus, reason: str, tokens: int | None = None, *timings: float | None) -> None:
        self.finished = True
        count = self._tokens if tokens is None else tokens
        self._report(RequestOutcome(self.request_id, status, reason, self._cached, count, *timings))

    def __aiter__(self) -> StreamHandle:
        return self

    async def __anext__(self) -> StreamEvent:
        if self.finished:
            raise StopAsyncIteration
        try:
            return await self.next_event()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def abort(self, reason: AbortReason = "client_disconnect") -> None:
        """Idempotent and synchronous: safe in a cancelled task's ``finally``."""
        if not self.finished:
            if reason == "client_disconnect":
                self._report(ClientDisconnected(self.request_id))
            self._end("cancelled", reason)
            self._abort(reason)
        self._events.close()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()
