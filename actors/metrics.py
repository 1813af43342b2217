"""The metrics actor: the only writer of the figures behind /stats (and /metrics).

Every other actor sends it events with ``send_nowait`` on an unbounded channel, so it never makes
anyone wait; readers take the book's frozen ``snapshot()``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from actors.messages import (
    ClientDisconnected,
    FirstToken,
    MetricsEvent,
    RequestAdmitted,
    RequestFailed,
    RequestFinished,
    RequestQueued,
    RequestRejected,
    StepCompleted,
)

FINISH_STATUS = {
    "stop": "ok",
    "length": "ok",
    "cancelled": "cancelled",
    "timeout": "cancelled",
    "shutdown": "cancelled",
    "error": "error",
}


class RollingWindow:
    """Samples from the last ``seconds``, for percentiles that describe now, not all time."""

    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self.seconds = seconds
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, value: float) -> None:
        self._samples.append((self._clock(), value))
        self._trim()

    def values(self) -> list[float]:
        self._trim()
        return [v for _, v in self._samples]

    def rate(self) -> float:
        """Sum of the samples per second, over the part of the window they cover (at least 1 s)."""
        self._trim()
        if not self._samples:
            return 0.0
        span = max(1.0, self._clock() - self._samples[0][0])
        return sum(v for _, v in self._samples) / span

    def _trim(self) -> None:
        horizon = self._clock() - self.seconds
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no samples."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass(slots=True)
class MetricsBook:
    """Plain state, updated by one event at a time. No trio: testable on its own."""

    window_seconds: float = 300.0
    clock: Callable[[], float] = time.monotonic
    requests: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("total", "ok", "error", "cancelled", "rejected"), 0)
    )
    prompt_tokens: int = 0
    completion_tokens: int = 0
    client_disconnects: int = 0
    in_flight: int = 0  # queued or running, not finished
    waiting: int = 0
    windows: dict[str, RollingWindow] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("ttft", "e2e", "itl", "queue", "teardown", "tokens"):
            self.windows[name] = RollingWindow(self.window_seconds, self.clock)

    def apply(self, event: MetricsEvent) -> None:
        match event:
            case RequestQueued():
                self.requests["total"] += 1
                self.in_flight += 1
                self.waiting += 1
                self.prompt_tokens += event.prompt_tokens
            case RequestRejected():
                self.requests["total"] += 1
                self.requests["rejected"] += 1
            case RequestAdmitted():
                self.waiting = max(0, self.waiting - 1)
                self.windows["queue"].add(event.queue_seconds)
            case FirstToken():
                self.windows["ttft"].add(event.ttft_seconds)
            case StepCompleted():
                for gap in event.inter_token_seconds:
                    self.windows["itl"].add(gap)
                if event.kind == "decode":
                    self.windows["tokens"].add(event.new_tokens)
            case RequestFinished():
                self._on_finished(event)
            case RequestFailed():
                self.requests["error"] += 1
                self.in_flight = max(0, self.in_flight - 1)
            case ClientDisconnected():
                self.client_disconnects += 1

    def _on_finished(self, event: RequestFinished) -> None:
        status = FINISH_STATUS[event.reason]
        self.requests[status] += 1
        self.in_flight = max(0, self.in_flight - 1)
        self.completion_tokens += event.completion_tokens
        if status == "ok":
            self.windows["e2e"].add(event.e2e_seconds)
        if event.teardown_seconds is not None:
            self.windows["teardown"].add(event.teardown_seconds)

    def snapshot(self) -> dict[str, object]:
        def pcts(name: str) -> dict[str, float | None]:
            values = self.windows[name].values()
            return {f"p{q}": _ms(percentile(values, q)) for q in (50, 95, 99)}

        finished = self.requests["ok"] + self.requests["error"] + self.requests["cancelled"]
        return {
            "requests": dict(self.requests),
            "cancelled_requests": self.requests["cancelled"],
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens},
            "client_disconnects": self.client_disconnects,
            "in_flight_requests": self.in_flight,
            "window_seconds": self.window_seconds,
            "ttft_ms": pcts("ttft"),
            "e2e_ms": pcts("e2e"),
            "inter_token_latency_ms": pcts("itl"),
            "queue_time_ms": pcts("queue"),
            "cancel_teardown_ms": pcts("teardown"),
            "generation_tokens_per_second": round(self.windows["tokens"].rate(), 3),
            "error_rate": round(self.requests["error"] / finished, 6) if finished else 0.0,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


class MetricsActor:
    def __init__(self, book: MetricsBook | None = None) -> None:
        self.book = book or MetricsBook()
        self._send, self._receive = trio.open_memory_channel[MetricsEvent](math.inf)

    def sender(self) -> trio.MemorySendChannel[MetricsEvent]:
        return self._send.clone()

    def close(self) -> None:
        self._send.close()

    async def run(self, *, task_status: trio.TaskStatus[MetricsActor] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._receive:
            task_status.started(self)
            async for event in self._receive:
                self.book.apply(event)
