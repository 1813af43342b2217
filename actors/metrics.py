"""The metrics actor: the only writer of the figures behind /stats and /metrics, and the one place
that logs each step of a request's life.

Every other actor sends it events with ``send_nowait`` on an unbounded channel, so it never makes
anyone wait; readers take the book's ``snapshot()`` or scrape its registry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from actors.metrics_events import (
    CacheLookup,
    ClientDisconnected,
    FirstToken,
    MalformedToolCall,
    MetricsEvent,
    ModelLoaded,
    PrefixCacheState,
    QueueState,
    RedisError,
    RequestAdmitted,
    RequestFailed,
    RequestFinished,
    RequestOutcome,
    RequestQueued,
    RequestReceived,
    RequestRejected,
    StepCompleted,
)
from actors.prometheus_series import PrometheusSeries
from app.contract.step import PrefixCacheStats

log = structlog.get_logger("requests")
# Requests whose cache_key and prompt_version are remembered for their later log lines.
MAX_CONTEXTS = 10_000


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


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


@dataclass(slots=True)
class MetricsBook:
    """Plain state, updated by one event at a time. No trio: testable on its own."""

    window_seconds: float = 300.0
    clock: Callable[[], float] = time.monotonic
    prometheus: PrometheusSeries = field(default_factory=PrometheusSeries)
    model: ModelLoaded | None = None
    requests: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("total", "ok", "error", "cancelled", "cached", "rejected"), 0)
    )
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Prompt tokens that went through the model: fewer than prompt_tokens when choices of one
    # request share a prefill (a forked choice prefills one token of its own).
    prefilled_tokens: int = 0
    client_disconnects: int = 0
    malformed_tool_calls: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    redis_errors: dict[str, int] = field(default_factory=dict)  # by op
    running: int = 0
    waiting: int = 0
    prefix_cache: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    windows: dict[str, RollingWindow] = field(default_factory=dict)
    contexts: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        for name in ("ttft", "e2e", "itl", "queue", "teardown", "teardown_steps", "tokens"):
            self.windows[name] = RollingWindow(self.window_seconds, self.clock)

    def context(self, request_id: str) -> dict[str, Any]:
        """What log lines of this request carry besides their own fields: ``request_id`` is the id
        its client knows (its X-Request-Id, or ours), ``internal_id`` ours when they differ."""
        model = {"model": self.model.model_id} if self.model else {}
        return {"request_id": request_id, **model, **self.contexts.get(request_id, {})}

    def apply(self, event: MetricsEvent) -> None:
        p = self.prometheus
        labels = p.labels or ("", "")
        match event:
            case ModelLoaded():
                self.model = event
                p.bind(event.model_id, event.model_size, event.dtype, event.device, event.profile, event.batch_rows)
            case RequestReceived():
                self.requests["total"] += 1
                context = {"cache_key": event.cache_key, "prompt_version": event.prompt_version}
                if event.client_request_id is not None:
                    context.update(request_id=event.client_request_id, internal_id=event.request_id)
                self.contexts[event.request_id] = context
                while len(self.contexts) > MAX_CONTEXTS:
                    self.contexts.popitem(last=False)
            case RequestOutcome():
                self._on_outcome(event, labels)
            case RequestQueued():
                self.prompt_tokens += event.prompt_tokens
                p.prompt_tokens.labels(*labels).inc(event.prompt_tokens)
            case RequestAdmitted():
                self.windows["queue"].add(event.queue_seconds)
                p.queue.labels(*labels).observe(event.queue_seconds)
            case StepCompleted():
                self.prefilled_tokens += event.prompt_tokens
                for gap in event.inter_token_seconds:
                    self.windows["itl"].add(gap)
                    p.itl.labels(*labels).observe(gap)
                self.completion_tokens += event.generated_tokens
                p.generation_tokens.labels(*labels).inc(event.generated_tokens)
                self.windows["tokens"].add(event.generated_tokens)
            case RequestFinished():
                if event.teardown_seconds is not None:
                    self.windows["teardown"].add(event.teardown_seconds)
                    p.teardown.labels(*labels).observe(event.teardown_seconds)
                if event.teardown_steps is not None:
                    self.windows["teardown_steps"].add(event.teardown_steps)
                    p.teardown_steps.labels(*labels).observe(event.teardown_steps)
            case QueueState():
                self.running, self.waiting = event.running, event.waiting
                p.running.labels(*labels).set(event.running)
                p.waiting.labels(*labels).set(event.waiting)
                p.gateway.set(event.running, event.waiting)
            case ClientDisconnected():
                self.client_disconnects += 1
                p.disconnects.labels(*labels).inc()
            case CacheLookup():
                if event.hit:
                    self.cache_hits += 1
                    p.cache_hits.labels(*labels).inc()
                else:
                    self.cache_misses += 1
                    p.cache_misses.labels(*labels).inc()
            case RedisError():
                self.redis_errors[event.op] = self.redis_errors.get(event.op, 0) + 1
                p.redis_errors.labels(*labels, event.op).inc()
            case MalformedToolCall():
                self.malformed_tool_calls += 1
                p.malformed_tool_calls.labels(*labels, event.reason).inc()
            case PrefixCacheState():
                self._on_prefix_cache(event.stats, labels)
            case RequestRejected() | FirstToken() | RequestFailed():
                pass  # logged; counted through the request's outcome

    def _on_prefix_cache(self, now: PrefixCacheStats, labels: tuple[str, str]) -> None:
        """The runner's counters are cumulative: the Prometheus counters grow by what is new."""
        p, before = self.prometheus, self.prefix_cache
        for counter, grew in (
            (p.prefix_lookups, now.lookups - before.lookups),
            (p.prefix_hits, now.hits - before.hits),
            (p.prefix_hit_tokens, now.hit_tokens - before.hit_tokens),
            (p.prefix_evictions, now.evictions - before.evictions),
        ):
            if grew > 0:
                counter.labels(*labels).inc(grew)
        p.prefix_bytes.labels(*labels).set(now.bytes)
        p.prefix_blocks.labels(*labels).set(now.blocks)
        self.prefix_cache = now

    def _on_outcome(self, event: RequestOutcome, labels: tuple[str, str]) -> None:
        self.requests[event.status] += 1
        if event.cached and event.status == "ok":
            self.requests["cached"] += 1
        self.prometheus.requests.labels(*labels, event.status).inc()
        if event.status == "ok":
            for window, metric, value in (
                ("ttft", self.prometheus.ttft, event.ttft_ms),
                ("e2e", self.prometheus.e2e, event.e2e_ms),
            ):
                if value is not None:
                    self.windows[window].add(value / 1000.0)
                    metric.labels(*labels).observe(value / 1000.0)

    def snapshot(self) -> dict[str, Any]:
        def pcts(name: str) -> dict[str, float | None]:
            values = self.windows[name].values()
            return {f"p{q}": _round(None if (v := percentile(values, q)) is None else v * 1000.0) for q in (50, 95, 99)}

        teardown_steps = self.windows["teardown_steps"].values()
        finished = self.requests["ok"] + self.requests["error"] + self.requests["cancelled"]
        lookups = self.cache_hits + self.cache_misses
        return {
            "requests": dict(self.requests),
            "cancelled_requests": self.requests["cancelled"],
            "tokens": {
                "prompt": self.prompt_tokens,
                "completion": self.completion_tokens,
                "prefilled": self.prefilled_tokens,
            },
            "client_disconnects": self.client_disconnects,
            "malformed_tool_calls": self.malformed_tool_calls,
            "redis_errors": dict(self.redis_errors),
            "running": self.running,
            "waiting": self.waiting,
            "window_seconds": self.window_seconds,
            "ttft_ms": pcts("ttft"),
            "e2e_ms": pcts("e2e"),
            "inter_token_latency_ms": pcts("itl"),
            "queue_time_ms": pcts("queue"),
            "cancel_teardown_ms": pcts("teardown"),
            # Model steps that ran between an abort and its row's release: 1 at most (the step in flight).
            "cancel_teardown_steps": {
                **{f"p{q}": percentile(teardown_steps, q) for q in (50, 95, 99)},
                "max": max(teardown_steps, default=None),
                "count": len(teardown_steps),
            },
            "generation_tokens_per_second": round(self.windows["tokens"].rate(), 3),
            "error_rate": round(self.requests["error"] / finished, 6) if finished else 0.0,
            "cache_hit_rate": round(self.cache_hits / lookups, 6) if lookups else 0.0,
            "prefix_cache": dataclasses.asdict(self.prefix_cache),
        }


