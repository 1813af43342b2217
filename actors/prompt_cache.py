"""The prompt cache actor: finished deterministic responses, replayed without the GPU, and identical
requests in flight sharing one generation.

A cacheable request (greedy, or seeded) is opened here instead of going straight to the scheduler:
- its cache_key is stored: the stored events are replayed at once (``cache: HIT``);
- an identical generation is running: the request joins it, gets what it missed, then follows
  live (``HIT``: it costs the GPU nothing);
- otherwise a generation starts (``MISS``) and every request on it is a subscriber. It is aborted
  only when its last subscriber leaves; only a generation that ended with ``stop`` or ``length`` is
  stored (never a cancelled, failed, timed-out or shut-down one).
Only this actor touches the store and the flights; other tasks send it messages.

With a shared tier (Redis, for replicas: actors/shared_cache.py) a miss in memory is looked up
there, in a task of the actor's nursery (the round trip runs in a worker thread; the actor goes on
with other messages): the request waits as a flight, so identical requests that arrive meanwhile
join it, and a shared hit is replayed to all of them and kept in memory for the next. A generation
that is stored is written to the shared tier too, in the background. The shared tier never fails a
request: down, it is a miss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import trio

from actors.cached_response import STORED_REASONS, CachedResponse
from actors.messages import (
    CacheStatus,
    StreamDone,
    StreamError,
    StreamEvent,
    StreamRejected,
    StreamStarted,
    StreamToken,
    Timings,
)
from actors.metrics_events import CacheLookup, MetricsEvent
from actors.shared_cache import SharedCache
from app.batching.finish import AbortReason
from app.cache.store import ResponseStore, StoreStats
from app.contract.failures import FAILURE_MESSAGES

log = structlog.get_logger("prompt_cache")


# A generation for a cache miss: given the subscriber-less output channel, it starts the relay and
# submits to the scheduler, and returns how to abort it.
StartGeneration = Callable[[trio.MemorySendChannel[StreamEvent]], Callable[[AbortReason], None]]


@dataclass(frozen=True, slots=True)
class CacheOpen:
    key: str
    request_id: str
    subscriber: int
    channel: trio.MemorySendChannel[StreamEvent] = field(repr=False)
    received_at: float
    event_capacity: int  # room for the flight's generation output (its max_tokens + a few)
    start: StartGeneration = field(repr=False)


@dataclass(frozen=True, slots=True)
class CacheLeave:
    key: str
    subscriber: int


CacheMessage = CacheOpen | CacheLeave


@dataclass(slots=True)
class _Subscriber:
    request_id: str
    channel: trio.MemorySendChannel[StreamEvent]
    received_at: float
    status: CacheStatus
    first_token_at: float | None = None


@dataclass(slots=True)
class _Flight:
    key: str
    leader: str
    backlog: list[StreamEvent] = field(default_factory=list)
    subscribers: dict[int, _Subscriber] = field(default_factory=dict)
    abort: Callable[[AbortReason], None] = lambda reason: None
    aborted: bool = False


class PromptCache:
    def __init__(
        self,
        store: ResponseStore[CachedResponse],
        metrics: trio.MemorySendChannel[MetricsEvent],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._flights: dict[str, _Flight] = {}
        self._inbox_send, self._inbox = trio.open_memory_channel[CacheMessage](math.inf)
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self.shared: SharedCache | None = None
        self.stats: StoreStats = store.stats()
        self.flights = 0

    def share(self, shared: SharedCache) -> None:
        """Look misses up in, and write stored answers to, a tier replicas share (from now on)."""
        self.shared = shared

    # -- the handle (synchronous: never waits) ---------------------------------------------------
    def open(
        self,
        key: str,
        request_id: str,
        channel: trio.MemorySendChannel[StreamEvent],
        received_at: float,
        event_capacity: int,
        start: StartGeneration,
    ) -> int:
        subscriber = next(self._ids)
        self._inbox_send.send_nowait(
            CacheOpen(key, request_id, subscriber, channel, received_at, event_capacity, start)
        )
        return subscriber

    def leave(self, key: str, subscriber: int) -> None:
        """Idempotent; safe in a cancelled task's ``finally``."""
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            self._inbox_send.send_nowait(CacheLeave(key, subscriber))

    def close(self) -> None:
        self._inbox_send.close()

    def cached_keys(self) -> list[str]:
        return self._store.keys()

    # -- the actor -------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[PromptCache] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery, self._inbox:
            self._nursery = nursery
            task_status.started(self)
            async for message in self._inbox:
                try:
                    match message:
                        case CacheOpen():
                            self._on_open(message)
                        case CacheLeave():
                            self._on_leave(message)
                except Exception as error:
                    # One request's fault must not stop the actor (and every stream with it).
                    log.exception("prompt_cache_failed", key=message.key, message=type(message).__name__)
                    if isinstance(message, CacheOpen):
                        self._fail_open(message, error)
                self._publish()
            nursery.cancel_scope.cancel()

    def _on_open(self, message: CacheOpen) -> None:
        cached = self._store.get(message.key)
        if cached is not None:
            self._count(message.request_id, hit=True)
            self._replay(_Subscriber(message.request_id, message.channel, message.received_at, "HIT"), cached)
            return
        flight = self._flights.get(message.key)
        subscriber = _Subscriber(message.request_id, message.channel, message.received_at, "HIT")
        if flight is not None and not flight.aborted:
            self._count(message.request_id, hit=True)
            flight.subscribers[message.subscriber] = subscriber
            for event in flight.backlog:
                self._forward(flight, message.subscriber, subscriber, event)
            return
        if self._nursery is None:
            raise RuntimeError("PromptCache.run is not running")
        flight = _Flight(message.key, message.request_id, subscribers={message.subscriber: subscriber})
        self._flights[message.key] = flight
        if self.shared is not None:
            self._nursery.start_soon(self._look_up_shared, self.shared, flight, message)
            return
        self._generate(flight, message)

    def _count(self, request_id: str, *, hit: bool) -> None:
        if hit:
            self._store.count_hit()
        else:
            self._store.count_miss()
        self._metric(CacheLookup(request_id, hit))

    async def _look_up_shared(self, shared: SharedCache, flight: _Flight, message: CacheOpen) -> None:
        """A miss in memory: the shared tier's answer is replayed to the flight's subscribers
        (the leader and whoever joined meanwhile); without one, the leader's generation starts."""
        settled = False
        try:
            try:
                found = await shared.get(flight.key)
            except Exception:  # never expected (a failure is a miss): still a miss, not a dead actor
                log.exception("shared_cache_failed", request_id=flight.leader)
                found = None
            settled = True
        finally:
            if not settled and not flight.aborted:  # cancelled: the actor is stopping
                self._end_flight(flight, StreamError(flight.leader, "stream_lost"))
        if flight.aborted:  # every subscriber left while it was looked up
            return
        try:
            if found is None:
                self._generate(flight, message)
            else:
                self._count(flight.leader, hit=True)
                self._store.put(flight.key, found, found.size())
                if self._flights.get(flight.key) is flight:
                    del self._flights[flight.key]
                for subscriber in flight.subscribers.values():
                    self._replay(subscriber, found)
        except Exception:  # as in run(): these requests fail, the actor goes on
            log.exception("prompt_cache_failed", key=flight.key, message="shared_lookup")
            self._end_flight(flight, StreamError(flight.leader, "cache_failed"))
        self._publish()

    def _generate(self, flight: _Flight, message: CacheOpen) -> None:
        """Start the generation a miss needs; its leader is told MISS, joiners HIT."""
        self._count(message.request_id, hit=False)
        leader = flight.subscribers.get(message.subscriber)  # gone if it left during a shared lookup
        if leader is not None:
            leader.status = "MISS"
        generation_send, generation_receive = trio.open_memory_channel[StreamEvent](message.event_capacity)
        try:
            flight.abort = message.start(generation_send)
        except Exception:  # e.g. the scheduler is gone: tell the clients, keep serving
            log.exception("generation_start_failed", request_id=message.request_id)
            rejected = StreamRejected(message.request_id, 503, FAILURE_MESSAGES["start_failed"], None)
            self._end_flight(flight, rejected)
            return
        assert self._nursery is not None  # _on_open checked
        self._nursery.start_soon(self._pump, flight, generation_receive)

    def _end_flight(self, flight: _Flight, ending: StreamRejected | StreamError) -> None:
        """End a flight with no generation: each subscriber gets ``ending`` under its own id."""
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        for subscriber in flight.subscribers.values():
            self._send(subscriber, dataclasses.replace(ending, request_id=subscriber.request_id))
            subscriber.channel.close()

    def _fail_open(self, message: CacheOpen, error: Exception) -> None:
        """Give the client of a request the cache could not handle an error instead of silence."""
        failure = StreamError(message.request_id, "cache_failed")
        with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            message.channel.send_nowait(failure)
        message.channel.close()
        flight = self._flights.get(message.key)
        if flight is not None and message.subscriber in flight.subscribers:
            self._on_leave(CacheLeave(message.key, message.subscriber))

    def _on_leave(self, message: CacheLeave) -> None:
        flight = self._flights.get(message.key)
        if flight is None or message.subscriber not in flight.subscribers:
            return
        flight.subscribers.pop(message.subscriber).channel.close()
        if not flight.subscribers and not flight.aborted:
            # Nobody is left to read it: stop the generation; it will not be stored.
            flight.aborted = True
            del self._flights[flight.key]
            flight.abort("client_disconnect")

    async def _pump(self, flight: _Flight, generation: trio.MemoryReceiveChannel[StreamEvent]) -> None:
        """Fan one generation's events out to its subscribers; store it if it completed."""
        self.flights += 1
        terminal: StreamEvent | None = None
        try:
            async with generation:
                async for event in generation:
                    flight.backlog.append(event)
                    for number, subscriber in list(flight.subscribers.items()):
                        self._forward(flight, number, subscriber, event)
                    if isinstance(event, StreamDone | StreamError | StreamRejected):
                        terminal = event
                        break
        finally:
            self.flights -= 1
            if self._flights.get(flight.key) is flight:
                del self._flights[flight.key]
            if terminal is None:
                lost = StreamError(flight.leader, "stream_lost")
                for subscriber in flight.subscribers.values():
                    self._send(subscriber, dataclasses.replace(lost, request_id=subscriber.request_id))
            for subscriber in flight.subscribers.values():
                subscriber.channel.close()
            if isinstance(terminal, StreamDone) and terminal.finish_reason in STORED_REASONS and not flight.aborted:
                tokens = tuple(e for e in flight.backlog if isinstance(e, StreamToken))
                response = CachedResponse(tokens, terminal)
                self._store.put(flight.key, response, response.size())
                if self.shared is not None and self._nursery is not None:
                    self._nursery.start_soon(self.shared.put, flight.key, response)
            self._publish()

    # -- delivering ------------------------------------------------------------------------------
    def _forward(self, flight: _Flight, number: int, subscriber: _Subscriber, event: StreamEvent) -> None:
        match event:
            case StreamStarted():
                event = dataclasses.replace(event, request_id=subscriber.request_id, cache=subscriber.status)
            case StreamToken():
                if subscriber.first_token_at is None:
                    subscriber.first_token_at = self._clock()
            case StreamDone():
                event = self._done_for(subscriber, event)
            case StreamError() | StreamRejected():
                event = dataclasses.replace(event, request_id=subscriber.request_id)
        if not self._send(subscriber, event):
            # That client is gone or hopelessly behind: drop it like a leave.
            self._on_leave(CacheLeave(flight.key, number))

    def _replay(self, subscriber: _Subscriber, cached: CachedResponse) -> None:
        self._send(subscriber, StreamStarted(subscriber.request_id, "HIT"))
        for token in cached.tokens:  # the stored objects themselves: a replay copies nothing
            self._send(subscriber, token)
            subscriber.first_token_at = subscriber.first_token_at or self._clock()
        done = self._done_for(subscriber, cached.done)
        self._send(subscriber, done)
        subscriber.channel.close()

    def _done_for(self, subscriber: _Subscriber, done: StreamDone) -> StreamDone:
        """The done event with this subscriber's own timings (it did not wait for the GPU)."""
        if subscriber.status == "MISS":
            return dataclasses.replace(done, request_id=subscriber.request_id)
        now = self._clock()
        first = subscriber.first_token_at
        timings = Timings(
            queue_ms=0.0,
            prefill_ms=None,
            ttft_ms=None if first is None else round((first - subscriber.received_at) * 1000, 3),
            e2e_ms=round((now - subscriber.received_at) * 1000, 3),
        )
        return dataclasses.replace(done, request_id=subscriber.request_id, timings=timings)

    def _send(self, subscriber: _Subscriber, event: StreamEvent) -> bool:
        try:
            subscriber.channel.send_nowait(event)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    def _metric(self, event: MetricsEvent) -> None:
        with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self._metrics.send_nowait(event)

    def _publish(self) -> None:
        self.stats = self._store.stats()
