"""The pipeline: starts the actors, loads the model, and opens one stream per request.

Structure (all in one nursery, started with ``await nursery.start(pipeline.run)``):
metrics actor, then the model load in a worker thread, then the GPU scheduler; relays are started
in the same nursery, one per request, so none lives inside an HTTP response generator.
"""

from __future__ import annotations

import functools
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import structlog
import trio

from actors.batch_policy import BatchSettings
from actors.messages import (
    AbortReason,
    ClientDisconnected,
    MetricsEvent,
    ModelLoaded,
    RequestOutcome,
    RequestReceived,
    RequestStatus,
    SchedulerEvent,
    StreamDone,
    StreamError,
    StreamEvent,
    StreamRejected,
    StreamStarted,
    StreamToken,
    Submit,
)
from actors.metrics import MetricsActor
from actors.prompt_cache import CachedResponse, PromptCache
from actors.relay import TokenRelay, TokenText
from actors.scheduler import GpuScheduler, SchedulerSettings, StepBackend, StepCaller
from app.cache.store import ResponseStore
from app.engine.params import SamplingParams

log = structlog.get_logger("pipeline")

State = Literal["loading", "ready", "draining", "failed"]
# Events a relay may hold for a client that reads slowly, before the relay itself waits.
RELAY_BUFFER_EVENTS = 256


class ServedModel(Protocol):
    """What the pipeline and the HTTP layer need of a loaded model (see app.engine.loader)."""

    @property
    def model_id(self) -> str: ...

    @property
    def aliases(self) -> tuple[str, ...]: ...

    @property
    def model_size(self) -> str: ...

    @property
    def dtype(self) -> str: ...

    @property
    def device(self) -> str: ...

    @property
    def max_context(self) -> int: ...

    @property
    def harmony(self) -> bool: ...

    @property
    def stop_token_ids(self) -> frozenset[int]: ...

    @property
    def runner(self) -> StepBackend: ...

    @property
    def decode_path(self) -> str: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    batch: BatchSettings
    max_queue: int
    stall_timeout: float = 30.0
    cache_max_entries: int = 1024  # 0 turns the prompt cache off
    cache_max_bytes: int = 64 * 1024 * 1024
    profile_name: str = ""
    arrival_window: float = 0.0  # seconds


TextMode = Literal["plain", "harmony"]


def _stop_applies_to(text_mode: TextMode) -> Callable[[str | None], bool]:
    # Stop strings end the answer; gpt-oss's reasoning (the analysis channel) is not the answer.
    if text_mode == "harmony":
        return lambda channel: channel != "analysis"
    return lambda channel: True


@dataclass(frozen=True, slots=True)
class GenerationJob:
    """A validated request, ready for the scheduler."""

    prompt: tuple[int, ...]
    params: SamplingParams
    received_at: float
    request_id: str = ""
    deadline: float | None = None
    text_mode: TextMode = "plain"  # harmony: the prompt is a Harmony conversation, parse channels
    cache_key: str = ""  # reported to the client whether or not the cache is used
    cacheable: bool = False  # deterministic (greedy or seeded) and not opted out: the cache serves it
    prompt_version: str = ""


class NotReadyError(RuntimeError):
    def __init__(self, state: State, detail: str = "") -> None:
        super().__init__(detail or f"the server is {state}")
        self.state = state


FINISH_STATUS: dict[str, RequestStatus] = {
    "stop": "ok",
    "length": "ok",
    "cancelled": "cancelled",
    "timeout": "cancelled",
    "shutdown": "cancelled",
    "error": "error",
}


class StreamHandle:
    """One request's view of its stream: iterate its events, abort it from anywhere (sync).

    It sees exactly what its client sees, so it reports the request's outcome to the metrics.
    """

    def __init__(
        self,
        request_id: str,
        events: trio.MemoryReceiveChannel[StreamEvent],
        abort: Callable[[AbortReason], None],
        report: Callable[[MetricsEvent], None],
        on_close: Callable[[], None] = lambda: None,
    ) -> None:
        self.request_id = request_id
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
                self._end("error", event.error_type)
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