def lifecycle_line(event: MetricsEvent) -> tuple[str, dict[str, Any]] | None:
    """The log line (name, fields) an event stands for; None for events that are not a request step."""
    match event:
        case RequestReceived():
            return "received", {"prompt_tokens": event.prompt_tokens, "cacheable": event.cacheable}
        case CacheLookup() if event.hit:
            return "cache_hit", {}
        case RequestQueued():
            return "queued", {"prompt_tokens": event.prompt_tokens}
        case RequestRejected():
            return "rejected", {"status": event.status, "reason": event.reason}
        case RequestAdmitted():
            return "admitted", {"queue_ms": _round(event.queue_seconds * 1000)}
        case FirstToken():
            return "first_token", {"ttft_ms": _round(event.ttft_seconds * 1000)}
        case RequestFinished():
            name = {"stop": "finished", "length": "finished", "error": "failed"}.get(event.reason, "cancelled")
            fields: dict[str, Any] = {
                "finish_reason": event.reason,
                "completion_tokens": event.completion_tokens,
                "e2e_ms": _round(event.e2e_seconds * 1000),
            }
            if event.teardown_seconds is not None:
                fields["teardown_ms"] = _round(event.teardown_seconds * 1000)
            if event.teardown_steps is not None:
                fields["teardown_steps"] = event.teardown_steps
            if event.abort_reason is not None:
                fields["abort_reason"] = event.abort_reason
            return name, fields
        case RequestFailed():
            return "failed", {"error_type": event.error_type, "error": event.message}
        case RequestOutcome() if event.cached:
            # A cache-served request has no generation of its own: this line is its end.
            name = {"ok": "finished", "error": "failed", "rejected": "rejected"}.get(event.status, "cancelled")
            return name, {
                "finish_reason": event.finish_reason,
                "cached": True,
                "completion_tokens": event.completion_tokens,
                "ttft_ms": event.ttft_ms,
                "e2e_ms": event.e2e_ms,
            }
    return None


class MetricsActor:
    def __init__(self, prometheus: PrometheusSeries | None = None) -> None:
        self.book = MetricsBook(prometheus=prometheus or PrometheusSeries())
        self._send, self._receive = trio.open_memory_channel[MetricsEvent](math.inf)

    def sender(self) -> trio.MemorySendChannel[MetricsEvent]:
        return self._send.clone()

    def report(self, event: MetricsEvent) -> None:
        """Synchronous and never waits (safe in a cancelled task's ``finally``)."""
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            self._send.send_nowait(event)

    async def run(self, *, task_status: trio.TaskStatus[MetricsActor] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._receive:
            task_status.started(self)
            async for event in self._receive:
                try:
                    self._record(event)
                except Exception:  # a figure lost is better than every actor stopped with it
                    log.exception("metrics_event_failed", message=type(event).__name__)

    def _record(self, event: MetricsEvent) -> None:
        self.book.apply(event)
        line = lifecycle_line(event)
        if line is not None:
            name, fields = line
            request_id = getattr(event, "request_id", "")
            log.info(name, **self.book.context(request_id), **fields)
        if isinstance(event, RequestFinished | RequestFailed | RequestRejected) or (
            isinstance(event, RequestOutcome) and event.cached
        ):
            self.book.contexts.pop(event.request_id, None)