class Pipeline:
    def __init__(
        self,
        load: Callable[[], ServedModel],
        settings: PipelineSettings,
        *,
        text_factory: Callable[[ServedModel, TextMode], TokenText],
        step_caller: StepCaller | None = None,
        on_fatal: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self.settings = settings
        self._text_factory = text_factory
        self._step_caller = step_caller
        self._on_fatal = on_fatal
        self.clock = clock
        self.metrics = MetricsActor()
        self.cache: PromptCache | None = None
        self.state: State = "loading"
        self.failure: str | None = None
        self.model: ServedModel | None = None
        self.scheduler: GpuScheduler | None = None
        self.started_at = clock()
        self._nursery: trio.Nursery | None = None
        self._relays = 0
        self._streams = 0

    @property
    def active_relays(self) -> int:
        """Generations with a relay running (several HTTP streams may share one)."""
        return self._relays

    @property
    def active_streams(self) -> int:
        """HTTP requests with a generation stream open, cache-served ones included."""
        return self._streams

    @property
    def task_count(self) -> int:
        """Tasks in the pipeline's nursery: the actors plus one per live relay."""
        return len(self._nursery.child_tasks) if self._nursery is not None else 0

    async def run(
        self, *, wait_for_model: bool = False, task_status: trio.TaskStatus[Pipeline] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.metrics.run)
            if self.settings.cache_max_entries > 0:
                store = ResponseStore[CachedResponse](self.settings.cache_max_entries, self.settings.cache_max_bytes)
                self.cache = await nursery.start(PromptCache(store, self.metrics.sender(), clock=self.clock).run)
            if not wait_for_model:
                task_status.started(self)
            try:
                model = await trio.to_thread.run_sync(self._load)
            except Exception as error:  # any load failure: say why, in one line
                self.state = "failed"
                self.failure = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                log.error("model_load_failed", error=self.failure)
                if wait_for_model:
                    raise
                if self._on_fatal is not None:
                    self._on_fatal(self.failure)
                return
            self.model = model
            settings = SchedulerSettings(
                self.settings.batch, self.settings.max_queue, model.max_context, self.settings.arrival_window
            )
            scheduler = GpuScheduler(
                model.runner, settings, self.metrics.sender(), step_caller=self._step_caller, clock=self.clock
            )
            await nursery.start(scheduler.run)
            self.scheduler = scheduler
            self.metrics.report(
                ModelLoaded(model.model_id, model.model_size, model.dtype, model.device, self.settings.profile_name)
            )
            self.state = "ready"
            log.info("model_ready", model=model.model_id, device=model.device, dtype=model.dtype)
            if wait_for_model:
                task_status.started(self)

    def begin_drain(self) -> None:
        if self.state == "ready":
            self.state = "draining"

    async def drain(self, timeout: float) -> None:
        """Refuse new work; let running streams finish for up to ``timeout`` seconds, then end
        the rest with finish_reason ``shutdown`` and give their relays a moment to say so."""
        self.begin_drain()
        scheduler = self.scheduler
        if scheduler is None:
            return
        with trio.move_on_after(timeout):
            while scheduler.stats.running or scheduler.stats.waiting or self._relays:
                await trio.sleep(0.05)
        scheduler.abort_all("shutdown")
        with trio.move_on_after(5.0):
            while self._relays:
                await trio.sleep(0.02)

    def stop(self) -> None:
        """End the actors: the scheduler fails what is left, then the nursery is cancelled."""
        if self.scheduler is not None:
            self.scheduler.close()
        if self.cache is not None:
            self.cache.close()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def open_stream(self, job: GenerationJob) -> StreamHandle:
        """Start a request's stream: through the prompt cache when it is cacheable, else straight
        to the scheduler. Synchronous: nothing here can block."""
        if self.state != "ready" or self.model is None or self.scheduler is None or self._nursery is None:
            raise NotReadyError(self.state, self.failure or "")
        request_id = job.request_id or f"req-{uuid.uuid4().hex}"
        abort: Callable[[AbortReason], None]
        if job.cacheable and self.cache is not None:
            cache, key = self.cache, job.cache_key
            capacity = job.params.max_tokens + 8
            send, receive = trio.open_memory_channel[StreamEvent](capacity)
            start = functools.partial(self._start_generation, job, request_id)
            subscriber = cache.open(key, request_id, send, job.received_at, capacity, start)
            abort = lambda reason: cache.leave(key, subscriber)  # noqa: E731
        else:
            send, receive = trio.open_memory_channel[StreamEvent](RELAY_BUFFER_EVENTS)
            self._start_generation(job, request_id, send)
            scheduler = self.scheduler
            abort = lambda reason: scheduler.abort(request_id, reason)  # noqa: E731
        self.metrics.report(
            RequestReceived(request_id, len(job.prompt), job.cache_key, job.prompt_version, job.cacheable)
        )
        self._streams += 1
        return StreamHandle(request_id, receive, abort, self.metrics.report, self._stream_closed)

    def _stream_closed(self) -> None:
        self._streams -= 1

    def _start_generation(
        self, job: GenerationJob, request_id: str, out: trio.MemorySendChannel[StreamEvent]
    ) -> Callable[[], None]:
        """Start a relay writing to ``out`` and submit the job; returns how to abort it."""
        model, scheduler, nursery = self.model, self.scheduler, self._nursery
        if model is None or scheduler is None or nursery is None:
            raise NotReadyError(self.state, self.failure or "")
        # Room for every event the scheduler can send this request: it never waits on a relay.
        to_relay, relay_in = trio.open_memory_channel[SchedulerEvent](job.params.max_tokens + 8)
        relay = TokenRelay(
            request_id,
            job.received_at,
            len(job.prompt),
            relay_in,
            out,
            self._text_factory(model, job.text_mode),
            job.params.stop,
            scheduler.abort,
            stall_timeout=self.settings.stall_timeout if self.settings.stall_timeout > 0 else math.inf,
            stop_applies_to=_stop_applies_to(job.text_mode),
        )
        nursery.start_soon(self._run_relay, relay)
        scheduler.submit(
            Submit(
                request_id,
                job.prompt,
                job.params,
                model.stop_token_ids,
                job.received_at,
                to_relay,
                job.deadline,
            )
        )
        return lambda: scheduler.abort(request_id, "client_disconnect")

    async def _run_relay(self, relay: TokenRelay) -> None:
        self._relays += 1
        try:
            await relay.run()
        finally:
            self._relays -= 1
